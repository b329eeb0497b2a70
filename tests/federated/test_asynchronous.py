"""Asynchronous aggregation (FedBuff): the aggregate against numpy, the event order and staleness
against a hand computation, determinism, resume, the synchronous limit, and bad options."""

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asymvlm.config import ConfigError, DataArguments
from asymvlm.errors import ArtefactError
from asymvlm.federated import rounds
from asymvlm.federated.asynchronous import (
    ASYNC_MODES,
    AsyncSimulation,
    FedBuff,
    check_options,
    fedbuff_aggregate,
    run_async,
    staleness_weights,
)
from asymvlm.federated.client import ClientResult
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.core import WeightedMean, flatten_state
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.rounds import Federation, run_federated
from asymvlm.heads import HeadConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("asynccache") / "c", 120)


HEAD = HeadConfig(hidden_dims=[32], direction="learned")


def fed_args(out, **kw):
    base = dict(
        rounds=4, num_clients=5, local_steps=3, local_batch_size=16, output_dir=str(out), progress=False,
        eval_every=2, local_lr=0.2, asynchronous="fedbuff",
    )  # fmt: skip
    base.update(kw)
    return FederatedArguments(**base)


def build(cache, out, recipe_options=None, **kw):
    fed = fed_args(out, **kw)
    return Federation.build(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), HEAD, recipe_options)


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_seconds(recs):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a, b):
    """Two optimizer states: the same structure and scalars, bit-identical tensors."""
    (ta, sa), (tb, sb) = flatten_state(a), flatten_state(b)
    return sa == sb and same(ta, tb) and len(ta) > 0


# -- the aggregate --------------------------------------------------------------------------------
def test_fedbuff_aggregate_against_numpy():
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(4)]
    tau, sizes = [0, 1, 3, 7], [10.0, 3.0, 8.0, 1.0]
    s = 1.0 / np.sqrt(1.0 + np.array(tau, dtype=np.float64))  # FedBuff's 1/sqrt(1 + tau)
    assert staleness_weights(tau, 0.5) == pytest.approx(s.tolist(), rel=1e-15)
    for normalize, w in (("count", None), ("weights", None), ("count", sizes), ("weights", sizes)):
        wv = np.ones(4) if w is None else np.array(w)
        z = wv.sum() if normalize == "count" else (wv * s).sum()  # Algorithm 1: / K (unit weights)
        agg = fedbuff_aggregate(deltas, tau, 0.5, normalize, w)
        assert agg.info["weights"] == pytest.approx((wv * s / z).tolist(), rel=1e-12)
        for k in ("a", "b"):
            ref = sum(wv[i] * s[i] * deltas[i][k].double().numpy() for i in range(4)) / z
            np.testing.assert_allclose(agg.delta[k].numpy(), ref, rtol=1e-6, atol=1e-7)  # float32 sums
    # no staleness: the recipe's weighted mean, bit for bit; the deltas are not modified
    before = [{k: v.clone() for k, v in d.items()} for d in deltas]
    fresh = fedbuff_aggregate(deltas, [0] * 4, 0.5, "count", sizes)
    mean = WeightedMean()(deltas, sizes)
    assert same(fresh.delta, mean.delta) and fresh.info == mean.info
    assert all(same(a, b) for a, b in zip(deltas, before))
    with pytest.raises(ValueError, match="2 updates and 1 staleness"):
        fedbuff_aggregate(deltas[:2], [0], 0.5)


# -- the event queue against a hand computation ----------------------------------------------------
def f(c, v):
    """A fake update's value: client c trained from model version v."""
    return (c + 1) + 10 * v


def fake_train(clients, version):
    return [ClientResult(c, {"w": torch.tensor([float(f(c, version))], dtype=torch.float64)}, 1) for c in clients], {}


def simulate(monkeypatch, steps, **options):
    """Three clients of speeds 1, 2, 5 (constant latencies), K = 2, all three training at once."""
    monkeypatch.setattr(FedBuff, "client_speeds", lambda self, seed, n: np.array([1.0, 2.0, 5.0]))
    mode = ASYNC_MODES.build("fedbuff", buffer_size=2, concurrency=3, latency="constant", **options)
    sim = AsyncSimulation(mode, 3, seed=0)
    out = []
    for step in range(steps):
        sim.fill(step, fake_train)
        sim.advance(step, fake_train)
        buffer, events = sim.take()
        agg = fedbuff_aggregate([j.result.delta for j, _ in buffer], [t for _, t in buffer], mode.staleness)
        out.append(([(j.client, t) for j, t in buffer], sim.time, events, float(agg.delta["w"])))
    return out


