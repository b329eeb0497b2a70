"""Asynchronous aggregation: FedBuff's buffer of K staleness-weighted updates, over simulated time.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
https://arxiv.org/abs/2106.06639, Algorithm 1): up to ``concurrency`` clients train at once, each
from the model version it was sent; whenever one finishes its update enters the server's buffer
and a new client starts from the current model; when the buffer holds ``K`` updates the server
steps with ``Delta = sum_i s(tau_i) Delta_i / K`` (line "Delta^t <- Delta^t / K"; the paper's
experiments scale each update by ``s(tau) = 1 / sqrt(1 + tau)``, the staleness ``tau`` being how
many server steps happened since the client was sent its model) and the recipe's server transform
(the paper's ``eta_g``: ``fedavg``'s ``server_lr``, FedAdam, FedAvgM, ... on top, through
:func:`~asymvlm.federated.core.server_update`). A "round" of the run is one server step.

Choices where the literature differs (options of the ``fedbuff`` entry of :data:`ASYNC_MODES`):

* ``normalize``: ``count`` (default; Algorithm 1: divide by the buffer's total weight, ``K`` when
  every update counts one) or ``weights`` (divide by ``sum_i w_i s(tau_i)``: a weighted mean, the
  staleness changes the mix, never the step size). FLSim (the authors' simulator) sums without
  dividing: that is ``count`` with the server learning rate times ``K``.
* ``weighting``: ``uniform`` (default; Algorithm 1: every update counts one) or ``recipe`` (the
  recipe's mean weights ``w_i``: ``fedavg``'s example counts, or its ``weighting`` option).
* ``staleness``: the exponent ``a`` of ``s(tau) = (1 + tau)^-a`` (0.5, the paper's; 0 = none;
  FLSim's ``PolynomialStalenessWeight``, there also divided by ``s(1)``, which only rescales).

The simulation (an event queue over simulated time; every random draw from
:func:`~asymvlm.federated.seeds.seed_sequence` ``(seed, "async", kind, counter)``):

* client ``c``'s training time at its ``j``-th dispatch overall is ``speed_c * L_j``: ``speed_c``
  is lognormal with ``latency_spread`` (drawn once per run: some clients are persistently slow,
  a heavy tail), ``L_j`` is drawn per dispatch from ``latency`` (``constant`` 1, ``exponential``
  of mean 1, ``lognormal`` of median 1 and ``latency_sigma``, ``pareto`` of minimum 1 and shape
  ``latency_shape``: infinite variance below 2). With probability ``dropout_prob`` (the run's) a
  dispatched client never reports: its slot frees at its would-be finish time;
* a client trains one job at a time, and a client whose update waits in the buffer is not sent
  another model until that update is applied (its SecAgg session closes; this is also what makes
  ``K = concurrency = num_clients`` with equal latencies the synchronous rounds exactly);
* free slots are filled at once, uniformly without replacement among the idle clients, dispatched
  in increasing client order (the stream ``(seed, "async", 2, dispatches so far)``); events are
  processed by finish time, ties by dispatch order; a full buffer steps the server before any slot
  is refilled (the next clients get the new model: the refill opens the next step's loop, at the
  same simulated time);
* a client's update is computed at dispatch (its model is known then) with the synchronous round's
  seeds for that version (``Federation.train_clients(state, clients, version)``; a client sent the
  same version twice, after a dropout, replays the same batches) and validated then (a rejected
  update is reported when it would have arrived); updates staler than ``max_staleness`` (0 =
  never) are dropped on arrival.

Resume: every checkpoint is written right after a server step, when the buffer is empty; the
simulated time, the dispatch counter and the jobs in flight (client, version, dispatch, start and
finish times, and the update each carries) are the server state's ``extra["async"]``
(:func:`sim_from_extra` checks it against the live model), so a run killed after step k and resumed
ends bit-identical to an uninterrupted one.

Not combined with: differential privacy (the accountant assumes synchronous Poisson-sampled
rounds), personalisation, clustering and per-client test splits (a round-based state per client),
robust aggregators (FedBuff's step is a weighted mean), the exact LoRA modes (they fold a round's
factors into the base weights), deadlines, per-round sampling and availability models (latencies
and ``concurrency`` replace them): :func:`check_options` refuses each with one line.

This module must not import :mod:`asymvlm.federated.rounds` (which dispatches to it) nor the
config (which calls :func:`check_options`): :func:`run_async` takes the built ``Federation``.

Example:
    >>> import torch
    >>> agg = fedbuff_aggregate([{"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}], [0, 3], exponent=0.5)
    >>> agg.delta["w"].tolist(), agg.info["weights"]
    ([1.25, 1.25], [0.5, 0.25])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from asymvlm.errors import ArtefactError, ConfigError
from asymvlm.federated.client import ClientResult
from asymvlm.federated.core import EXACT_MODES, AggregateResult, Sum, WeightedMean, server_update
from asymvlm.federated.core.tree import first_non_finite
from asymvlm.federated.recipes import make_recipe
from asymvlm.federated.sampling import attackers, fairness
from asymvlm.federated.seeds import seed_sequence
from asymvlm.federated.temporal import set_round
from asymvlm.registry import Param, Registry, at_least, non_negative, positive

__all__ = [
    "ASYNC_MODES",
    "FedBuff",
    "Job",
    "AsyncSimulation",
    "LATENCIES",
    "staleness_weights",
    "fedbuff_aggregate",
    "check_options",
    "sim_from_extra",
    "run_async",
]

log_ = logging.getLogger(__name__)

_SPEEDS, _DISPATCH, _SELECT = 0, 1, 2  # the kinds of draws of the "async" stream

# one draw of a dispatch's nominal training time (x the client's speed factor): each unit is one
# nominal client's training time
LATENCIES: dict[str, Callable[[np.random.Generator, Any], float]] = {
    "constant": lambda rng, mode: 1.0,
    "exponential": lambda rng, mode: float(rng.exponential(1.0)),
    "lognormal": lambda rng, mode: float(rng.lognormal(0.0, mode.latency_sigma)),
    "pareto": lambda rng, mode: 1.0 + float(rng.pareto(mode.latency_shape)),  # numpy's is Lomax: + x_m = 1
}


def staleness_weights(staleness: Sequence[int], exponent: float) -> list[float]:
    """``s(tau) = (1 + tau)^-a`` (FedBuff's experiments: ``a = 1/2``; ``s(0) = 1`` exactly).

    Example:
        >>> staleness_weights([0, 3], 0.5)
        [1.0, 0.5]
    """
    return [(1.0 + int(t)) ** -float(exponent) for t in staleness]


def fedbuff_aggregate(
    deltas: Sequence[Mapping[str, Tensor]],
    staleness: Sequence[int],
    exponent: float = 0.5,
    normalize: str = "count",
    weights: Sequence[float] | None = None,
) -> AggregateResult:
    """FedBuff's buffered aggregate ``sum_i w_i s(tau_i) Delta_i / Z`` (Algorithm 1 of
    https://arxiv.org/abs/2106.06639 with its staleness scaling): ``Z = sum_i w_i`` (``count``:
    ``K`` for unit weights, the paper's) or ``sum_i w_i s(tau_i)`` (``weights``). Accumulated key by
    key in the buffer's order as :class:`~asymvlm.federated.core.WeightedMean` does (with every
    ``tau = 0`` it is that mean, bit for bit). ``info["weights"]`` holds each update's coefficient.

    Example:
        >>> import torch
        >>> d = [{"w": torch.tensor([2.0], dtype=torch.float64)}, {"w": torch.tensor([4.0], dtype=torch.float64)}]
        >>> fedbuff_aggregate(d, [0, 3], 1.0, "weights").info["weights"]  # s = 1, 1/4; a weighted mean
        [0.8, 0.2]
    """
    if len(deltas) != len(staleness) or not deltas:
        raise ValueError(f"{len(deltas)} updates and {len(staleness)} staleness values (need as many, >= 1)")
    w = [1.0] * len(deltas) if weights is None else [float(x) for x in weights]
    s = staleness_weights(staleness, exponent)
    total = sum(w) if normalize == "count" else sum(wi * si for wi, si in zip(w, s))
    p = [wi * si / total for wi, si in zip(w, s)]
    return AggregateResult(Sum()(deltas, p).delta, {"weights": p})  # WeightedMean's additions, in order


@dataclass(frozen=True)
class FedBuff:
    """FedBuff's options (the module docstring; :data:`ASYNC_MODES`)."""

    buffer_size: int = 10
    concurrency: int = 100
    staleness: float = 0.5
    normalize: Literal["count", "weights"] = "count"
    weighting: Literal["uniform", "recipe"] = "uniform"
    latency: Literal["constant", "exponential", "lognormal", "pareto"] = "lognormal"
    latency_sigma: float = 0.5
    latency_shape: float = 1.5
    latency_spread: float = 1.0
    max_staleness: int = 0
    name: ClassVar[str] = "fedbuff"

    def client_speeds(self, seed: int, num_clients: int) -> np.ndarray:
        """Every client's persistent speed factor: lognormal(0, ``latency_spread``), 1 at spread 0."""
        rng = np.random.default_rng(seed_sequence(seed, "async", _SPEEDS))
        return np.exp(self.latency_spread * rng.standard_normal(num_clients))

    def draw(self, seed: int, dispatch: int, speed: float, dropout_prob: float) -> tuple[float, bool]:
        """Dispatch ``dispatch``'s training time (``speed`` x a draw of ``latency``) and whether it drops out."""
        rng = np.random.default_rng(seed_sequence(seed, "async", _DISPATCH, dispatch))
        latency = float(speed) * LATENCIES[self.latency](rng, self)
        return latency, bool(rng.random() < dropout_prob)


