"""Clustered federated learning (issue 28): IFCA and CFL recover planted client groups, their
pieces match transcriptions (the adjusted Rand index's pair-counting definition, the brute-force
best bipartition, IFCA's lowest-loss choice), and cluster models resume bit-identically.

The planted population: clients of group g see captions that are a rotation R_g of their images
(R_0 = I), so the groups want different text heads (a concept shift no single direction fits).
"""

import itertools
import json

import numpy as np
import pytest
import torch

from asymvlm.batching import IndexBatcher
from asymvlm.errors import ArtefactError, ConfigError
from asymvlm.federated.checkpoint import load_server_state, save_server_state
from asymvlm.federated.client import client_loss
from asymvlm.federated.clustered import CLUSTERERS, adjusted_rand_index, bipartition
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import FederatedData
from asymvlm.federated.rounds import Federation, run_federated
from asymvlm.heads import HeadConfig

HEAD = HeadConfig(dim=16, hidden_dims=(32,), direction="learned")


def _ari_by_pairs(a, b):
    """The adjusted Rand index from its definition: agreements over all pairs, chance-corrected."""
    n = len(a)
    pairs = list(itertools.combinations(range(n), 2))
    same_a = np.array([a[i] == a[j] for i, j in pairs])
    same_b = np.array([b[i] == b[j] for i, j in pairs])
    index = float((same_a & same_b).sum())
    expected = same_a.sum() * same_b.sum() / len(pairs)
    return (index - expected) / ((same_a.sum() + same_b.sum()) / 2 - expected)


def test_adjusted_rand_index_matches_the_pair_counting_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 3, 12), rng.integers(0, 4, 12)
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_by_pairs(a, b), abs=1e-12)
    assert adjusted_rand_index([0, 0, 1, 1, 2], [5, 5, 3, 3, 9]) == 1.0
    with pytest.raises(ConfigError, match="one length"):
        adjusted_rand_index([0, 1], [0, 1, 2])


def test_bipartition_finds_the_best_cut_of_a_block_similarity():
    rng = np.random.default_rng(1)
    for _ in range(10):
        labels = rng.permutation([0, 0, 0, 1, 1, 1])
        x = np.where(labels[:, None] == 0, [1.0, 0.0], [0.0, 1.0]) + 0.3 * rng.standard_normal((6, 2))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        a, b = bipartition(sim)
        best = min(
            sim[np.ix_(list(s), [i for i in range(6) if i not in s])].max()
            for r in range(1, 6)
            for s in itertools.combinations(range(6), r)
        )  # brute force over every bipartition
        assert sim[np.ix_(a, b)].max() == pytest.approx(best, abs=1e-12)