def test_event_order_and_staleness_weights_by_hand(monkeypatch):
    # t=0: clients 0, 1, 2 start from version 0 (finish at 1, 2, 5). t=1: 0 arrives; nobody is idle
    # (0 waits in the buffer). t=2: 1 arrives -> step 1; 0 and 1 restart from version 1 (finish 3, 4).
    # t=3, t=4: 0, 1 arrive -> step 2; they restart from version 2 (finish 5, 6). t=5: 2 (dispatch 2)
    # and 0 (dispatch 5) finish together: the earlier dispatch first; 2 is two steps stale -> step 3.
    steps = simulate(monkeypatch, 3)
    assert [s[0] for s in steps] == [[(0, 0), (1, 0)], [(0, 0), (1, 0)], [(2, 2), (0, 0)]]
    assert [s[1] for s in steps] == [2.0, 4.0, 5.0]
    assert [s[2]["dispatched"] for s in steps] == [[0, 1, 2], [0, 1], [0, 1]]
    hand = [(f(0, 0) + f(1, 0)) / 2, (f(0, 1) + f(1, 1)) / 2, (f(2, 0) / math.sqrt(3) + f(0, 2)) / 2]
    assert [s[3] for s in steps] == pytest.approx(hand, rel=1e-15)  # sum_i s(tau_i) Delta_i / K
    # max_staleness 1 drops client 2's update at t=5; it restarts from version 2 (finish 10) and the
    # third step waits for client 1 (t=6)
    third = simulate(monkeypatch, 3, max_staleness=1)[2]
    assert third[:2] == ([(0, 0), (1, 0)], 6.0)
    assert third[2]["stale_dropped"] == [{"client": 2, "staleness": 2}] and third[2]["dispatched"] == [0, 1, 2]
    assert third[3] == pytest.approx((f(0, 2) + f(1, 2)) / 2, rel=1e-15)


def test_a_run_applies_the_hand_computed_steps(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(FedBuff, "client_speeds", lambda self, seed, n: np.array([1.0, 2.0, 5.0]))

    def train_clients(self, state, active, rnd):
        return [ClientResult(c, {k: torch.full_like(v, f(c, rnd)) for k, v in state.params.items()}, 10, loss_after=1.0)
                for c in active]  # fmt: skip

    monkeypatch.setattr(Federation, "train_clients", train_clients)
    opts = {"buffer_size": 2, "concurrency": 3, "latency": "constant"}
    run = build(cache, tmp_path, rounds=3, num_clients=3, async_options=opts)
    start = run.model.get_params()
    state, _ = run_async(run, head=HEAD)
    hand = (f(0, 0) + f(1, 0)) / 2 + (f(0, 1) + f(1, 1)) / 2 + (f(2, 0) / math.sqrt(3) + f(0, 2)) / 2
    for k, v in state.params.items():  # FedAvg's server step 1 adds each aggregate (float32: tolerance 1e-4)
        torch.testing.assert_close(v - start[k], torch.full_like(v, hand), rtol=0, atol=1e-4)
    recs = [r for r in records(tmp_path) if "round" in r]
    assert [r["clients"] for r in recs] == [[0, 1], [0, 1], [2, 0]]
    assert [r["staleness"] for r in recs] == [[0, 0], [0, 0], [2, 0]]
    assert [r["sim_time"] for r in recs] == [2.0, 4.0, 5.0] and all(r["server_step"] for r in recs)
    assert recs[2]["aggregator_info"]["weights"] == pytest.approx([0.5 / math.sqrt(3), 0.5], rel=1e-15)
    # in flight at the checkpoint: client 1 (since t=4); 0 and 2 are idle until the next step refills
    assert state.round == 3 and [j["client"] for j in state.extra["async"]["jobs"]] == [1]


# -- determinism, resume ----------------------------------------------------------------------------
ASYNC = {"buffer_size": 2, "concurrency": 4, "latency": "pareto", "latency_spread": 1.0}


def test_runs_repeat_and_a_killed_run_resumes_bit_identically(cache, tmp_path):
    kw = dict(recipe="fedadam", dropout_prob=0.2, async_options=ASYNC)
    full, _ = run_async(build(cache, tmp_path / "a", {"server_lr": 0.05}, **kw), head=HEAD)
    again, _ = run_async(build(cache, tmp_path / "b", {"server_lr": 0.05}, **kw), head=HEAD)
    assert same(full.params, again.params)
    assert without_seconds(records(tmp_path / "a")) == without_seconds(records(tmp_path / "b"))
    part, _ = run_async(build(cache, tmp_path / "c", {"server_lr": 0.05}, **kw), head=HEAD, stop_after=2)
    assert part.round == 2 and part.extra["async"]["jobs"]  # updates in flight are checkpointed
    resumed, _ = run_async(build(cache, tmp_path / "c", {"server_lr": 0.05}, resume=True, **kw), head=HEAD)
    assert resumed.round == 4 and same(full.params, resumed.params)
    assert same_state(full.opt_state, resumed.opt_state)
    a, c = (without_seconds([r for r in records(tmp_path / x) if "round" in r]) for x in "ac")
    assert a == c
    assert any(t > 0 for r in a for t in r["staleness"])  # stale updates were applied
    assert sum(len(r["dispatched"]) for r in a) > 4 * 2  # more dispatches than applied updates (dropouts, flight)


def test_a_tampered_async_state_is_refused_on_resume(cache, tmp_path):
    run_async(build(cache, tmp_path, rounds=2, async_options=ASYNC), head=HEAD)
    meta = tmp_path / "checkpoints" / "round-000002" / "server.json"
    doc = json.loads(meta.read_text())
    doc["extra"]["__dict__"]["async"]["__dict__"]["time"] = -1.0
    meta.write_text(json.dumps(doc))
    with pytest.raises(ArtefactError, match=r"round-000002/server.json: extra/async/time must be a finite number >= 0"):
        run_async(build(cache, tmp_path, rounds=3, resume=True, async_options=ASYNC), head=HEAD)


# -- the synchronous limit ----------------------------------------------------------------------------
def test_buffer_of_every_client_at_equal_speeds_is_the_synchronous_run(cache, tmp_path):
    # K = concurrency = num_clients, equal constant latencies, no dropouts: every step applies every
    # client's update trained from the current model (staleness 0), in client order, with the
    # synchronous round's seeds; FedBuff's weights (recipe weighting: example counts) are the recipe's
    # mean's, so parameters, optimizer state and per-client losses equal the synchronous run's bit for bit
    opts = {"buffer_size": 5, "concurrency": 5, "latency": "constant", "latency_spread": 0.0, "weighting": "recipe"}
    kw = dict(rounds=3, recipe="fedadam", client_batch="1")
    fed = fed_args(tmp_path / "sync", asynchronous="none", **kw)
    sync, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HEAD)
    fedbuff, _ = run_async(build(cache, tmp_path / "async", async_options=opts, **kw), head=HEAD)
    assert same(sync.params, fedbuff.params)
    assert same_state(sync.opt_state, fedbuff.opt_state)
    s, a = ([r for r in records(tmp_path / x) if "round" in r] for x in ("sync", "async"))
    assert [r["client_loss_after"] for r in s] == [r["client_loss_after"] for r in a]
    assert [r["aggregator_info"] for r in s] == [r["aggregator_info"] for r in a]
    assert all(r["clients"] == list(range(5)) and r["staleness"] == [0] * 5 for r in a)
    assert [r["sim_time"] for r in a] == [1.0, 2.0, 3.0]


