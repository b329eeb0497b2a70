"""asymvlm on Flower (federated/flower/): the ServerApp's rounds over a grid of ClientApps equal
``asymvlm-federate`` in-process, Flower's own strategies drive asymvlm clients, a restarted server
resumes bit-identically, bad nodes and bad updates are named and survived.

The grid here is :class:`asymvlm.testing.LocalGrid` (every node's ClientApp in this
process, each with its own node config and context), so the comparison is of the algorithms; the
deployment engine itself (SuperLink, SuperNodes, ``flwr run``) is exercised by its own test."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated import flower as F
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.flower import client as FC
from asymvlm.federated.rounds import run_federated
from asymvlm.heads import HeadConfig
from asymvlm.testing import LocalGrid

ATOL = 1e-6  # the bar; the asymvlm ServerApp is in fact bit-identical (the same float ops)


HEAD = HeadConfig(hidden_dims=[32], direction="learned")
# client_batch "1": the in-process side trains one client at a time, as every Flower node does, so the two
# agree bit for bit (the vectorised clients agree to rounding: tests/federated/test_vectorized.py)
COMMON = dict(local_steps=3, local_batch_size=16, progress=False, local_lr=0.2, client_batch="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    """120 images of width 16, two noisy captions each."""
    return synthetic_cache(tmp_path_factory.mktemp("flowercache") / "c", 120, seed=3)


def fed_args(out, **kw):
    return FederatedArguments(**{**COMMON, "output_dir": str(out), **kw})


def run_config(cache, out, **kw):
    base = dict(
        cache_dir=str(cache), rounds=4, num_clients=4, eval_every=2, output_dir=str(out), hidden_dims="[32]",
        direction="learned", **COMMON,
    )  # fmt: skip
    base.update(kw)
    return base


def in_process(cache, out, recipe_options=None, data_args=None, **kw):
    fed = fed_args(out, rounds=4, num_clients=4, eval_every=2, **kw)
    data = get_federated_data(data_args or DataArguments(cache_dir=str(cache)), fed)
    state, _ = run_federated(fed, data, head=HEAD, recipe_options=recipe_options or {})
    return state


def grid(rc, n=4, **kw):
    return LocalGrid(F.client_app, rc, [{"partition-id": i} for i in range(n)], **kw)


def leaves(tree):
    """The tensors of a nested tuple / list / dict, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in leaves(tree[k])]
    if isinstance(tree, tuple | list):
        return [t for x in tree for t in leaves(x)]
    return []