_NORMALIZE = "Divide the weighted sum by the total weight (count: K, the paper's) or the staleness-scaled one."
_WEIGHTING = "Every update counts one (uniform, the paper's) or the recipe's mean weights (fedavg: examples)."
ASYNC_MODES = Registry("asynchronous mode")
ASYNC_MODES.register(
    "fedbuff",
    params=[
        Param("buffer_size", int, 10, "Updates K the server buffers before it steps.", check=at_least(1)),
        Param("concurrency", int, 100, "Clients training at once (capped at num_clients).", check=at_least(1)),
        Param("staleness", float, 0.5, "Exponent a of the staleness weight (1 + tau)^-a.", check=non_negative),
        Param("normalize", Literal["count", "weights"], "count", _NORMALIZE),
        Param("weighting", Literal["uniform", "recipe"], "uniform", _WEIGHTING),
        Param("latency", Literal[tuple(LATENCIES)], "lognormal", "A dispatch's training time (x its client's speed)."),
        Param("latency_sigma", float, 0.5, "Sigma of the lognormal latency (median 1).", check=non_negative),
        Param("latency_shape", float, 1.5, "Shape of the Pareto latency (minimum 1).", check=positive),
        Param("latency_spread", float, 1.0, "Sigma of the clients' lognormal speed factors.", check=non_negative),
        Param("max_staleness", int, 0, "Drop updates staler than this (0: never).", check=at_least(0)),
    ],
    help="FedBuff: buffer K staleness-weighted updates of concurrently training clients, then step the server.",
    reference="https://arxiv.org/abs/2106.06639",
)(FedBuff)


