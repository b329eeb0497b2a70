"""The pathological, power-law and embedding partitioners and the heterogeneity report, against
hand computations, numpy transcriptions of the formulas and scipy."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from asymvlm.errors import ConfigError, InputError
from asymvlm.federated.heterogeneity import heterogeneity_report, js_divergence, plot_heterogeneity
from asymvlm.federated.partition import (
    PARTITIONER_REGISTRY,
    embedding_clusters,
    embedding_skew,
    iid,
    partition,
    pathological_label_skew,
    powerlaw_quantity_skew,
)


def covers_once(parts, n):
    rows = np.concatenate(parts)
    return len(rows) == n and np.array_equal(np.sort(rows), np.arange(n))


# ----------------------------------------------------------------------------------------------
# pathological
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "counts,num_clients,k",
    [([40] * 10, 10, 2), ([40] * 10, 7, 3), ([5, 50, 17, 33, 9], 6, 2), ([30] * 4, 4, 4), ([12] * 3, 9, 1)],
)
def test_pathological_gives_exactly_k_labels_and_every_row_once(counts, num_clients, k):
    labels = np.repeat(np.arange(len(counts)), counts)
    for seed in (0, 1, 2):
        parts = pathological_label_skew(labels, num_clients, k, seed=seed)
        assert len(parts) == num_clients
        assert covers_once(parts, len(labels))
        assert [len(np.unique(labels[p])) for p in parts] == [k] * num_clients
    ds = {"y": labels}
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            partition(ds, num_clients, "pathological", column="y", classes_per_client=k, seed=4),
            pathological_label_skew(labels, num_clients, k, seed=4),
        )
    )


def test_pathological_on_equal_classes_is_the_shard_split():
    # 10 labels x 40 rows, 10 clients x 2 labels = 20 shards: every label 2 shards of 20 rows
    labels = np.repeat(np.arange(10), 40)
    parts = pathological_label_skew(labels, 10, 2, seed=0)
    assert [len(p) for p in parts] == [40] * 10
    holders = np.zeros(10, dtype=int)
    for p in parts:
        values, n = np.unique(labels[p], return_counts=True)
        assert n.tolist() == [20, 20]
        holders[values] += 1
    assert holders.tolist() == [2] * 10
    assert not all(np.array_equal(a, b) for a, b in zip(parts, pathological_label_skew(labels, 10, 2, seed=1)))


def test_pathological_rejects_impossible_requests():
    labels = np.repeat(np.arange(5), 4)  # 5 labels x 4 rows
    with pytest.raises(ConfigError, match="classes_per_client=6 exceeds the 5 distinct labels"):
        pathological_label_skew(labels, 3, 6)
    with pytest.raises(ConfigError, match="2 clients x 2 labels = 4 shards cannot cover 5 labels"):
        pathological_label_skew(labels, 2, 2)
    # 10 clients x 3 labels = 30 shards; each label gives at most min(4 rows, 10 clients) = 4: 20 possible
    with pytest.raises(ConfigError, match="30 shards exceed the 20 possible"):
        pathological_label_skew(labels, 10, 3)
    with pytest.raises(ConfigError, match="fewer than min_size=3"):  # label 0's client has 2 rows
        pathological_label_skew(np.repeat(np.arange(5), [2, 10, 10, 10, 10]), 5, 1, min_size=3)
    with pytest.raises(ConfigError, match="partition 'pathological' needs a column"):
        partition({"y": labels}, 3, "pathological")
    with pytest.raises(ConfigError, match="classes_per_client must be >= 1, got 0"):
        partition({"y": labels}, 3, "pathological", column="y", classes_per_client=0)


# ----------------------------------------------------------------------------------------------
# power law
# ----------------------------------------------------------------------------------------------
def powerlaw_sizes(n, num_clients, exponent, seed, min_size):
    """The docstring's formula, transcribed."""
    rng = np.random.default_rng(seed)
    rank = rng.permutation(num_clients)
    p = (rank + 1.0) ** -exponent
    p = p / p.sum()
    extra = n - num_clients * min_size
    exact = p * extra
    sizes = [min_size + math.floor(x) for x in exact]
    left = n - sum(sizes)
    by_fraction = sorted(range(num_clients), key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    for k in by_fraction[:left]:
        sizes[k] += 1
    return sizes


@pytest.mark.parametrize("n,num_clients,exponent,min_size", [(1000, 8, 1.0, 1), (1000, 8, 2.5, 20), (97, 5, 0.0, 3)])
def test_powerlaw_sizes_follow_the_formula_and_min_size(n, num_clients, exponent, min_size):
    for seed in (0, 5):
        parts = powerlaw_quantity_skew(n, num_clients, exponent, seed=seed, min_size=min_size)
        sizes = [len(p) for p in parts]
        assert sizes == powerlaw_sizes(n, num_clients, exponent, seed, min_size)
        assert min(sizes) >= min_size and covers_once(parts, n)
        via = partition(range(n), num_clients, "powerlaw", exponent=exponent, min_size=min_size, seed=seed)
        assert all(np.array_equal(a, b) for a, b in zip(parts, via))
    if exponent == 0:
        assert max(sizes) - min(sizes) <= 1
    else:  # sorted by rank, sizes fall like (r + 1)^-exponent
        order = np.argsort([len(p) for p in parts])[::-1]
        assert len(parts[order[0]]) > len(parts[order[-1]])


def test_powerlaw_rejects_bad_options():
    with pytest.raises(ConfigError, match="partition 'powerlaw': exponent must be >= 0 and finite, got -1.0"):
        partition(range(10), 2, "powerlaw", exponent=-1)
    with pytest.raises(ConfigError, match="10 rows cannot give 4 clients at least 3 rows each"):
        powerlaw_quantity_skew(10, 4, 1.0, min_size=3)


# ----------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------
def blobs(per=60, dims=8, centres=4, seed=0):
    rng = np.random.default_rng(seed)
    means = 20.0 * np.eye(centres, dims)
    x = np.concatenate([m + rng.normal(size=(per, dims)) for m in means])
    return x, np.repeat(np.arange(centres), per)


def test_embedding_recovers_well_separated_blobs():
    x, truth = blobs()
    ids = embedding_clusters(x, 4, seed=0)
    # the clustering equals the truth up to a relabelling: a bijection between ids and blobs
    pairs = set(zip(ids.tolist(), truth.tolist()))
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4


def test_embedding_skew_with_tiny_alpha_gives_each_client_mostly_one_blob():
    x, truth = blobs()
    parts = embedding_skew(x, 4, clusters=4, alpha=0.01, seed=3, min_size=1)
    assert covers_once(parts, len(x))
    purity = [np.bincount(truth[p], minlength=4).max() / len(p) for p in parts]
    assert np.mean(purity) > 0.9
    report = heterogeneity_report(parts, truth)
    iid_report = heterogeneity_report(iid(len(x), 4, seed=3), truth)
    assert report["js_mean"] > 0.5 > 0.01 > iid_report["js_mean"]


def test_embedding_skew_is_seed_deterministic_and_registered():
    x, _ = blobs(per=30)
    ds = {"emb": [row.tolist() for row in x]}  # a datasets column of vectors is a list of lists
    a = partition(ds, 5, "embedding", column="emb", clusters=4, alpha=0.3, seed=7)
    b = partition(ds, 5, "embedding", column="emb", clusters=4, alpha=0.3, seed=7)
    c = partition(ds, 5, "embedding", column="emb", clusters=4, alpha=0.3, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    assert all(np.array_equal(p, q) for p, q in zip(a, embedding_skew(x, 5, 4, 0.3, seed=7)))
    with pytest.raises(ConfigError, match="clusters must be in"):
        embedding_skew(x, 5, clusters=len(x) + 1)
    with pytest.raises(InputError, match="column of vectors"):
        embedding_skew(np.arange(10.0), 2, clusters=2)
    with pytest.raises(ConfigError, match="partition 'embedding' needs a column"):
        partition(ds, 5, "embedding")
    assert PARTITIONER_REGISTRY["embedding"].param_names == ("column", "clusters", "alpha", "min_size", "max_tries")


# ----------------------------------------------------------------------------------------------
# heterogeneity report
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "p,q",
    [
        ([1, 0, 0], [0, 0, 1]),
        ([3, 1, 0, 2], [1, 1, 1, 1]),
        ([0.2, 0.8], [0.5, 0.5]),
        ([5, 5], [5, 5]),
        ([1, 2], [7, 0]),
    ],
)
def test_js_divergence_is_scipys_distance_squared(p, q):
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)


