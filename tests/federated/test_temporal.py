"""Temporal skew (issue 28): clients' data move to a second phase at a scheduled round, and CFL's
drift-triggered re-clustering follows them (a planted drift: half the clients' captions stop
being rotated at round 11, so they belong with the other half from then on)."""

import json

import numpy as np
import pytest
import torch

from asymvlm.batching import IndexBatcher
from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import FederatedData, get_federated_data
from asymvlm.federated.partition import embedding_clusters
from asymvlm.federated.rounds import run_federated
from asymvlm.federated.temporal import TEMPORAL_CLUSTERS, DriftingBatcher, temporal_phases
from asymvlm.heads import HeadConfig


def test_phases_split_each_client_by_label_and_keep_single_label_clients():
    labels = np.array(list("aabbccdd") + ["e"] * 4)
    parts = [np.arange(8), np.arange(8, 12)]
    (a0, a1), (b0, b1) = temporal_phases(parts, labels, seed=3)
    assert sorted([*a0, *a1]) == list(range(8)) and not set(a0) & set(a1)
    assert not set(labels[a0]) & set(labels[a1]) and len(set(labels[a0])) == 2  # two labels each
    assert b0.tolist() == b1.tolist() == [8, 9, 10, 11]  # one label: no drift
    assert [p.tolist() for p in temporal_phases(parts, labels, seed=3)[0]] == [a0.tolist(), a1.tolist()]


def test_a_drifting_batcher_switches_at_its_round():
    b0 = IndexBatcher(torch.eye(4), torch.eye(4), torch.arange(4), 2, seed=0)
    b1 = IndexBatcher(torch.eye(4)[:2], torch.eye(4), torch.arange(2), 2, seed=0)
    d = DriftingBatcher([b0, b1], [3])  # phase 1 from round 3 (1-based)
    seen = []
    for rnd in range(4):
        d.set_round(rnd)
        seen.append((d.phase, d.num_texts))
    assert seen == [(0, 4), (0, 4), (1, 2), (1, 2)]
    with pytest.raises(ConfigError, match="switch round"):
        DriftingBatcher([b0, b1], [])


def test_the_cli_path_builds_phases_from_the_column(tmp_path, synthetic_cache):
    cache = synthetic_cache(tmp_path / "c", 40)
    fed = FederatedArguments(
        num_clients=2, local_batch_size=4, progress=False, temporal_column="image_embedding", temporal_switch=2
    )
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    from asymvlm.cache import EmbeddingCache

    emb = EmbeddingCache.load(cache).image_embeddings.float().numpy()
    labels = embedding_clusters(emb, TEMPORAL_CLUSTERS, fed.seed)
    for b in data.batchers:
        imgs = [sorted(set(p.owner.tolist())) for p in b.phases]
        assert not set(imgs[0]) & set(imgs[1]) or imgs[0] == imgs[1]
        assert not set(labels[imgs[0]]) & set(labels[imgs[1]]) or imgs[0] == imgs[1]
    with pytest.raises(ConfigError, match="go together"):
        FederatedArguments(temporal_column="shape")


def test_cfl_reclusters_clients_whose_data_drift(tmp_path):
    g = torch.Generator().manual_seed(0)
    dim, per = 16, 24
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]

    def make(r, c):
        img = torch.nn.functional.normalize(torch.randn(per, dim, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(img @ r.T + 0.2 * torch.randn(per, dim, generator=g), dim=-1)
        return IndexBatcher(txt, img, torch.arange(per), 8, seed=c)

    eye = torch.eye(dim)
    batchers = [make(eye, c) if c < 4 else DriftingBatcher([make(rot, c), make(eye, c)], [11]) for c in range(8)]
    fed = FederatedArguments(
        num_clients=8, rounds=11, local_steps=10, local_lr=1.0, local_batch_size=8, progress=False, eval_every=0,
        output_dir=str(tmp_path / "d"), cluster="cfl",
        cluster_options='{"eps1": 1.6, "eps2": 3.0, "warmup": 5, "drift": 0.5}',
    )  # fmt: skip
    head = HeadConfig(dim=16, hidden_dims=(32,), direction="learned")
    run_federated(fed, FederatedData(batchers, [per] * 8, dim, None), head=head)
    rec = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assign = [[r["clusters"]["assign"][str(c)] for c in range(8)] for r in rec]
    assert assign[9] == [0, 0, 0, 0, 1, 1, 1, 1]  # before the drift: the planted groups
    assert assign[10] == [0] * 8  # round 11: the drifted clients rejoin the others
    moved = rec[10]["cluster_event"]["reassigned"]
    assert sorted(m["client"] for m in moved) == [4, 5, 6, 7] and all(m["loss"] > 1.5 * m["previous"] for m in moved)
