"""One hostile Flower client among two (federated/flower/, issue 26 defect 2): every field of
every reply it sends is untrusted. A bad reply rejects that client (for the round, or for the run
when it is the handshake), the reason is recorded in ``metrics.jsonl``, the run never ends with a
traceback, and the result equals the run in which that client's reply simply failed.

One hostile field per case (:data:`CASES`); each runs the ServerApp over a
:class:`~asymvlm.testing.LocalGrid` of two nodes (node 2 holds partition 1 and lies)."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from asymvlm.errors import ConfigError
from asymvlm.federated import flower as F
from asymvlm.federated.core.tree import first_non_finite
from asymvlm.federated.flower import client as FC
from asymvlm.heads import MAX_HEAD_PARAMETERS
from asymvlm.testing import LocalGrid

HOSTILE = 2  # node id; it holds partition 1
DELETE = object()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("hostile") / "c", 60, seed=4)


def run_config(cache, out, recipe="fedavg", **kw):
    rc = dict(
        cache_dir=str(cache), rounds=1, num_clients=2, eval_every=1, output_dir=str(out), hidden_dims="[16]",
        direction="learned", local_steps=2, local_batch_size=8, progress=False, local_lr=0.2, recipe=recipe,
        min_clients=1,
    )  # fmt: skip
    rc.update(kw)
    return rc


# -- hostile ClientApps -----------------------------------------------------------------------
def stage(msg):
    kind = msg.metadata.message_type
    if kind == "query":
        return "initial-loss" if "arrays" in msg.content.array_records else "handshake"
    return kind


def hostile_app(where, mutate):
    """The honest ClientApp whose reply at stage ``where`` goes through ``mutate(records) -> records``
    (a dict of record name -> record); ``mutate`` may raise to make that reply an error."""
    app = ClientApp()

    def handle(msg, context, honest):
        reply = honest(msg, context)
        if stage(msg) != where:
            return reply
        records = {name: reply.content[name] for name in reply.content}
        return Message(RecordDict(mutate(records)), reply_to=msg)

    app.query()(lambda m, c: handle(m, c, FC._client_query))
    app.train()(lambda m, c: handle(m, c, FC._client_train))
    app.evaluate()(lambda m, c: handle(m, c, FC._client_evaluate))
    return app


def metric(name, value, record="metrics"):
    def mutate(r):
        values = dict(r[record])
        if value is DELETE:
            values.pop(name, None)
        else:
            values[name] = value
        r[record] = MetricRecord(values)
        return r

    return mutate


def as_config(name, value):
    """The metrics record as a ConfigRecord holding a string (a wrong record type and value type)."""

    def mutate(r):
        values = dict(r["metrics"])
        values[name] = value
        r["metrics"] = ConfigRecord(values)
        return r

    return mutate


def info(name, value):
    def mutate(r):
        values = dict(r["info"])
        values[name] = value
        r["info"] = ConfigRecord(values)
        return r

    return mutate


def drop(record):
    def mutate(r):
        r.pop(record)
        return r

    return mutate


def arrays(edit):
    def mutate(r):
        sd = dict(r["arrays"].to_torch_state_dict())
        r["arrays"] = ArrayRecord(edit(sd))
        return r

    return mutate


def first_key(sd):
    return sorted(sd)[0]


def fail(_):
    raise RuntimeError("the reference: this reply fails")


# (id, recipe, stage, mutation, reference stage that fails instead, what the recorded reason says)
NAN, INF = float("nan"), float("inf")
CASES = [
    # train replies
    ("train-no-metrics", "fedavg", "train", drop("metrics"), "train", "'metrics'"),
    ("train-metrics-as-config", "fedavg", "train", as_config("num-examples", "30"), "train", "'metrics'"),
    ("train-no-arrays", "fedavg", "train", drop("arrays"), "train", "'arrays'"),
    ("train-n-inf", "fedavg", "train", metric("num-examples", INF), "train", "num-examples"),
    ("train-n-nan", "fedavg", "train", metric("num-examples", NAN), "train", "num-examples"),
    ("train-n-negative", "fedavg", "train", metric("num-examples", -5), "train", "num-examples"),
    ("train-n-float", "fedavg", "train", metric("num-examples", 30.5), "train", "num-examples"),
    ("train-n-list", "fedavg", "train", metric("num-examples", [1, 2]), "train", "num-examples"),
    ("train-n-1e12-float", "fedavg", "train", metric("num-examples", 1e12), "train", "num-examples"),
    ("train-n-10**12", "fedavg", "train", metric("num-examples", 10**12), "train", "handshake"),
    ("train-n-missing", "fedavg", "train", metric("num-examples", DELETE), "train", "num-examples"),
    ("train-pid-other", "fedavg", "train", metric("partition-id", 0), "train", "partition-id"),
    ("train-pid-negative", "fedavg", "train", metric("partition-id", -1), "train", "partition-id"),
    ("train-loss-after-nan", "fedavg", "train", metric("loss-after", NAN), "train", "loss-after"),
    ("qffl-loss-before-neg-huge", "qffl", "train", metric("loss-before", -1e30), "train", "loss-before"),
    ("qffl-loss-before-nan", "qffl", "train", metric("loss-before", NAN), "train", "loss-before"),
    ("qffl-loss-before-inf", "qffl", "train", metric("loss-before", INF), "train", "loss-before"),
    ("qffl-loss-before-string", "qffl", "train", as_config("loss-before", "0.5"), "train", "'metrics'"),
    ("qffl-loss-before-missing", "qffl", "train", metric("loss-before", DELETE), "train", "loss-before"),
    ("adafedadam-grad-norm-nan", "adafedadam", "train", metric("grad-norm", NAN), "train", "grad-norm"),
    ("adafedadam-grad-norm-neg", "adafedadam", "train", metric("grad-norm", -1.0), "train", "grad-norm"),
    ("train-arrays-nan", "fedavg", "train", arrays(lambda sd: {k: v * NAN for k, v in sd.items()}), "train", "NaN"),
    ("train-arrays-inf", "fedavg", "train", arrays(lambda sd: {k: v + INF for k, v in sd.items()}), "train", "inf"),
    ("train-arrays-extra-key", "fedavg", "train", arrays(lambda sd: {**sd, "evil": torch.zeros(3)}), "train", "keys"),
    ("train-arrays-missing-key", "fedavg", "train",
     arrays(lambda sd: {k: v for k, v in sd.items() if k != first_key(sd)}), "train", "keys"),
    ("train-arrays-shape", "fedavg", "train",
     arrays(lambda sd: {**sd, first_key(sd): torch.zeros(7, 3)}), "train", "shape"),
    ("train-arrays-float64", "fedavg", "train", arrays(lambda sd: {k: v.double() for k, v in sd.items()}), "train",
     "dtype"),
    ("train-arrays-int", "fedavg", "train", arrays(lambda sd: {k: v.long() for k, v in sd.items()}), "train", "dtype"),
    ("train-arrays-as-config", "fedavg", "train", lambda r: {**r, "arrays": ConfigRecord({"x": 1})}, "train",
     "'arrays'"),
    # the handshake: the node is left out of the run
    ("handshake-no-info", "fedavg", "handshake", drop("info"), "handshake", "'info'"),
    ("handshake-no-metrics", "fedavg", "handshake", drop("metrics"), "handshake", "'metrics'"),
    ("handshake-pid-negative", "fedavg", "handshake", metric("partition-id", -1), "handshake", "partition-id"),
    ("handshake-pid-out-of-range", "fedavg", "handshake", metric("partition-id", 7), "handshake", "partition-id"),
    ("handshake-pid-float", "fedavg", "handshake", metric("partition-id", 1.5), "handshake", "partition-id"),
    ("handshake-pid-string", "fedavg", "handshake", as_config("partition-id", "1"), "handshake", "'metrics'"),
    ("handshake-n-inf", "fedavg", "handshake", metric("num-examples", INF), "handshake", "num-examples"),
    ("handshake-n-nan", "fedavg", "handshake", metric("num-examples", NAN), "handshake", "num-examples"),
    ("handshake-n-negative", "fedavg", "handshake", metric("num-examples", -1), "handshake", "num-examples"),
    ("handshake-n-zero", "fedavg", "handshake", metric("num-examples", 0), "handshake", "num-examples"),
    ("handshake-n-1e12-float", "fedavg", "handshake", metric("num-examples", 1e12), "handshake", "num-examples"),
    ("handshake-dim-huge", "fedavg", "handshake", metric("dim", 10**10), "handshake", "dim"),
    ("handshake-dim-missing", "fedavg", "handshake", metric("dim", DELETE), "handshake", "dim"),
    ("handshake-fingerprint-int", "fedavg", "handshake", info("encoder-fingerprint", 7), "handshake", "encoder"),
    ("handshake-encoder-not-json", "fedavg", "handshake", info("encoder", "{not json"), "handshake", "encoder"),
    # AdaFedAdam's initial losses: the node is left out of the run
    ("initial-loss-nan", "adafedadam", "initial-loss", metric("loss", NAN), "initial-loss", "loss"),
    ("initial-loss-negative", "adafedadam", "initial-loss", metric("loss", -1e30), "initial-loss", "loss"),
    ("initial-loss-missing", "adafedadam", "initial-loss", metric("loss", DELETE), "initial-loss", "loss"),
    ("initial-loss-no-metrics", "adafedadam", "initial-loss", drop("metrics"), "initial-loss", "'metrics'"),
    # the fairness report: that client's loss is left out
    ("eval-no-metrics", "fedavg", "evaluate", drop("metrics"), "evaluate", "'metrics'"),
    ("eval-loss-nan", "fedavg", "evaluate", metric("eval_loss", NAN), "evaluate", "eval_loss"),
    ("eval-loss-string", "fedavg", "evaluate", as_config("eval_loss", "x"), "evaluate", "'metrics'"),
    ("eval-pid-spoofed", "fedavg", "evaluate", metric("partition-id", 0), "evaluate", "partition-id"),
]  # fmt: skip

_REFERENCES: dict = {}


def run(cache, out, recipe, app):
    rc = run_config(cache, out, recipe)
    g = LocalGrid(F.client_app, rc, [{"partition-id": 0}, {"partition-id": 1}], apps={HOSTILE: app})
    state = F.run_flower_server(g, rc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return state, records


def reference(cache, tmp_path_factory, recipe, where):
    """The run in which the hostile node's reply at that stage is an error reply instead."""
    key = (recipe, where)
    if key not in _REFERENCES:
        out = tmp_path_factory.mktemp("ref") / "out"
        _REFERENCES[key] = run(cache, out, recipe, hostile_app(where, fail))
    return _REFERENCES[key]


