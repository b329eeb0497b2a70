"""Who can take part, and correcting the aggregate for it: client availability models and
participation corrections.

**Availability** (:data:`AVAILABILITY`, ``--availability NAME --availability_options '{...}'``):
``uniform`` is today's uniform sample of the round's size (:func:`~asymvlm.federated.sampling.sample_clients`);
the others give every client ``n`` its own availability ``p_n``, planted by ``p_min``, ``p_max``,
``spread`` (``log``: log-uniformly spaced, ``linear``) and ``order`` (``index``: increasing with the
client index, so it can correlate with an index-ordered partition and is the same for every seed;
``shuffled``: a permutation fixed for the run by the seed). The round's participants are the
available clients (``cap``: at most the round's size, a uniform choice among them). The patterns
are FedAU's (Wang & Ji 2023, https://arxiv.org/abs/2306.03401, Bernoulli, Markovian, cyclic):

* ``bernoulli`` — client ``n`` is available each round independently with probability ``p_n``.
* ``markov`` — on/off with memory: each round a client keeps last round's state with probability
  ``persistence`` and otherwise draws a fresh Bernoulli(``p_n``) state, i.e. a two-state Markov
  chain with ``P(on -> off) = (1 - persistence)(1 - p_n)``, ``P(off -> on) = (1 - persistence) p_n``,
  stationary availability ``p_n``, started from it. *Stateless*: the state at round ``t`` is the fresh
  draw of the last round ``s <= t`` that redrew, found by looking back through the per-round draws
  (about ``1 / (1 - persistence)`` rounds), so nothing is stored and a resumed run replays it.
* ``cyclic`` — on for ``round(cycle * p_n)`` consecutive rounds (at least 1) of every ``cycle``, at
  a phase of its own fixed by the seed (the availability is that count / ``cycle``).

Every draw comes from :func:`~asymvlm.federated.seeds.seed_sequence` ``(seed, "availability", use, t)``:
``use`` 1 the states of round ``t``, 2 the cap's choice in round ``t``, 3 the shuffle and 4 the
phases (``t = 0``, fixed for the run); a function of ``(seed, round)`` only. Every key has the same
length and a non-zero ``use``: NumPy's SeedSequence pads the entropy with zeros, so ``(seed, id)``
and ``(seed, id, 0)`` are the *same* stream.

**Corrections** (:data:`PARTICIPATION_CORRECTIONS`, ``--participation_correction NAME``): each has
``init(num_clients, params) -> state`` (a dict of tensors, the server state's
``extra["participation"]``, checkpointed), ``aggregate(deltas, clients, weights, state, num_clients,
rnd) -> (AggregateResult, state)`` (passed to :func:`~asymvlm.federated.core.server_update` as
``aggregated=``) and ``observe(state, clients, num_clients)`` (a round without a server step still
counts for the participation estimate). ``q_n`` is client ``n``'s share of the objective: its
weight over ``population_weight`` (the sum over all clients), or ``1 / N`` without weights (the paper).

* ``fedau`` — FedAU (Wang & Ji 2023), Algorithm 1: every client's aggregation weight ``omega_n`` is
  its online average participation interval, intervals cut off at ``K``; the aggregate is
  ``sum_{n in S_t} q_n omega_n Delta_n`` (``(1/N) sum omega_n Delta_n`` in the paper).
* ``fedstale`` — FedStale (Rodio & Neglia 2024, https://arxiv.org/abs/2405.04171): the server keeps
  each client's last update ``h_n``; the aggregate is ``sum_{n in S_t} (q_n / p_n)(Delta_n - beta h_n)
  + beta sum_n q_n h_n`` (``beta`` 0: FedAvg with unbiased weights, 1: FedVARP); ``p_n`` is FedAU's
  estimate ``1 / omega_n`` (the authors' code for unknown probabilities) or the round's fraction.
  It holds one delta per client: ``num_clients x`` the exchanged parameters, twice while a round
  updates it, refused above ``max_memory_mb``.

Example (three rounds of FedAU with two clients; client 1 takes part every other round):
    >>> import torch
    >>> fedau = PARTICIPATION_CORRECTIONS.build("fedau", cutoff=10)
    >>> state = fedau.init(2)
    >>> for rnd, clients in enumerate([[0, 1], [0], [0, 1]]):
    ...     deltas = [{"x": torch.ones(1)} for _ in clients]
    ...     agg, state = fedau.aggregate(deltas, clients, None, state, 2, rnd)
    ...     print(agg.info["omega"], agg.delta["x"].item())
    [1.0, 1.0] 1.0
    [1.0] 0.5
    [1.0, 1.0] 1.0
    >>> state["omega"].tolist()  # client 1's intervals: 1, then 2
    [1.0, 1.5]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from asymvlm.errors import ArtefactError, ConfigError, InputError
from asymvlm.federated.core import EXACT_MODES, AggregateResult, Sum, WeightedMean
from asymvlm.federated.seeds import seed_sequence
from asymvlm.registry import Param, Registry, at_least, in_range

__all__ = [
    "corrected_aggregate",
    "AVAILABILITY",
    "PARTICIPATION_CORRECTIONS",
    "STATE_KEY",
    "Availability",
    "Bernoulli",
    "Markov",
    "Cyclic",
    "Correction",
    "FedAU",
    "FedStale",
    "planted_probabilities",
    "available_clients",
    "make_availability",
    "make_correction",
    "check_options",
    "check_recipe",
    "fedau_weights",
]

STATE_KEY = "participation"  # ServerState.extra[STATE_KEY]: the correction's state


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------
def planted_probabilities(
    num_clients: int, p_min: float, p_max: float, spread: str = "log", order: str = "index", seed: int = 0
) -> np.ndarray:
    """Every client's availability ``p_n`` in float64: ``spread`` ``log`` spaces them log-uniformly
    from ``p_min`` (client 0) to ``p_max`` (client N-1), ``linear`` evenly; ``order`` ``shuffled``
    permutes them by a permutation of ``seed`` (fixed for the run).

    Example:
        >>> planted_probabilities(3, 0.1, 0.4).round(6).tolist()
        [0.1, 0.2, 0.4]
    """
    u = np.arange(num_clients, dtype=np.float64) / max(1, num_clients - 1)
    p = p_min * (p_max / p_min) ** u if spread == "log" else p_min + (p_max - p_min) * u
    if order == "shuffled":
        p = p[np.random.default_rng(seed_sequence(seed, "availability", 3, 0)).permutation(num_clients)]
    return p


def _round_draws(seed: int, rnd: int, count: int, num_clients: int) -> np.ndarray:
    """``count`` arrays of ``num_clients`` uniforms of round ``rnd``'s availability stream."""
    return np.random.default_rng(seed_sequence(seed, "availability", 1, rnd)).random((count, num_clients))