def max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_importing_federated_does_not_import_flower():
    code = "import sys, asymvlm.federated, asymvlm.federated.rounds; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "recipe,options",
    [
        ("fedavg", {}),
        ("fedadam", {"server_lr": 0.03}),
        ("adafedadam", {}),
        ("ghbm", {"ghbm_beta": 0.5}),
        ("qffl", {"qffl_q": 0.5}),  # the clients' loss before training travels in the reply
        ("fedavg", {"dp_noise_multiplier": 0.5, "dp_max_norm": 1.0, "dp_insecure_seed": 3}),  # central DP
    ],
)
def test_flower_server_equals_in_process(recipe, options, cache, tmp_path):
    fed_only = {k: v for k, v in options.items() if k.startswith("dp_")}  # run options, not the recipe's
    ropts = {k: v for k, v in options.items() if k not in fed_only}
    ours = in_process(cache, tmp_path / "in", recipe=recipe, recipe_options=ropts, **fed_only)
    rc = run_config(cache, tmp_path / "fl", recipe=recipe, **options)
    flower = F.run_flower_server(grid(rc), rc)
    assert flower.round == ours.round == 4
    assert max_diff(ours.params, flower.params) <= ATOL
    assert max_diff(ours.params, flower.params) == 0.0  # the same operations in the same order
    if recipe == "fedadam":  # the optimizer state (moments) is the in-process one, exactly
        a, b = leaves(ours.opt_state), leaves(flower.opt_state)
        assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    if recipe == "adafedadam":
        assert ours.initial_losses == flower.initial_losses and len(flower.initial_losses) == 4
    rec = [json.loads(line) for line in (tmp_path / "fl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rec] == [1, 2, 3, 4]
    if fed_only:  # under DP no per-client loss leaves the server; epsilon is accounted as in-process
        assert all("fairness" not in r and "client_loss_after" not in r for r in rec)
        assert flower.epsilon == ours.epsilon > 0
    else:
        assert "fairness" in rec[1] and "fairness" in rec[3]
    assert (tmp_path / "fl" / "model" / "asymvlm_config.json").is_file()


def test_exact_lora_residual_equals_in_process(tmp_path, tiny_open_clip_dir):
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    c = embed_dataset(enc, sw.generate(40, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    lora = dict(trainable="both", lora_mode="residual", lora_r=2, local_batch_size=8)
    da = DataArguments(cache_dir=str(c.path), encoder=str(tiny_open_clip_dir), pretrained="")
    fed = fed_args(tmp_path / "in", rounds=2, num_clients=3, eval_every=0, **lora)
    ours, _ = run_federated(fed, get_federated_data(da, fed), head=HEAD)
    rc = run_config(
        c.path, tmp_path / "fl", rounds=2, num_clients=3, eval_every=0, encoder=str(tiny_open_clip_dir),
        pretrained="", **lora,
    )  # fmt: skip
    flower = F.run_flower_server(grid(rc, 3), rc)
    assert ours.base and max_diff(ours.params, flower.params) <= ATOL and max_diff(ours.base, flower.base) <= ATOL


def test_flowers_own_strategies_drive_asymvlm_clients(cache, tmp_path):
    """Flower's FedAvg / FedAdam (Message API) over asymvlm ClientApps equal asymvlm's recipes with
    Flower's conventions (weighted by num-examples; FedAdam's bias correction at round + 1)."""
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from asymvlm.federated.client import build_client_model

    start = build_client_model(dataclasses.replace(HEAD, dim=16), seed=0).get_params()
    for name, strategy, recipe, options in (
        ("fedavg", FedAvg(min_available_nodes=4), "fedavg", {}),
        (
            "fedadam",
            FedAdam(min_available_nodes=4, eta=0.03, beta_1=0.9, beta_2=0.99, tau=1e-3),
            "fedadam",
            dict(
                server_lr=0.03,
                server_beta1=0.9,
                server_beta2=0.99,
                server_tau=1e-3,
                bias_correction=True,
                bias_correction_offset=1,
            ),
        ),  # fmt: skip
    ):
        rc = run_config(cache, tmp_path / f"flower-{name}", recipe=recipe)
        result = strategy.start(grid=grid(rc), initial_arrays=ArrayRecord(dict(start)), num_rounds=3)
        theirs = dict(result.arrays.to_torch_state_dict())
        fed3 = fed_args(tmp_path / f"in3-{name}", rounds=3, num_clients=4, eval_every=0, recipe=recipe)
        ours, _ = run_federated(
            fed3, get_federated_data(DataArguments(cache_dir=str(cache)), fed3), head=HEAD, recipe_options=options
        )
        assert max_diff(ours.params, theirs) <= ATOL, name
        assert max_diff(ours.params, start) > 1e-3  # it trained


class CrashingGrid(LocalGrid):
    """The ServerApp dies (an exception out of the grid) at the k-th round's training messages."""

    def __init__(self, *a, crash_at: int, **kw):
        super().__init__(*a, **kw)
        self.crash_at, self.train_rounds = crash_at, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
            if self.train_rounds == self.crash_at:
                raise KeyboardInterrupt("the ServerApp process is killed")
        return super().send_and_receive(messages, timeout=timeout)


def test_restarted_server_resumes_bit_identically(cache, tmp_path):
    rc = run_config(cache, tmp_path / "whole", recipe="fedadam", server_lr=0.03)
    whole = F.run_flower_server(grid(rc), rc)
    rc2 = run_config(cache, tmp_path / "crashed", recipe="fedadam", server_lr=0.03, resume=True)
    with pytest.raises(KeyboardInterrupt):
        F.run_flower_server(CrashingGrid(F.client_app, rc2, [{"partition-id": i} for i in range(4)], crash_at=3), rc2)
    assert len(list((tmp_path / "crashed" / "checkpoints").iterdir())) >= 1
    resumed = F.run_flower_server(grid(rc2), rc2)
    assert resumed.round == 4
    for k in whole.params:
        assert torch.equal(whole.params[k], resumed.params[k]), k
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4]  # nothing logged twice, nothing half


def test_a_lost_node_and_a_bad_update_are_survived_and_named(cache, tmp_path):
    from flwr.clientapp import ClientApp

    bad = ClientApp()

    @bad.query()
    def _q(msg, context):
        return FC._client_query(msg, context)

    @bad.train()
    def _t(msg, context):  # an update of the right keys and shapes, full of NaN
        reply = FC._client_train(msg, context)
        arrays = reply.content["arrays"].to_torch_state_dict()
        from flwr.app import ArrayRecord, Message, RecordDict

        poisoned = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in arrays.items()})
        return Message(RecordDict({"arrays": poisoned, "metrics": reply.content["metrics"]}), reply_to=msg)

    @bad.evaluate()
    def _e(msg, context):
        return FC._client_evaluate(msg, context)

    rc = run_config(cache, tmp_path / "faults", recipe="fedavg", min_clients=2)
    g = grid(rc, apps={2: bad})
    g.lost = {4}  # node 4 (partition 3) dies after the handshake
    state = F.run_flower_server(g, rc)
    assert state.round == 4 and all(torch.isfinite(v).all() for v in state.params.values())
    rec = [json.loads(line) for line in (tmp_path / "faults" / "metrics.jsonl").read_text().splitlines()]
    for r in rec:
        reasons = {x["client"]: x["reason"] for x in r["rejected"]}
        assert "NaN" in reasons[1] or "nan" in reasons[1].lower()  # partition 1 lives on node 2
        assert "no reply" in reasons[3]
        assert "skipped" not in r
    # too few valid updates for the recipe's minimum: the round is skipped with the reason, and a run
    # in which no round stepped the model saves none (the initial model is no result)
    rc = run_config(cache, tmp_path / "few", recipe="fedavg", min_clients=4, rounds=1)
    g = grid(rc, apps={2: bad})
    with pytest.raises(F.FederationError, match="no round stepped the model"):
        F.run_flower_server(g, rc)
    rec = json.loads((tmp_path / "few" / "metrics.jsonl").read_text().splitlines()[0])
    assert "3 valid updates < min_clients=4" in rec["skipped"]
    assert not (tmp_path / "few" / "model").exists()


def test_handshake_errors_are_one_clear_line(cache, tmp_path):
    rc = run_config(cache, tmp_path / "dup", recipe="fedavg")
    g = LocalGrid(F.client_app, rc, [{"partition-id": 0}, {"partition-id": 0}])
    with pytest.raises(F.FederationError, match="both hold partition-id 0"):
        F.run_flower_server(g, rc)
    g = LocalGrid(F.client_app, rc, [{"partition-id": 9}])
    with pytest.raises(F.FederationError, match="no node answered the handshake"):
        F.run_flower_server(g, rc)
    g = LocalGrid(F.client_app, rc, [{}])
    with pytest.raises(F.FederationError, match="no node answered"):
        F.run_flower_server(g, rc)


def test_run_config_parsing(cache, tmp_path):
    data, head, fed, opts = F.parse_run_config(
        {
            "cache-dir": str(cache),
            "num-server-rounds": 7,
            "hidden-dims": "64,64",
            "recipe": "fedadam",
            "server-lr": 0.05,
        }
    )
    assert (
        fed.rounds == 7 and list(head.hidden_dims) == [64, 64] and fed.recipe == "fedadam" and opts["server_lr"] == 0.05
    )
    assert data.cache_dir == str(cache)
    y = tmp_path / "fed.yaml"
    y.write_text("recipe: fedyogi\nrounds: 3\n")
    _, _, fed, _ = F.parse_run_config({"config": str(y), "rounds": 5})
    assert fed.recipe == "fedyogi" and fed.rounds == 5  # the run config overrides the file
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['roundz'\]"):
        F.parse_run_config({"roundz": 3})
    with pytest.raises(ConfigError, match="differ"):
        F.parse_run_config({"rounds": 3, "num-server-rounds": 4})
    with pytest.raises(ConfigError, match="attacks are simulated"):
        F.parse_run_config({"attack": "sign_flip", "malicious_fraction": 0.2})


def test_secure_aggregation_is_within_its_bound_of_the_plain_aggregate(cache, tmp_path):
    """Flower's SecAgg+ (client mod + server workflow) with asymvlm clients: after one FedAvg round the
    parameters differ from the plain run by at most the documented quantisation bound, and FedAdam's
    server optimizer runs on the secure sum."""
    rc = run_config(cache, tmp_path / "plain", recipe="fedavg", rounds=1, eval_every=0)
    plain = F.run_flower_server(grid(rc), rc)
    sa = dict(secure_aggregation=True, secagg_num_shares=3, secagg_reconstruction_threshold=2)
    rc = run_config(cache, tmp_path / "secure", recipe="fedavg", rounds=1, eval_every=0, **sa)
    secure = F.run_flower_server(grid(rc), rc)
    rec = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[0])
    info = rec["secure_aggregation"]
    assert info["clients"] == [0, 1, 2, 3] and "client_loss_after" not in rec  # only the sum is released
    sizes = [
        int(x)
        for x in get_federated_data(
            DataArguments(cache_dir=str(cache)), fed_args(tmp_path / "x", num_clients=4)
        ).num_examples
    ]
    assert info["error_bound"] == F.secagg_error_bound(sizes, 8.0, 2**22, max(sizes))
    diff = max_diff(plain.params, secure.params)
    assert 0 < diff <= info["error_bound"], (diff, info["error_bound"])  # quantised, and within the bound
    # the server optimizer on the secure sum; a node gone before the round is pinged out of it
    rc = run_config(cache, tmp_path / "adam", recipe="fedadam", server_lr=0.03, rounds=2, eval_every=0, **sa)
    g = grid(rc)
    g.lost = {4}
    state = F.run_flower_server(g, rc)
    rec = [json.loads(x) for x in (tmp_path / "adam" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secure_aggregation"]["clients"] == [0, 1, 2] and "skipped" not in r for r in rec)
    assert all(r["rejected"] == [{"client": 3, "reason": "no reply to the round's ping (not entered into SecAgg+)"}]
               for r in rec)  # fmt: skip
    assert all(torch.isfinite(v).all() for v in state.params.values())


def test_secure_aggregation_survives_a_client_failing_mid_protocol(cache, tmp_path):
    """A client that fails while training (after the keys were shared): SecAgg+ rebuilds its masks
    from the others' shares, and the round's aggregate is the three others' (within the bound)."""
    from flwr.clientapp import ClientApp

    failing = ClientApp(mods=[FC._secagg_when_asked])

    @failing.query()
    def _q(msg, context):
        return FC._client_query(msg, context)

    @failing.train()
    def _t(msg, context):
        raise RuntimeError("the GPU fell off the bus")

    sa = dict(secure_aggregation=True, secagg_num_shares=3, secagg_reconstruction_threshold=2)
    rc = run_config(cache, tmp_path / "s", recipe="fedavg", rounds=1, eval_every=0, **sa)
    secure = F.run_flower_server(grid(rc, apps={2: failing}), rc)
    rec = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["secure_aggregation"]["clients"] == [0, 2, 3]
    assert rec["rejected"] == [{"client": 1, "reason": "no masked update (dropped or failed during SecAgg+)"}]
    # the plain run without client 1 (it never trains): the same up to the bound
    rc = run_config(cache, tmp_path / "p", recipe="fedavg", rounds=1, eval_every=0)
    g = grid(rc)
    g.lost = {2}
    plain = F.run_flower_server(g, rc)
    assert max_diff(plain.params, secure.params) <= rec["secure_aggregation"]["error_bound"]


@pytest.mark.parametrize(
    "recipe,extra,why",
    [
        ("fedmedian", {}, "aggregator"),
        ("krum", {}, "aggregator"),
        ("adafedadam", {}, "AdaFedAdamAggregate"),
        ("qffl", {}, "QFFLAggregate"),
        ("ghbm", {"ghbm_beta": 0.5}, "GHBM's momentum"),
        ("fedavg", {"dp_noise_multiplier": 0.5, "dp_max_norm": 1.0}, "central DP"),
    ],
)
def test_secure_aggregation_refuses_recipes_that_need_individual_updates(recipe, extra, why, cache, tmp_path):
    rc = run_config(cache, tmp_path / "o", recipe=recipe, secure_aggregation=True, **extra)
    with pytest.raises(ConfigError, match=f"cannot run under it: .*{why}"):
        F.run_flower_server(grid(rc), rc)
    assert not (tmp_path / "o" / "checkpoints").exists()  # refused before anything is written


def test_data_holders_with_their_own_caches(tmp_path, synthetic_cache):
    """Real data holders: each node names its own embedding cache (node config cache-dir); the server
    learns the sizes in the handshake and weights the clients by them."""
    paths = [synthetic_cache(tmp_path / f"holder{k}", n, seed=10 + k) for k, n in enumerate((40, 80))]
    rc = run_config("", tmp_path / "o", recipe="fedavg", num_clients=2, rounds=2, eval_every=1, min_clients=2)
    rc.pop("cache_dir")
    g = LocalGrid(F.client_app, rc, [{"partition-id": k, "cache-dir": str(p)} for k, p in enumerate(paths)])
    state = F.run_flower_server(g, rc)
    rec = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregator_info"]["weights"] for r in rec] == [[1 / 3, 2 / 3]] * 2
    assert all(set(r["client_loss"]) == {"0", "1"} for r in rec)
    assert state.round == 2 and all(torch.isfinite(v).all() for v in state.params.values())
    saved = json.loads((tmp_path / "o" / "model" / "asymvlm_config.json").read_text())["encoder"]
    assert saved["fingerprint"] is None and saved["dim"] == 16  # what the caches record: no encoder, not "None"


def test_the_saved_model_records_the_encoder_of_the_nodes_caches(tmp_path, tiny_open_clip_dir):
    """Data holders whose caches were built by an encoder the run config does not name: the saved
    model records that encoder (spec and fingerprint, as the caches do) and reloads with it."""
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.model import AsymVLM
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    caches = [
        embed_dataset(enc, sw.generate(30, seed=k), tmp_path / f"holder{k}", dtype="float32", progress=False).path
        for k in range(2)
    ]
    rc = run_config("", tmp_path / "o", recipe="fedavg", num_clients=2, rounds=1, eval_every=0)
    rc.pop("cache_dir")
    g = LocalGrid(F.client_app, rc, [{"partition-id": k, "cache-dir": str(p)} for k, p in enumerate(caches)])
    F.run_flower_server(g, rc)
    manifest = json.loads((caches[0] / "manifest.json").read_text())["encoder"]
    saved = json.loads((tmp_path / "o" / "model" / "asymvlm_config.json").read_text())["encoder"]
    assert saved["fingerprint"] == manifest["fingerprint"] == enc.fingerprint and saved["dim"] == enc.dim
    model = AsymVLM.from_pretrained(tmp_path / "o" / "model")  # the fingerprint checked on load
    assert model.encoder is not None and model.encoder.fingerprint == enc.fingerprint