def reasons(records, where):
    """Every recorded reason about the hostile node / its partition 1."""
    found = []
    for r in records:
        if where == "evaluate":
            found += [x["reason"] for x in r.get("eval_rejected", []) if x["client"] == 1]
        elif where in ("handshake", "initial-loss"):
            found += [x["reason"] for x in r.get("excluded", []) if x["node"] == HOSTILE]
        else:
            found += [x["reason"] for x in r["rejected"] if x["client"] == 1]
    return found


@pytest.mark.parametrize("name,recipe,where,mutate,ref,why", CASES, ids=[c[0] for c in CASES])
def test_one_hostile_field_rejects_that_client_and_never_ends_the_run(
    name, recipe, where, mutate, ref, why, cache, tmp_path, tmp_path_factory
):
    state, records = run(cache, tmp_path / "out", recipe, hostile_app(where, mutate))
    ref_state, ref_records = reference(cache, tmp_path_factory, recipe, ref)
    assert state.round == 1 and [r["round"] for r in records] == [1]
    assert all(torch.isfinite(v).all() for v in state.params.values())
    for k in ref_state.params:  # as if the hostile reply had failed
        assert torch.equal(state.params[k], ref_state.params[k]), k
    found = reasons(records, where)
    assert found and all(why in x for x in found), (found, why)
    assert (tmp_path / "out" / "model" / "asymvlm_config.json").is_file()
    text = (tmp_path / "out" / "metrics.jsonl").read_text()
    assert "NaN" not in text.replace("NaN or inf", "") and "Infinity" not in text  # the log is valid JSON