@dataclass(frozen=True)
class Availability:
    """``uniform``: a uniform sample of the round's size (drawn by ``sample_clients`` itself)."""

    name: ClassVar[str] = "uniform"

    def probabilities(self, num_clients: int, seed: int) -> np.ndarray | None:
        """Every client's long-run availability (None: a uniform sample of fixed size)."""
        return None

    def mask(self, num_clients: int, seed: int, rnd: int) -> np.ndarray:
        """Round ``rnd``'s availability of every client, a bool array (a function of ``(seed, rnd)``)."""
        raise ConfigError("availability 'uniform' is sampled by sample_clients (a uniform sample of the round's size)")


@dataclass(frozen=True)
class Bernoulli(Availability):
    """Independent availability ``p_n`` every round (module docstring)."""

    p_min: float = 0.05
    p_max: float = 0.9
    spread: Literal["log", "linear"] = "log"
    order: Literal["index", "shuffled"] = "index"
    cap: bool = False
    name: ClassVar[str] = "bernoulli"

    def __post_init__(self) -> None:
        if self.p_min > self.p_max:
            raise ConfigError(f"availability {self.name!r}: p_min={self.p_min} exceeds p_max={self.p_max}")

    def probabilities(self, num_clients, seed):
        return planted_probabilities(num_clients, self.p_min, self.p_max, self.spread, self.order, seed)

    def mask(self, num_clients, seed, rnd):
        return _round_draws(seed, rnd, 1, num_clients)[0] < self.probabilities(num_clients, seed)