@pytest.mark.skipif(
    "run_async" not in inspect.getsource(rounds), reason="run_federated does not dispatch to run_async yet"
)
def test_run_federated_runs_fedbuff(cache, tmp_path):
    fed = fed_args(tmp_path, rounds=2, async_options=ASYNC)
    state, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HEAD)
    assert state.round == 2 and "async" in state.extra and "staleness" in records(tmp_path)[-1]


# -- bad options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,message",
    [
        ({"async_options": {"bufer_size": 2}}, "unknown option 'bufer_size' for asynchronous mode 'fedbuff'"),
        ({"async_options": {"buffer_size": 0}}, "buffer_size must be >= 1, got 0"),
        ({"async_options": {"latency": "weibull"}}, "latency='weibull' is not one of"),
        ({"asynchronous": "fedasync"}, "unknown asynchronous mode 'fedasync'"),
        ({"asynchronous": "none", "async_options": {"buffer_size": 2}}, "async_options is given but asynchronous is"),
        ({"dp_noise_multiplier": 1.0}, "cannot run with differential privacy"),
        ({"personalize": "fedper"}, "cannot run with personalize"),
        ({"cluster": "ifca"}, "cannot run with cluster"),
        ({"recipe": "fedmedian"}, "cannot run recipe 'fedmedian': FedBuff's step is a staleness-weighted mean"),
        ({"async_options": {"buffer_size": 6}}, "buffer_size=6 exceeds num_clients=5"),
        ({"straggler_deadline": 2.0}, "cannot run with straggler_deadline"),
        ({"clients_per_round": 2}, "cannot run with clients_per_round"),
        ({"trainable": "lora"}, "lora_mode 'residual': the exact LoRA modes"),
        ({"min_clients": 3, "async_options": {"buffer_size": 2}}, "min_clients=3 exceeds buffer_size=2"),
    ],
)
def test_bad_options_are_one_clear_error(tmp_path, kw, message):
    kw = {"num_clients": 5, "async_options": {"buffer_size": 2}, **kw}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_options(fed_args(tmp_path, **kw))  # the config may refuse it first, with the same line
    assert check_options(fed_args(tmp_path, async_options={"buffer_size": 2})) == FedBuff(buffer_size=2)