def test_huge_finite_updates_never_save_a_non_finite_state(cache, tmp_path):
    """Updates of 3e38 pass the per-update checks (finite, right shapes) but overflow FedAdam's second
    moment: such a server step is not taken (recorded), every checkpoint stays finite, and a run in
    which no round stepped saves no model. (Bounding a client's influence is the robust recipes'
    work: fedmedian, krum, trimmed mean.)"""
    from asymvlm.federated.checkpoint import load_server_state, round_dirs

    app = hostile_app("train", arrays(lambda sd: {k: torch.full_like(v, 3e38) for k, v in sd.items()}))
    rc = run_config(cache, tmp_path / "out", recipe="fedadam", server_lr=0.03, rounds=2)
    g = LocalGrid(F.client_app, rc, [{"partition-id": 0}, {"partition-id": 1}], apps={HOSTILE: app})
    with pytest.raises(F.FederationError, match="no round stepped the model"):
        F.run_flower_server(g, rc)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all("not finite (opt_state" in r["skipped"] for r in records), records
    states = [load_server_state(d) for d in round_dirs(tmp_path / "out" / "checkpoints")]
    assert states and all(first_non_finite([s.params, s.opt_state]) is None for s in states)
    assert not (tmp_path / "out" / "model").exists()


def test_a_recipe_failing_on_valid_values_skips_the_round(cache, tmp_path):
    """A loss of 1e6 (F.MAX_REPORTED) passes the checks but overflows q-FFL's F^q (q = 60): the round
    makes no step, its record says why, and the run ends with one clear line, not a traceback."""
    app = hostile_app("train", metric("loss-before", F.MAX_REPORTED))
    rc = run_config(cache, tmp_path / "out", recipe="qffl", qffl_q=60.0)
    g = LocalGrid(F.client_app, rc, [{"partition-id": 0}, {"partition-id": 1}], apps={HOSTILE: app})
    with pytest.raises(F.FederationError, match="no round stepped the model"):
        F.run_flower_server(g, rc)
    rec = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert rec["skipped"].startswith("the recipe failed on this round's updates (OverflowError")