@dataclass(frozen=True)
class Markov(Bernoulli):
    """On/off availability with memory ``persistence`` (module docstring)."""

    persistence: float = 0.8
    name: ClassVar[str] = "markov"

    def mask(self, num_clients, seed, rnd):
        p = self.probabilities(num_clients, seed)
        out = np.zeros(num_clients, dtype=bool)
        todo = np.ones(num_clients, dtype=bool)  # clients whose last redraw is not found yet
        for s in range(rnd, -1, -1):  # back from round rnd: the state is the last fresh draw
            keep, fresh = _round_draws(seed, s, 2, num_clients)
            redrew = todo & ((keep >= self.persistence) | (s == 0))  # round 0 starts from the stationary law
            out[redrew] = fresh[redrew] < p[redrew]
            todo &= ~redrew
            if not todo.any():
                break
        return out


@dataclass(frozen=True)
class Cyclic(Bernoulli):
    """On for ``round(cycle * p_n)`` rounds of every ``cycle`` at a phase of the seed (module docstring)."""

    cycle: int = 20
    name: ClassVar[str] = "cyclic"

    def on_rounds(self, num_clients: int, seed: int) -> np.ndarray:
        p = planted_probabilities(num_clients, self.p_min, self.p_max, self.spread, self.order, seed)
        return np.clip(np.rint(self.cycle * p), 1, self.cycle).astype(np.int64)

    def probabilities(self, num_clients, seed):
        return self.on_rounds(num_clients, seed) / self.cycle

    def mask(self, num_clients, seed, rnd):
        phase = np.random.default_rng(seed_sequence(seed, "availability", 4, 0)).integers(0, self.cycle, num_clients)
        return (rnd + phase) % self.cycle < self.on_rounds(num_clients, seed)


AVAILABILITY = Registry("availability model")
_FEDAU_REF = "Wang & Ji 2023, https://arxiv.org/abs/2306.03401 (participation patterns of the experiments)"
_OPEN_UNIT = in_range(0, 1, lo_open=True)
_PLANT = [
    Param("p_min", float, 0.05, "Smallest availability (client 0 for order=index).", check=_OPEN_UNIT),
    Param("p_max", float, 0.9, "Largest availability (client N-1 for order=index).", check=_OPEN_UNIT),
    Param("spread", Literal["log", "linear"], "log", "How p_n spreads over clients: log-uniformly or evenly."),
    Param(
        "order", Literal["index", "shuffled"], "index",
        "p_n increasing with the client index (the same for every seed), or permuted by the seed.",
    ),
    Param("cap", bool, False, "At most the round's size (clients_per_round / client_fraction) of the available."),
]  # fmt: skip
AVAILABILITY.register("uniform", help="A uniform sample of the round's size (the default).")(Availability)
AVAILABILITY.register(
    "bernoulli", params=_PLANT, help="Client n available each round with probability p_n.", reference=_FEDAU_REF
)(Bernoulli)
AVAILABILITY.register(
    "markov",
    params=[
        *_PLANT,
        Param(
            "persistence", float, 0.8, "Probability of keeping last round's on/off state (0: Bernoulli).",
            check=in_range(0, 0.99),
        ),
    ],
    help="On/off Markov chain per client with stationary availability p_n.",
    reference=_FEDAU_REF,
)(Markov)  # fmt: skip
AVAILABILITY.register(
    "cyclic",
    params=[*_PLANT, Param("cycle", int, 20, "Cycle length in rounds.", check=at_least(2))],
    help="On for round(cycle * p_n) consecutive rounds of every cycle, at a phase of the seed.",
    reference=_FEDAU_REF,
)(Cyclic)


def make_availability(fed: Any) -> Availability:
    """``fed.availability`` with ``fed.availability_options`` (unknown ones are a ConfigError)."""
    return AVAILABILITY.build(fed.availability, **fed.options_of("availability_options"))