@dataclass
class Job:
    """One dispatch: ``client`` trains from model ``version`` between ``start`` and ``finish``
    (simulated time); ``result`` is its update (None when it drops out or is rejected)."""

    client: int
    version: int
    dispatch: int
    start: float
    finish: float
    dropped: bool = False
    rejected: str | None = None
    result: ClientResult | None = None


# train(clients, version) -> (their results, in that order; {client: why its update is rejected})
Train = Callable[[list[int], int], tuple[list[ClientResult], dict[int, str]]]


def _no_events() -> dict[str, list]:
    return {"dispatched": [], "dropped": [], "rejected": [], "stale_dropped": []}


@dataclass
class AsyncSimulation:
    """The event queue: jobs in flight, the buffer, simulated time and the dispatch counter."""

    mode: FedBuff
    num_clients: int
    seed: int
    dropout_prob: float = 0.0
    time: float = 0.0
    dispatches: int = 0
    jobs: list[Job] = field(default_factory=list)
    buffer: list[tuple[Job, int]] = field(default_factory=list)  # (job, staleness) in arrival order
    events: dict[str, list] = field(default_factory=_no_events)  # since the last step (the record's)

    def __post_init__(self) -> None:
        self.speeds = self.mode.client_speeds(self.seed, self.num_clients)

    @property
    def concurrency(self) -> int:
        return min(self.mode.concurrency, self.num_clients)

    def idle(self) -> list[int]:
        """Clients neither training nor waiting in the buffer."""
        busy = {j.client for j in self.jobs} | {j.client for j, _ in self.buffer}
        return [c for c in range(self.num_clients) if c not in busy]

    def fill(self, version: int, train: Train) -> list[Job]:
        """Dispatch idle clients into the free slots with model ``version`` (their updates computed now)."""
        idle = self.idle()
        m = min(self.concurrency - len(self.jobs), len(idle))
        if m <= 0:
            return []
        rng = np.random.default_rng(seed_sequence(self.seed, "async", _SELECT, self.dispatches))
        new = []
        for c in sorted(int(c) for c in rng.choice(idle, size=m, replace=False)):
            latency, dropped = self.mode.draw(self.seed, self.dispatches, self.speeds[c], self.dropout_prob)
            new.append(Job(c, version, self.dispatches, self.time, self.time + latency, dropped))
            self.dispatches += 1
        live = [j for j in new if not j.dropped]
        if live:
            results, rejected = train([j.client for j in live], version)
            for j, r in zip(live, results):
                j.rejected = rejected.get(j.client)
                j.result = None if j.rejected else r
        self.jobs.extend(new)
        self.events["dispatched"].extend(j.client for j in new)
        return new

    def advance(self, version: int, train: Train) -> None:
        """Process finish events (by time, ties by dispatch order) until the buffer holds K
        updates, refilling the free slots after every event that leaves it short."""
        while len(self.buffer) < self.mode.buffer_size:
            if not self.jobs:
                raise RuntimeError("no client in flight and the buffer is not full (buffer_size > num_clients?)")
            job = min(self.jobs, key=lambda j: (j.finish, j.dispatch))
            self.jobs.remove(job)
            self.time = job.finish
            tau = version - job.version
            if job.dropped:
                self.events["dropped"].append(job.client)
            elif job.rejected is not None:
                self.events["rejected"].append({"client": job.client, "reason": job.rejected})
            elif self.mode.max_staleness and tau > self.mode.max_staleness:
                self.events["stale_dropped"].append({"client": job.client, "staleness": tau})
            else:
                self.buffer.append((job, tau))
            if len(self.buffer) < self.mode.buffer_size:
                self.fill(version, train)

    def take(self) -> tuple[list[tuple[Job, int]], dict[str, list]]:
        """The full buffer and the events since the last step; both start empty again."""
        out, events = self.buffer, self.events
        self.buffer, self.events = [], _no_events()
        return out, events

    def to_extra(self) -> dict[str, Any]:
        """The state to checkpoint (the buffer is empty after a step: module docstring)."""
        if self.buffer:
            raise RuntimeError("the buffer is checkpointed only empty (right after a server step)")
        jobs = []
        for j in sorted(self.jobs, key=lambda j: j.dispatch):
            r = j.result
            loss = r.loss_after if r is not None and r.loss_after is not None and math.isfinite(r.loss_after) else None
            jobs.append({
                "client": j.client, "version": j.version, "dispatch": j.dispatch, "start": j.start,
                "finish": j.finish, "dropped": j.dropped, "rejected": j.rejected,
                "num_examples": r.num_examples if r is not None else 0, "loss_after": loss,
                "delta": dict(r.delta) if r is not None else {},
            })  # fmt: skip
        return {"async": {"mode": self.mode.name, "time": self.time, "dispatches": self.dispatches, "jobs": jobs}}