def test_every_reply_rejected_skips_the_round_and_says_so(cache, tmp_path):
    app = hostile_app("train", drop("metrics"))
    rc = run_config(cache, tmp_path / "out", rounds=1, min_clients=1)
    g = LocalGrid(app, rc, [{"partition-id": 0}, {"partition-id": 1}])
    with pytest.raises(F.FederationError, match="no round stepped the model"):
        F.run_flower_server(g, rc)
    rec = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert rec["skipped"] == "0 valid updates < min_clients=1" and len(rec["rejected"]) == 2
    assert not (tmp_path / "out" / "model").exists()  # the initial model is not saved as a result


def other_encoder(r):
    """The handshake of a node whose cache was built by another encoder (consistent in itself)."""
    values = dict(r["info"])
    source = {**json.loads(values["encoder"]), "fingerprint": "f" * 64, "spec": "open_clip:ViT-B-32"}
    r["info"] = ConfigRecord({"encoder": json.dumps(source), "encoder-fingerprint": "f" * 64})
    return r


def test_encoders_disagreeing(cache, tmp_path):
    """A node whose encoder differs from the majority's is left out; without a majority it is one
    clear error naming the encoders."""
    app = hostile_app("handshake", other_encoder)
    rc = run_config(cache, tmp_path / "tie")
    g = LocalGrid(F.client_app, rc, [{"partition-id": 0}, {"partition-id": 1}], apps={HOSTILE: app})
    with pytest.raises(F.FederationError, match="disagree"):
        F.run_flower_server(g, rc)
    rc = run_config(cache, tmp_path / "majority", num_clients=3)
    g = LocalGrid(F.client_app, rc, [{"partition-id": i} for i in range(3)], apps={HOSTILE: app})
    state = F.run_flower_server(g, rc)
    first = json.loads((tmp_path / "majority" / "metrics.jsonl").read_text().splitlines()[0])
    assert [x["node"] for x in first["excluded"]] == [HOSTILE] and "encoder" in first["excluded"][0]["reason"]
    assert state.round == 1


@pytest.mark.parametrize(
    "key,value,why",
    [
        ("hidden-dims", "[10000000000]", "hidden_dims"),
        ("hidden-dims", "[65536, 65536]", "hidden_dims"),
        ("num-clients", 10**9, "num_clients"),
        ("lora-r", 10**9, "lora_r"),
        ("round-timeout", "abc", "round-timeout"),
        ("round-timeout", -1.0, "round-timeout"),
        ("round-timeout", float("nan"), "round-timeout"),
        ("secagg-clipping-range", float("inf"), "secagg-clipping-range"),
        ("secagg-quantization-range", 0.5, "secagg-quantization-range"),
        ("secure-aggregation", "yes", "secure-aggregation"),
    ],
)
def test_run_config_values_are_checked_before_anything_is_allocated(key, value, why):
    with pytest.raises(ConfigError, match=why):
        F.parse_run_config({key: value})


def test_hostile_handshake_dim_does_not_size_the_servers_model():
    """A head for a reported width is checked before it is built (a 10**10-wide head never allocates)."""
    from asymvlm.heads import HeadConfig

    with pytest.raises(ConfigError, match="parameters"):
        F.check_head_size(HeadConfig(hidden_dims=[4096, 4096]), 65536)
    F.check_head_size(HeadConfig(hidden_dims=[32]), 512)
    assert math.isfinite(MAX_HEAD_PARAMETERS)