def available_clients(fed: Any, rnd: int) -> tuple[list[int], list[int]]:
    """Round ``rnd``'s ``(participants, available)`` under a non-uniform availability model: the
    available clients, with ``cap`` a uniform choice of the round's size among them.

    Example:
        >>> from asymvlm.federated.config import FederatedArguments
        >>> fed = FederatedArguments(num_clients=6, availability="bernoulli",
        ...                          availability_options='{"p_min": 0.99, "p_max": 0.99}')
        >>> available_clients(fed, 0)[0]
        [0, 1, 2, 3, 4, 5]
    """
    model = make_availability(fed)
    avail = np.flatnonzero(model.mask(fed.num_clients, fed.seed, rnd)).tolist()
    m = round(fed.sample_rate * fed.num_clients)
    if not getattr(model, "cap", False) or len(avail) <= m:
        return avail, avail
    rng = np.random.default_rng(seed_sequence(fed.seed, "availability", 2, rnd))
    return sorted(rng.choice(avail, size=m, replace=False).tolist()), avail


# ----------------------------------------------------------------------------------------------
# corrections
# ----------------------------------------------------------------------------------------------
def fedau_weights(state: Mapping[str, Tensor], clients: Sequence[int], cutoff: int) -> dict[str, Tensor]:
    """FedAU's estimator after round ``t`` (Wang & Ji 2023, Algorithm 1, lines "S_n <- S_n + 1" to
    the weight update), for every client at once: the running interval ``S_n`` grows by one; a
    client that took part, or whose interval reached the cutoff ``K``, closes it: ``omega_n``
    becomes the average of its closed intervals (``S_n`` itself for the first), ``M_n`` counts
    them and ``S_n`` restarts at 0. ``omega_n`` starts at 1 and round ``t`` uses the value after
    round ``t - 1`` (the authors' code, https://github.com/IBM/fedau, ``main.py``: "interval used
    in the next round"), so a weight never depends on its own round's participation."""
    omega, count, length = state["omega"], state["intervals"], state["length"] + 1
    took_part = torch.zeros_like(length, dtype=torch.bool)
    took_part[list(clients)] = True
    close = took_part | (length >= cutoff)
    mean = torch.where(count == 0, length, (count * omega + length) / (count + 1))
    return {
        "omega": torch.where(close, mean, omega),
        "intervals": count + close.double(),
        "length": torch.where(close, torch.zeros_like(length), length),
    }


def _shares(weights: Sequence[float] | None, n: int, num_clients: int, population_weight: float | None) -> Tensor:
    """``q_n`` of the participants, float64: weight / population_weight, or 1/N without weights."""
    if weights is None:
        return torch.full((n,), 1.0 / num_clients, dtype=torch.float64)
    if population_weight is None or not population_weight > 0:
        raise InputError(
            "participation weights need population_weight (the sum of every client's weight, > 0): the objective's "
            f"shares q_n = weight / population_weight; got {population_weight!r}"
        )
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.shape != (n,) or not bool(torch.isfinite(w).all() & (w >= 0).all()):
        raise InputError(f"{n} finite weights >= 0 needed, got {list(weights)}")
    return w / float(population_weight)