def sim_from_extra(
    extra: Any, sim: AsyncSimulation, params: Mapping[str, Tensor], version: int, where: Any
) -> AsyncSimulation:
    """``sim`` (fresh: no jobs) continued from a checkpoint's ``extra["async"]``, every field
    checked against the live run (types, ranges, clients, versions, times, the updates' keys,
    shapes and dtypes); one :class:`~asymvlm.errors.ArtefactError` naming ``where`` and the field."""
    state = extra.get("async") if isinstance(extra, dict) else None

    def bad(field_: str, why: str) -> ArtefactError:
        return ArtefactError(f"{where}: extra/async/{field_} {why}")

    if not isinstance(state, dict) or set(state) != {"mode", "time", "dispatches", "jobs"}:
        raise ArtefactError(f"{where}: the asynchronous run's state (extra/async) is missing or malformed")
    if state["mode"] != sim.mode.name:
        raise bad("mode", f"is {state['mode']!r}, the run's is {sim.mode.name!r}")
    now, count, jobs = state["time"], state["dispatches"], state["jobs"]
    if not (isinstance(now, (int, float)) and not isinstance(now, bool) and math.isfinite(now) and now >= 0):
        raise bad("time", f"must be a finite number >= 0, got {now!r}")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise bad("dispatches", f"must be an integer >= 0, got {count!r}")
    if not isinstance(jobs, list) or len(jobs) > sim.concurrency:
        raise bad("jobs", f"must be a list of at most {sim.concurrency} jobs")
    sim.time, sim.dispatches = float(now), count
    for i, d in enumerate(jobs):
        sim.jobs.append(_job_from(d, f"jobs/{i}", sim, params, version, bad))
    if len({j.client for j in sim.jobs}) != len(sim.jobs) or len({j.dispatch for j in sim.jobs}) != len(sim.jobs):
        raise bad("jobs", "name a client or a dispatch twice")
    return sim


