"""Fed3R against the centralised ridge solution; partitioners' invariants."""

import numpy as np
import pytest
import torch

from asymvlm.federated.fed3r import client_statistics, solve
from asymvlm.federated.partition import (
    dirichlet_label_skew,
    domain_skew,
    iid,
    partition,
    partition_summary,
    quantity_skew,
)


def test_fed3r_equals_centralised_ridge_to_1e_8():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    parts = dirichlet_label_skew(y.numpy(), 7, alpha=0.3, seed=1)
    head = solve([client_statistics(x[p], y[p], 5) for p in parts], lam=0.01)
    # centralised ridge with an appended bias column, in numpy float64
    phi = np.hstack([x.numpy(), np.ones((300, 1))])
    onehot = np.eye(5)[y.numpy()]
    w = np.linalg.solve(phi.T @ phi + 0.01 * np.eye(17), phi.T @ onehot)
    np.testing.assert_allclose(head.weight.numpy(), w[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(head.bias.numpy(), w[-1], rtol=1e-8, atol=1e-10)
    shuffled = solve([client_statistics(x[p], y[p], 5) for p in reversed(parts)], lam=0.01)
    torch.testing.assert_close(shuffled.weight, head.weight, rtol=1e-12, atol=1e-12)
    normed = solve([client_statistics(x, y, 5)], lam=0.01, normalize=True)
    torch.testing.assert_close(normed.weight.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_fed3r_bad_input():
    with pytest.raises(ValueError, match="labels must be in"):
        client_statistics(torch.zeros(3, 2), torch.tensor([0, 1, 4]), 3)
    with pytest.raises(ValueError, match="NaN"):
        client_statistics(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="different shapes"):
        solve(
            [
                client_statistics(torch.zeros(2, 2), torch.tensor([0, 1]), 2),
                client_statistics(torch.zeros(2, 3), torch.tensor([0, 1]), 2),
            ]
        )


def covers(parts, n):
    allidx = np.concatenate(parts)
    return sorted(allidx.tolist()) == list(range(n))


def test_partitioners_cover_disjointly_with_min_size_and_seed():
    labels = np.repeat(np.arange(5), 40)
    for parts in (
        iid(200, 7, seed=3),
        dirichlet_label_skew(labels, 7, 0.1, seed=3, min_size=5),
        quantity_skew(200, 7, 0.5, seed=3, min_size=5),
        domain_skew(labels, 10, seed=3),
    ):
        assert covers(parts, 200) and min(len(p) for p in parts) >= 1
    a = dirichlet_label_skew(labels, 7, 0.1, seed=3, min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, dirichlet_label_skew(labels, 7, 0.1, seed=3, min_size=5)))
    assert min(len(p) for p in a) >= 5

    # small alpha concentrates labels; large alpha approaches IID
    def label_entropy(parts):
        ent = []
        for p in parts:
            c = np.bincount(labels[p], minlength=5) / len(p)
            ent.append(-(c[c > 0] * np.log(c[c > 0])).sum())
        return np.mean(ent)

    assert label_entropy(dirichlet_label_skew(labels, 5, 0.05, seed=0)) < label_entropy(
        dirichlet_label_skew(labels, 5, 100.0, seed=0)
    )
    # domain skew: every client sees exactly one domain
    for p in domain_skew(labels, 10, seed=1):
        assert len(set(labels[p].tolist())) == 1
    sizes = [len(p) for p in quantity_skew(200, 5, 0.2, seed=0)]
    assert max(sizes) > 2 * min(sizes)


def test_partition_and_summary():
    from asymvlm.worlds import shapeworld as sw

    ds = sw.generate(120, seed=0, caption_styles=sw.CAPTION_STYLES)
    parts = partition(ds, 4, "domain", column="caption_style", seed=0)
    assert covers(parts, 120)
    assert all(len(set(np.asarray(ds["caption_style"])[p])) == 1 for p in parts)
    text = partition_summary(parts, ds["caption_style"])
    assert text.count("client") == 4 and "rows" in text
    with pytest.raises(ValueError, match="needs a column"):
        partition(ds, 4, "dirichlet")
    with pytest.raises(ValueError, match="cannot give 200 clients"):
        iid(120, 200)
    with pytest.raises(ValueError, match="4 domains need at least"):
        domain_skew(np.asarray(ds["caption_style"]), 2)