def _flat(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _check_clients(clients: Sequence[int], n_deltas: int, num_clients: int) -> list[int]:
    out = [int(c) for c in clients]
    if len(out) != n_deltas or not out:
        raise InputError(f"{len(out)} clients for {n_deltas} deltas (one client per delta, at least one)")
    bad = [c for c in out if not 0 <= c < num_clients]
    if bad or len(set(out)) != len(out):
        raise InputError(f"clients must be distinct ids in [0, {num_clients}), got {out}")
    return out


@dataclass(frozen=True)
class Correction:
    """The base of a participation correction (FedAU's participation estimate, shared by both)."""

    cutoff: int = 100
    name: ClassVar[str] = ""

    def init(self, num_clients: int, params: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """The state before round 0 (``ServerState.extra[STATE_KEY]``)."""
        # M_n and S_n are whole numbers kept in float64 (exact below 2^53; checkpoints hold floating tensors)
        return {
            "omega": torch.ones(num_clients, dtype=torch.float64),
            "intervals": torch.zeros(num_clients, dtype=torch.float64),
            "length": torch.zeros(num_clients, dtype=torch.float64),
        }

    def observe(self, state: Mapping[str, Any], clients: Sequence[int], num_clients: int) -> dict[str, Any]:
        """The state after a round in which ``clients`` took part (a round without a server step too)."""
        return {**state, **fedau_weights(state, clients, self.cutoff)}

    def check_state(self, state: Any, num_clients: int, params: Mapping[str, Tensor] | None, where: Any) -> None:
        """A loaded state has this correction's layout: the keys, shapes and dtypes of :meth:`init`'s
        (an :class:`~asymvlm.errors.ArtefactError` naming ``where`` and the entry otherwise)."""
        want, got = _flat(self.init(num_clients, params)), _flat(state) if isinstance(state, dict) else {}
        if set(want) != set(got):
            raise ArtefactError(f"{where}: the {self.name} state must hold {sorted(want)}, got {sorted(got)}")
        for key, ref in want.items():
            t = got[key]
            if not isinstance(t, Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
                raise ArtefactError(
                    f"{where}: {self.name} state {key!r} must be a {ref.dtype} tensor {tuple(ref.shape)}"
                )

    def aggregate(
        self,
        deltas: Sequence[Mapping[str, Tensor]],
        clients: Sequence[int],
        weights: Sequence[float] | None,
        state: Mapping[str, Any],
        num_clients: int,
        rnd: int,
        *,
        population_weight: float | None = None,
    ) -> tuple[AggregateResult, dict[str, Any]]:
        """Round ``rnd``'s corrected aggregate and the state after it (the state given is not changed).

        Args:
            deltas: the participants' updates, one per client of ``clients`` (the same keys).
            clients: the participants' ids (distinct, in ``[0, num_clients)``): every client whose
                update reached the server this round.
            weights: their effective weights (the recipe's ``WeightedMean.effective_weights``), or
                None for the paper's ``q_n = 1 / N``.
            state: the correction's state (:meth:`init`'s the first time).
            population_weight: the sum of every client's effective weight (with ``weights``).
        """
        raise NotImplementedError


@dataclass(frozen=True)
class FedAU(Correction):
    """FedAU (module docstring): ``sum_{n in S_t} q_n omega_n Delta_n``."""

    name: ClassVar[str] = "fedau"

    def coefficients(self, state, clients, weights, num_clients, population_weight=None) -> list[float]:
        """Round ``t``'s multiplier ``q_n omega_n`` of each participant's update: known before the
        updates arrive (``omega_t`` uses participation up to round ``t - 1``), so a streamed sum can use it."""
        omega = state["omega"][list(clients)]
        return (_shares(weights, len(clients), num_clients, population_weight) * omega).tolist()

    def aggregate(self, deltas, clients, weights, state, num_clients, rnd, *, population_weight=None):
        clients = _check_clients(clients, len(deltas), num_clients)
        coeff = self.coefficients(state, clients, weights, num_clients, population_weight)
        delta = Sum()(deltas, coeff).delta  # x_{t+1} = x_t + eta * (1/N) sum omega_n Delta_n (Algorithm 1)
        info = {"omega": state["omega"][clients].tolist(), "weights": coeff}
        return AggregateResult(delta, info), self.observe(state, clients, num_clients)


@dataclass(frozen=True)
class FedStale(Correction):
    """FedStale (module docstring): ``sum_{S_t} (q_n/p_n)(Delta_n - beta h_n) + beta sum_n q_n h_n``."""

    beta: float = 0.5
    probabilities: Literal["estimated", "round"] = "estimated"
    max_memory_mb: int = 1024
    name: ClassVar[str] = "fedstale"

    def init(self, num_clients, params=None):
        if params is None:
            raise InputError("fedstale's state needs the exchanged parameters (one stored update per client)")
        need = 2 * num_clients * sum(v.numel() * v.element_size() for v in params.values())
        if need > self.max_memory_mb * 2**20:
            raise ConfigError(
                f"participation correction 'fedstale' stores one update per client: {num_clients} clients x "
                f"{need // (2 * num_clients) / 2**20:.1f} MiB, twice while a round updates it = {need / 2**20:.0f} "
                f"MiB > max_memory_mb={self.max_memory_mb}; raise max_memory_mb or use fedau (no stored updates)"
            )
        stale = {k: torch.zeros((num_clients, *v.shape), dtype=v.dtype) for k, v in params.items()}
        return {**super().init(num_clients), "stale": stale, "share": torch.zeros(num_clients, dtype=torch.float64)}

    def aggregate(self, deltas, clients, weights, state, num_clients, rnd, *, population_weight=None):
        clients = _check_clients(clients, len(deltas), num_clients)
        stale, share = state["stale"], state["share"]
        q = _shares(weights, len(clients), num_clients, population_weight)
        if self.probabilities == "estimated":  # 1 / p_n = omega_n: FedAU's estimate (the FedStale authors' code)
            inv_p = state["omega"][clients]
        else:  # p_n = |S_t| / N: exact for a uniform sample of fixed size
            inv_p = torch.full_like(q, num_clients / len(clients))
        w = q * inv_p
        index = torch.tensor(clients, dtype=torch.long)
        out, new_stale = {}, {}
        for key, h in stale.items():
            if any(key not in d for d in deltas) or any(d[key].shape != h.shape[1:] for d in deltas):
                raise InputError(f"every update must carry {key!r} of shape {tuple(h.shape[1:])} (fedstale's store)")
            # beta sum_n q_n h_n over every client, then the participants' fresh-minus-stale terms
            acc = torch.tensordot(share.to(h.dtype), h, dims=1) * self.beta
            for wi, d, c in zip(w.tolist(), deltas, clients):
                acc.add_(d[key].to(h.dtype) - self.beta * h[c], alpha=wi)
            out[key] = acc
            new_stale[key] = h.index_copy(0, index, torch.stack([d[key].to(h.dtype) for d in deltas]))
        new_share = share.index_copy(0, index, q)
        new_state = {**self.observe(state, clients, num_clients), "stale": new_stale, "share": new_share}
        info = {"weights": w.tolist(), "beta": self.beta, "stale_clients": int((share > 0).sum())}
        return AggregateResult(out, info), new_state


PARTICIPATION_CORRECTIONS = Registry("participation correction")
_CUTOFF = Param(
    "cutoff", int, 100,
    "K: a participation interval is closed after K rounds without taking part (bias of 1/p_n about (1-p_n)^K).",
    check=at_least(1), reference="https://arxiv.org/abs/2306.03401",
)  # fmt: skip
PARTICIPATION_CORRECTIONS.register(
    "fedau",
    params=[_CUTOFF],
    help="FedAU: each update weighted by its client's online average participation interval.",
    reference="Wang & Ji 2023, https://arxiv.org/abs/2306.03401 (code: https://github.com/IBM/fedau)",
)(FedAU)
PARTICIPATION_CORRECTIONS.register(
    "fedstale",
    params=[
        _CUTOFF,
        Param("beta", float, 0.5, "Weight of the stale updates: 0 = FedAvg (unbiased), 1 = FedVARP.",
              check=in_range(0, 1)),
        Param("probabilities", Literal["estimated", "round"], "estimated",
              "p_n: FedAU's estimate 1/omega_n, or the round's fraction |S_t|/N (uniform samples)."),
        Param("max_memory_mb", int, 1024, "Refuse above this much memory for the stored updates (MiB).",
              check=at_least(1)),
    ],
    help="FedStale: fresh updates of the participants and beta x the stored updates of everyone.",
    reference="Rodio & Neglia 2024, https://arxiv.org/abs/2405.04171 (code: https://github.com/arodio/FedStale)",
)(FedStale)  # fmt: skip


def make_correction(fed: Any) -> Correction | None:
    """``fed.participation_correction`` with its options; None for ``none``."""
    if fed.participation_correction == "none":
        return None
    return PARTICIPATION_CORRECTIONS.build(fed.participation_correction, **fed.options_of("participation_options"))


def check_options(fed: Any) -> None:
    """The availability and participation options of a run (``FederatedArguments._check_scale``).

    Raises:
        ConfigError: an unknown model, correction or option (named); options given to ``none``;
            a correction or a non-uniform availability under differential privacy; a correction
            with clustered FL or an exact LoRA aggregation mode.

    Example:
        >>> from types import SimpleNamespace
        >>> fed = SimpleNamespace(availability="bernoulli", participation_correction="fedau",
        ...     dp_noise_multiplier=1.0, cluster="none", trainable="head", lora_mode="factors",
        ...     options_of=lambda name: {})
        >>> check_options(fed)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: participation_correction 'fedau' cannot run under differential privacy: ...
    """
    AVAILABILITY.resolve(fed.availability, fed.options_of("availability_options"))
    name, options = fed.participation_correction, fed.options_of("participation_options")
    if name != "none":
        PARTICIPATION_CORRECTIONS.resolve(name, options)
    elif options:
        raise ConfigError("participation_options is given but participation_correction is 'none'")
    if fed.dp_noise_multiplier > 0 and name != "none":
        raise ConfigError(
            f"participation_correction {name!r} cannot run under differential privacy: the mechanism bounds a sum "
            "of updates clipped to dp_max_norm with unit weights, sampled by Poisson sampling at a known, uniform "
            "rate (under which the mean is already unbiased); FedAU multiplies a client's update by its interval "
            "estimate (up to cutoff), raising that client's sensitivity, and FedStale re-releases stored updates in "
            "rounds the client was not sampled in, which the accountant does not count: a real loss of privacy, "
            "not a formality"
        )
    if fed.dp_noise_multiplier > 0 and fed.availability != "uniform":
        raise ConfigError(
            f"availability {fed.availability!r} cannot run under differential privacy: the accountant assumes "
            "Poisson sampling of every client at the same rate (sample_rate); leave availability 'uniform'"
        )
    if name != "none" and fed.cluster != "none":
        raise ConfigError(f"participation_correction {name!r} with cluster {fed.cluster!r} is not built yet")
    if name != "none" and fed.trainable != "head" and fed.lora_mode in EXACT_MODES:
        raise ConfigError(
            f"participation_correction {name!r} with lora_mode {fed.lora_mode!r}: the exact LoRA modes fold the "
            "clients' Delta W into the base weights inside the aggregation; use lora_mode factors or frozen_a"
        )


def check_recipe(recipe: Any, correction: Correction | None) -> None:
    """A correction replaces the recipe's aggregator: only a weighted mean's (FedAvg, FedAvgM,
    FedProx, FedAdam, FedYogi, FedAdagrad, GHBM: a ConfigError naming the recipe otherwise)."""
    if correction is not None and type(recipe.aggregator) is not WeightedMean:
        raise ConfigError(
            f"participation_correction {correction.name!r} replaces the weighted mean of the clients' updates; "
            f"recipe {recipe.name!r} aggregates with {type(recipe.aggregator).__name__}"
        )


def corrected_aggregate(
    correction: Correction,
    aggregator: Any,
    results: Sequence[Any],
    extra: Mapping[str, Any],
    num_examples: Sequence[int],
    rnd: int,
) -> tuple[AggregateResult, dict[str, Any]]:
    """A round's corrected aggregate and the server state's new ``extra``: the accepted updates
    (``results``: ``.delta``, ``.client``, ``.num_examples``) weighted by the recipe's weighted
    mean ``aggregator`` (its uniform weighting gives the papers' 1/N, capped its cap), over the
    population of every client's weight (``num_examples``)."""
    eff = aggregator.effective_weights
    raw = [max(1, r.num_examples) for r in results]
    population = sum(eff([max(1, n) for n in num_examples], len(num_examples)))
    agg, state = correction.aggregate(
        [r.delta for r in results], [r.client for r in results], eff(raw, len(raw)), extra[STATE_KEY],
        len(num_examples), rnd, population_weight=population,
    )  # fmt: skip
    return agg, {**extra, STATE_KEY: state}