def planted(clients=8, groups=2, per=24, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rots = [torch.eye(dim)] + [torch.linalg.qr(torch.randn(dim, dim, generator=g))[0] for _ in range(groups - 1)]
    batchers, truth = [], []
    for c in range(clients):
        img = torch.nn.functional.normalize(torch.randn(per, dim, generator=g), dim=-1)
        txt = img @ rots[c % groups].T + 0.2 * torch.randn(per, dim, generator=g)
        batchers.append(IndexBatcher(torch.nn.functional.normalize(txt, dim=-1), img, torch.arange(per), 8, seed=c))
        truth.append(c % groups)
    return FederatedData(batchers, [per] * clients, dim, None), truth


def _fed(out, method, options, rounds, **kw):
    return FederatedArguments(
        num_clients=8, rounds=rounds, local_steps=10, local_lr=1.0, local_batch_size=8, progress=False, eval_every=0,
        output_dir=str(out), cluster=method, cluster_options=options, **kw,
    )  # fmt: skip


def _assign(out):
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [rec[-1]["clusters"]["assign"][str(c)] for c in range(8)], rec


@pytest.mark.parametrize(
    "method,options,rounds",
    [("ifca", '{"clusters": 2}', 15), ("cfl", '{"eps1": 1.6, "eps2": 3.0, "warmup": 5}', 8)],
)
def test_clustered_methods_recover_planted_groups(method, options, rounds, tmp_path):
    data, truth = planted()
    state, _ = run_federated(_fed(tmp_path / method, method, options, rounds), data, head=HEAD)
    got, rec = _assign(tmp_path / method)
    assert adjusted_rand_index(truth, got) == 1.0
    assert len(state.extra["models"]) == 2
    if method == "cfl":  # one cluster until the split, logged with the update norms that triggered it
        split = [r for r in rec if "split" in r.get("cluster_event", {})]
        assert split and split[0]["round"] >= 5
        mean, most = split[0]["cluster_event"]["norms"]["0"]
        assert mean < 1.6 and most > 3.0


def test_ifca_clients_pick_the_model_with_the_lowest_loss(tmp_path):
    data, _ = planted()
    fed = _fed(tmp_path / "i", "ifca", '{"clusters": 3}', 1)
    run = Federation.build(fed, data, HEAD)
    state = run.start(run.config(HEAD), None)
    models = state.extra["models"]
    assert len(models) == 3 and not torch.equal(models[0]["head.mlp.0.weight"], models[1]["head.mlp.0.weight"])
    for c in range(8):
        losses = []
        for m in models:
            run.model.set_params(m)
            data.batchers[c].reseed(123)
            losses.append(client_loss(run.model, data.batchers[c], run.options.loss_batches)[0])
        assert run.cluster.clusterer.choose(run, state.extra, c, 123) == int(np.argmin(losses))


@pytest.mark.parametrize("method,options", [("ifca", '{"clusters": 2}'), ("cfl", '{"eps1": 1.6, "eps2": 3.0}')])
def test_a_crashed_clustered_run_resumes_bit_identically(method, options, tmp_path):
    data, _ = planted()
    full, _ = run_federated(_fed(tmp_path / "full", method, options, 7), data, head=HEAD)
    run_federated(_fed(tmp_path / "cut", method, options, 7), planted()[0], head=HEAD, stop_after=6)
    resumed, _ = run_federated(_fed(tmp_path / "cut", method, options, 7, resume=True), planted()[0], head=HEAD)
    assert len(full.extra["models"]) == len(resumed.extra["models"])
    for a, b in zip(full.extra["models"], resumed.extra["models"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.extra["assign"] == resumed.extra["assign"]
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)


def test_cluster_checkpoints_round_trip_and_reject_tampering(tmp_path):
    data, _ = planted()
    state, _ = run_federated(_fed(tmp_path / "r", "ifca", '{"clusters": 2}', 1), data, head=HEAD)
    save_server_state(state, tmp_path / "ck", {})
    back = load_server_state(tmp_path / "ck" / "round-000001")
    assert back.extra["assign"] == state.extra["assign"]
    assert all(torch.equal(back.extra["models"][1][k], state.extra["models"][1][k]) for k in state.params)
    meta = json.loads((tmp_path / "ck" / "round-000001" / "server.json").read_text())
    meta["extra"]["__dict__"]["models"]["__list__"][0]["__dict__"]["head.mlp.0.bias"] = {"__tensor__": "/x"}
    (tmp_path / "ck" / "round-000001" / "server.json").write_text(json.dumps(meta))
    with pytest.raises(ArtefactError, match="not its own path"):
        load_server_state(tmp_path / "ck" / "round-000001")
    fed = _fed(tmp_path / "r", "ifca", '{"clusters": 2}', 1)
    run = Federation.build(fed, data, HEAD)
    bad = {"models": [dict(state.params)], "opt": [], "assign": {}}
    with pytest.raises(ArtefactError, match="malformed"):
        run.cluster.check(bad, state.params, "ck")


def test_clustered_runs_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="client_fraction 1"):
        Federation.build(_fed(tmp_path, "cfl", "", 1, client_fraction=0.5), planted()[0], HEAD)
    with pytest.raises(ConfigError, match="not both"):
        _fed(tmp_path, "ifca", "", 1, personalize="ditto")
    with pytest.raises(ConfigError, match="unknown option 'k'"):
        _fed(tmp_path, "ifca", '{"k": 3}', 1)
    with pytest.raises(ConfigError, match="cluster is 'none'"):
        FederatedArguments(cluster_options='{"clusters": 2}')
    assert set(CLUSTERERS) == {"ifca", "cfl", "fedem", "mocha"}
