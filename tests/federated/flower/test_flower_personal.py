"""Personalised and clustered federated learning over Flower (issue 28): the ServerApp's rounds
over a grid of ClientApps equal the in-process run exactly, every personal state stays on its
node (no reply carries a personal tensor), and clustered runs keep their cluster models.

The reference is the in-process simulator (tests/federated/test_personal.py and
test_clustered.py check it against the papers' algorithms)."""

import pytest
import torch

from asymvlm.config import DataArguments
from asymvlm.federated import flower as F
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.personal import make_personalizer
from asymvlm.federated.personal_store import ClientStates
from asymvlm.federated.rounds import run_federated
from asymvlm.heads import HeadConfig
from asymvlm.testing import LocalGrid

HEAD = HeadConfig(hidden_dims=[32], direction="learned")
COMMON = dict(local_steps=3, local_batch_size=16, progress=False, local_lr=0.2, rounds=3, num_clients=4, eval_every=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("flowerpersonal") / "c", 120, seed=3)


class RecordingGrid(LocalGrid):
    """A LocalGrid that keeps a copy of every reply a node sends."""

    replies: list

    def pull_messages(self, message_ids):
        out = list(super().pull_messages(message_ids))
        self.replies = getattr(self, "replies", []) + out
        return out


def _both(cache, tmp_path, **kw):
    from asymvlm.training.client_eval import client_evaluator

    fed = FederatedArguments(**{**COMMON, "output_dir": str(tmp_path / "in"), **kw})
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    evaluate_client = client_evaluator(data.tests) if data.tests is not None else None
    ours, _ = run_federated(fed, data, head=HEAD, evaluate_client=evaluate_client)
    rc = dict(cache_dir=str(cache), output_dir=str(tmp_path / "fl"), hidden_dims="[32]", direction="learned")
    rc.update(COMMON, **kw)
    g = RecordingGrid(
        F.client_app, rc, [{"partition-id": i, "state-dir": str(tmp_path / f"node{i}")} for i in range(4)]
    )
    flower = F.run_flower_server(g, rc)
    return ours, flower, g


@pytest.mark.parametrize("method", ["fedper", "ditto"])
def test_personalised_flower_equals_in_process_and_keeps_personal_state_on_the_nodes(method, cache, tmp_path):
    ours, flower, g = _both(cache, tmp_path, personalize=method)
    assert all(torch.equal(ours.params[k], flower.params[k]) for k in ours.params)
    keys = make_personalizer(method).personal_keys(sorted(ours.params))
    sim = ClientStates(tmp_path / "in" / "clients")
    for c in range(4):  # each node's state, in its own state-dir, is the simulator's client state
        node = ClientStates(tmp_path / f"node{c}")
        a, b = sim.load(c, upto=3), node.load(c, upto=3)
        assert a is not None and b is not None and all(torch.equal(a[k], b[k]) for k in a)
    trains = [r for r in g.replies if r.metadata.message_type == "train" and r.has_content()]
    assert trains
    for r in trains:
        sent = set(r.content["arrays"].keys())
        assert sent and not sent & set(keys)
    assert not (tmp_path / "fl" / "clients").exists()  # the server side holds no client state


@pytest.mark.parametrize(
    "method,options", [("ifca", '{"clusters": 2}'), ("cfl", '{"eps1": 5.0, "eps2": 0.0, "warmup": 2}')]
)
def test_clustered_flower_equals_in_process(method, options, cache, tmp_path):
    ours, flower, _ = _both(cache, tmp_path, cluster=method, cluster_options=options)
    assert len(ours.extra["models"]) == len(flower.extra["models"]) == 2
    for a, b in zip(ours.extra["models"], flower.extra["models"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ours.extra["assign"] == flower.extra["assign"]


def test_cfl_with_drift_reclustering_is_refused_on_flower(cache, tmp_path):
    from asymvlm.errors import ConfigError

    rc = dict(cache_dir=str(cache), output_dir=str(tmp_path / "fl"), hidden_dims="[32]", direction="learned")
    rc.update(COMMON, cluster="cfl", cluster_options='{"drift": 0.5}')
    g = LocalGrid(F.client_app, rc, [{"partition-id": i} for i in range(4)])
    with pytest.raises(ConfigError, match="simulator only"):
        F.run_flower_server(g, rc)


@pytest.mark.parametrize("method,options", [("fedem", '{"components": 2}'), ("mocha", '{"lam": 0.01}')])
def test_multitask_flower_equals_in_process(method, options, cache, tmp_path):
    ours, flower, g = _both(cache, tmp_path, cluster=method, cluster_options=options, client_test_fraction=0.25,
                            eval_every=3)  # fmt: skip
    assert len(ours.extra["models"]) == len(flower.extra["models"])
    for a, b in zip(ours.extra["models"], flower.extra["models"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ours.params[k], flower.params[k]) for k in ours.params)
    if method == "mocha":
        assert torch.equal(ours.extra["omega"], flower.extra["omega"])
    else:  # every node's mixture weights, in its own state-dir, are the simulator's; none went to the server
        sim = ClientStates(tmp_path / "in" / "clients")
        for c in range(4):
            assert torch.equal(sim.load(c, upto=3)["pi"], ClientStates(tmp_path / f"node{c}").load(c, upto=3)["pi"])
        trains = [r for r in g.replies if r.metadata.message_type == "train" and r.has_content()]
        assert trains and all(set(r.content.array_records) == {"arrays-0", "arrays-1"} for r in trains)
    import json

    rec = {side: json.loads((tmp_path / side / "metrics.jsonl").read_text().splitlines()[-1]) for side in ("in", "fl")}
    assert rec["fl"]["client_metrics"] == rec["in"]["client_metrics"]


@pytest.mark.parametrize(
    "setting",
    [{}, {"personalize": "ditto"}, {"personalize": "kappa_route"}, {"personalize": "local_ft"},
     {"cluster": "ifca"}, {"cluster": "cfl", "cluster_options": '{"eps1": 5.0, "eps2": 0.0, "warmup": 2}'}],
)  # fmt: skip
def test_every_client_evaluates_its_own_test_split_on_flower_as_in_process(setting, cache, tmp_path):
    import json

    _both(cache, tmp_path, client_test_fraction=0.25, eval_every=3, **setting)
    rec = {}
    for side in ("in", "fl"):
        lines = (tmp_path / side / "metrics.jsonl").read_text().splitlines()
        rec[side] = [json.loads(x) for x in lines][-1]
    assert rec["fl"]["client_metrics"] == rec["in"]["client_metrics"]
    assert rec["fl"]["client_eval"] == rec["in"]["client_eval"]
    models = sorted(rec["fl"]["client_metrics"])
    expect = {"personalize": ["global", "personal"], "cluster": ["cluster"]}  # these keep no part personal
    assert models == next((v for k, v in expect.items() if k in setting), ["global"])
    assert sorted(rec["fl"]["client_metrics"][models[0]]) == ["0", "1", "2", "3"]