def _job_from(d: Any, at: str, sim: AsyncSimulation, params: Mapping[str, Tensor], version: int, bad: Any) -> Job:
    keys = {"client", "version", "dispatch", "start", "finish", "dropped", "rejected", "num_examples",
            "loss_after", "delta"}  # fmt: skip
    if not isinstance(d, dict) or set(d) != keys:
        raise bad(at, f"must be an object with keys {sorted(keys)}")

    def whole(name: str, lo: int, hi: int) -> int:
        v = d[name]
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise bad(f"{at}/{name}", f"must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    client, ver = whole("client", 0, sim.num_clients - 1), whole("version", 0, version)
    dispatch, n = whole("dispatch", 0, sim.dispatches - 1), whole("num_examples", 0, 2**62)
    start, finish = d["start"], d["finish"]
    for name, v in (("start", start), ("finish", finish)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise bad(f"{at}/{name}", f"must be a finite number, got {v!r}")
    if not 0 <= start <= sim.time <= finish:
        raise bad(at, f"must start at or before the time {sim.time} and finish at or after it ({start}, {finish})")
    if not isinstance(d["dropped"], bool) or not (d["rejected"] is None or isinstance(d["rejected"], str)):
        raise bad(at, "dropped must be true/false and rejected null or a reason")
    loss, delta = d["loss_after"], d["delta"]
    if loss is not None and not (isinstance(loss, (int, float)) and not isinstance(loss, bool)):
        raise bad(f"{at}/loss_after", f"must be null or a number, got {loss!r}")
    carries = not d["dropped"] and d["rejected"] is None
    if not isinstance(delta, dict) or (not carries and delta) or (carries and not delta):
        raise bad(f"{at}/delta", "must hold the update exactly when the job neither dropped nor was rejected")
    for k, v in delta.items():
        ref = params.get(k)
        if ref is None or not isinstance(v, Tensor) or v.shape != ref.shape or v.dtype != ref.dtype:
            raise bad(f"{at}/delta/{k}", "does not match the model's parameter of that name")
    result = ClientResult(client, dict(delta), n, loss_after=None if loss is None else float(loss)) if carries else None
    return Job(client, ver, dispatch, float(start), float(finish), d["dropped"], d["rejected"], result)


def check_options(fed: Any) -> FedBuff | None:
    """The run's asynchronous mode (None for ``asynchronous='none'``), its ``async_options``
    checked (an unknown option or a bad value is a :class:`ConfigError` naming it), and the run's
    other settings checked against it: a combination FedBuff's simulation does not support is one
    :class:`ConfigError` line. Cheap: the config calls it.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> check_options(NS(asynchronous="none", options_of=lambda name: {})) is None
        True
    """
    options = fed.options_of("async_options")
    if fed.asynchronous == "none":
        if options:
            raise ConfigError("async_options is given but asynchronous is 'none'")
        return None
    mode = ASYNC_MODES.build(fed.asynchronous, **options)
    name = f"asynchronous {fed.asynchronous!r}"
    refusals = [
        (fed.dp_noise_multiplier > 0,
         "differential privacy: the accountant assumes synchronous Poisson-sampled rounds"),
        (fed.personalize != "none" or fed.client_test_fraction > 0,
         "personalize or client_test_fraction: personal state and per-client evaluation are round-based"),
        (fed.cluster != "none", "cluster: clustered FL steps one model per cluster every round"),
        (fed.straggler_deadline > 0, "straggler_deadline: the simulated latencies model stragglers (async_options)"),
        (fed.clients_per_round != 0 or fed.client_fraction != 1.0,
         "clients_per_round or client_fraction: async_options concurrency sets how many clients train at once"),
        (getattr(fed, "availability", "uniform") != "uniform"
         or getattr(fed, "participation_correction", "none") != "none",
         "availability models and participation corrections: they are per-round"),
        (fed.trainable != "head" and fed.lora_mode in EXACT_MODES,
         f"lora_mode {fed.lora_mode!r}: the exact LoRA modes fold a round's factors into the base weights; use "
         "factors or frozen_a"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"{name} cannot run with {why}")
    if type(make_recipe(fed.recipe).aggregator) is not WeightedMean:
        raise ConfigError(
            f"{name} cannot run recipe {fed.recipe!r}: FedBuff's step is a staleness-weighted mean, not that "
            "recipe's aggregator (use fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad or ghbm)"
        )
    if mode.buffer_size > fed.num_clients:
        raise ConfigError(
            f"{name}: buffer_size={mode.buffer_size} exceeds num_clients={fed.num_clients} (a buffer holds one "
            "update per client)"
        )
    if fed.min_clients > mode.buffer_size:
        raise ConfigError(f"{name}: min_clients={fed.min_clients} exceeds buffer_size={mode.buffer_size}")
    return mode


def _trainer(run: Any, state: Any) -> Train:
    """Dispatched clients' updates from ``state`` (their version's model), validated at once."""

    def train(clients: list[int], version: int) -> tuple[list[ClientResult], dict[int, str]]:
        set_round(run.data.batchers, version)  # temporal skew: a round is a server step
        results = run.train_clients(state, clients, version)
        if any(not r.delta for r in results):  # federated.vectorized's streamed round mean keeps no update
            raise RuntimeError("the clients' updates were summed as they trained; FedBuff holds each until it arrives")
        _, rejected = run.validate(state, results)
        return results, {r["client"]: r["reason"] for r in rejected}

    return train


def _server_step(run: Any, mode: FedBuff, state: Any, buffer: list[tuple[Job, int]], step: int, record: dict) -> Any:
    """FedBuff's step on the buffer (update attacks applied first, then validated), the recipe's
    server transform on top; a step with too few valid updates or a value that is not finite is
    not taken (the record says why). Returns the state after the step (round ``step + 1``)."""
    fed = run.fed
    staleness = {j.client: tau for j, tau in buffer}
    results = run.attack([j.result for j, _ in buffer], attackers(fed), step)
    accepted, rejected = run.validate(state, results)
    record["rejected"] = record.get("rejected", []) + rejected
    record["upload_bytes"] = {"per_client": run.comm["sent_bytes"], "dense": run.comm["dense_bytes"]}
    new = None
    if len(accepted) < max(1, fed.min_clients):
        record["skipped"] = f"{len(accepted)} valid updates < min_clients={fed.min_clients}"
    else:
        sizes = [max(1, r.num_examples) for r in accepted]
        weights = run.recipe.aggregator.effective_weights(sizes, len(sizes)) if mode.weighting == "recipe" else None
        agg = fedbuff_aggregate(
            [r.delta for r in accepted], [staleness[r.client] for r in accepted], mode.staleness, mode.normalize,
            weights,
        )  # fmt: skip
        params, opt_state, _ = server_update(
            run.recipe, [r.delta for r in accepted], None, state.opt_state, state.params, aggregated=agg,
            round_index=step,
        )  # fmt: skip
        bad = first_non_finite({"params": dict(params), "opt_state": opt_state}, sep="/")
        if bad is not None:
            record["skipped"] = f"the server step gave a value that is not finite ({bad}); the model is not stepped"
        else:
            new = {k: params[k] for k in state.params}, opt_state
            record["aggregator_info"] = {"weights": agg.info["weights"]}
    record["server_step"] = new is not None
    skipped = list(state.skipped_rounds) + ([] if new is not None else [step + 1])
    params, opt_state = new if new is not None else (state.params, state.opt_state)
    if any(r.loss_after is not None for r in accepted):
        record["client_loss_after"] = {str(r.client): r.loss_after for r in accepted}
        record["loss_after"] = fairness([r.loss_after for r in accepted if r.loss_after is not None])
    return dataclasses.replace(state, round=step + 1, params=params, opt_state=opt_state, skipped_rounds=skipped)


def run_async(
    run: Any,
    *,
    head: Any = None,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    log: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> tuple[Any, Any]:
    """Run (or resume) an asynchronous federation; return the final server state and the model,
    as :func:`~asymvlm.federated.rounds.run_federated` does (which calls this for
    ``fed.asynchronous != 'none'``; ``fed.rounds`` counts server steps).

    Args:
        run: the built ``Federation`` (:meth:`asymvlm.federated.rounds.Federation.build`).
        head: the head's config (identifies the run in its checkpoints).
        evaluate: ``evaluate(model) -> metrics`` every ``eval_every`` steps and after the last.
        log: called with every step's record (also appended to ``metrics.jsonl``): ``round``, the
            ``clients`` whose updates were applied and their ``staleness``, ``sim_time``, the clients
            ``dispatched``, ``dropped``, ``stale_dropped`` and ``rejected`` since the last step,
            ``in_flight``, the aggregation ``weights``, losses, evaluation and ``seconds``.
        stop_after: end after that many steps of this call (tests simulate a crash).
    """
    fed = run.fed
    mode = check_options(fed)
    if mode is None:
        raise ConfigError("run_async needs an asynchronous mode (asynchronous='fedbuff')")
    if type(run.recipe.aggregator) is not WeightedMean:  # the options may not change it; checked again
        raise ConfigError(f"asynchronous {fed.asynchronous!r} cannot run recipe {fed.recipe!r} (module docstring)")
    if hasattr(run, "streams"):  # FedBuff holds every update until it arrives: no streamed round mean
        run.streams = lambda: False
    config = run.config(head)
    state = run.start(config, log)
    out = Path(fed.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim = AsyncSimulation(mode, fed.num_clients, fed.seed, fed.dropout_prob)
    if state.round > 0:
        where = out / "checkpoints" / f"round-{state.round:06d}" / "server.json"
        sim = sim_from_extra(state.extra, sim, state.params, state.round, where)
    if log:
        log({"event": "communication per client and round", **run.comm})
    bar = tqdm(range(state.round, fed.rounds), initial=state.round, total=fed.rounds, desc="server steps",
               disable=not fed.progress)  # fmt: skip
    for done_here, step in enumerate(bar, 1):
        t0 = time.time()
        train = _trainer(run, state)
        sim.fill(step, train)  # the free slots get the current model (version = server steps so far)
        sim.advance(step, train)
        buffer, events = sim.take()
        record: dict[str, Any] = {
            "round": step + 1, "clients": [j.client for j, _ in buffer], "staleness": [tau for _, tau in buffer],
            "sim_time": sim.time, "dispatched": events["dispatched"], "dropped": events["dropped"],
            "stale_dropped": events["stale_dropped"], "rejected": events["rejected"], "in_flight": len(sim.jobs),
        }  # fmt: skip
        if fed.diagnostics:
            record["diagnostics"] = run.diagnostics(state, [j.result for j, _ in buffer], step)
        state = _server_step(run, mode, state, buffer, step, record)
        state.extra = sim.to_extra()
        if fed.evaluates_at(step + 1, fed.rounds):
            record.update(run.client_losses(state))
            if evaluate is not None:
                run.model.set_params(state.params)
                record.update(evaluate(run.model))
        record["seconds"] = round(time.time() - t0, 3)
        if "skipped" in record:
            log_.warning("server step %d was not taken: %s", step + 1, record["skipped"])
        run.save_round(state, record, config)
        if log:
            log(record)
        bar.set_postfix(loss=f"{record.get('loss_after', {}).get('mean', float('nan')):.3f}", t=f"{sim.time:.1f}")
        if stop_after is not None and done_here >= stop_after:
            break
    run.model.set_params(state.params)
    return state, run.model