def test_js_divergence_hand_values():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: 1 bit
    # delta vs uniform on two labels: M = (3/4, 1/4); (log2(4/3) + 1/2 log2(2/3) + 1/2 log2 2) / 2
    hand = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_divergence([1, 0], [1, 1]) == pytest.approx(hand)
    with pytest.raises(InputError):
        js_divergence([1, 2], [1, 2, 3])


def test_report_iid_is_near_zero_and_one_label_per_client_is_the_maximum():
    c = 6
    labels = np.repeat(np.arange(c), 500)
    iid_report = heterogeneity_report(iid(len(labels), c, seed=0), labels)
    assert iid_report["js_mean"] < 0.01 and iid_report["js_weighted_mean"] < 0.01
    one = heterogeneity_report([np.nonzero(labels == v)[0] for v in range(c)], labels)
    # closed form of JS(delta_c, uniform over C) in bits
    kl_delta = math.log2(2 * c / (c + 1))
    kl_uniform = (c - 1) / c + (1 / c) * math.log2(2 / (c + 1))
    closed = (kl_delta + kl_uniform) / 2
    assert one["js"] == pytest.approx([closed] * c)
    assert one["js_mean"] == pytest.approx(closed) == pytest.approx(one["js_max_possible"])
    skewed = heterogeneity_report(pathological_label_skew(labels, c, 2, seed=0), labels)
    assert iid_report["js_mean"] < skewed["js_mean"] < one["js_mean"]
    assert one["sizes"] == [500] * c and one["classes"] == list(range(c))
    assert one["histograms"][2] == [0, 0, 500, 0, 0, 0]
    assert one["population"] == pytest.approx([1 / c] * c)


def test_report_weights_by_size_and_marks_empty_clients():
    labels = np.array([0, 0, 0, 1])
    report = heterogeneity_report([np.array([0, 1, 2]), np.array([3]), np.array([], dtype=np.int64)], labels)
    pop = [0.75, 0.25]
    js = [js_divergence([3, 0], pop), js_divergence([0, 1], pop)]
    assert report["js"][:2] == pytest.approx(js) and math.isnan(report["js"][2])
    assert report["js_mean"] == pytest.approx(sum(js) / 2)
    assert report["js_weighted_mean"] == pytest.approx((3 * js[0] + js[1]) / 4)
    assert report["js_max_possible"] == pytest.approx(js[1])  # the rarer label is the farthest
    with pytest.raises(InputError, match="outside"):
        heterogeneity_report([np.array([9])], labels)


def test_the_plot_is_written(tmp_path):
    labels = np.repeat(np.array(["cat", "dog", "emu"]), 20)
    report = heterogeneity_report(pathological_label_skew(labels, 4, 2, seed=0), labels)
    out = plot_heterogeneity(report, tmp_path / "sub" / "partition.png")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
