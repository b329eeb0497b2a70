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


# ----------------------------------------------------------------------------------------------
# feature skew, concept shift, joint (issue 28, second increment)
# ----------------------------------------------------------------------------------------------
from asymvlm.federated.partition import (  # noqa: E402
    concept_shift,
    dirichlet_label_skew,
    feature_skew,
    joint_labels,
    joint_skew,
)

STYLED_N = 480


def styled_rows(seed=0):
    """A ShapeWorld-like table: shapes, four visual styles and four caption styles, independent."""
    rng = np.random.default_rng(seed)
    return {
        "shape": rng.choice(["circle", "square", "triangle"], STYLED_N),
        "visual_style": rng.choice(["flat", "noisy", "sketch", "shaded"], STYLED_N),
        "caption_style": rng.choice(["terse", "verbose", "relational", "negated"], STYLED_N),
    }


def same_split(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


STYLE_PRESETS = [("feature_skew", feature_skew, "visual_style"), ("concept_shift", concept_shift, "caption_style")]


@pytest.mark.parametrize("method,fn,column", STYLE_PRESETS)
def test_style_presets_are_dirichlet_on_their_column(method, fn, column):
    ds = styled_rows()
    for seed in (0, 3):
        # the defaults: the preset's column, alpha = 0.1
        reference = dirichlet_label_skew(ds[column], 6, alpha=0.1, seed=seed, min_size=1)
        assert same_split(partition(ds, 6, method, seed=seed), reference)
        assert same_split(fn(ds[column], 6, seed=seed), reference)
        # any options: the dirichlet entry with the same column and options
        opts = {"alpha": 0.7, "min_size": 20, "max_tries": 50}
        got = partition(ds, 6, method, seed=seed, style_column="shape", **opts)
        assert same_split(got, partition(ds, 6, "dirichlet", seed=seed, column="shape", **opts))
        assert covers_once(got, STYLED_N) and min(len(p) for p in got) >= 20
    assert same_split(partition(ds, 6, method, seed=1), partition(ds, 6, method, seed=1))
    assert not same_split(partition(ds, 6, method, seed=1), partition(ds, 6, method, seed=2))
    assert PARTITIONER_REGISTRY[method].param_names == ("style_column", "alpha", "min_size", "max_tries")
    assert PARTITIONER_REGISTRY.resolve(method)["style_column"] == column


@pytest.mark.parametrize("method,fn,column", STYLE_PRESETS)
def test_style_presets_with_small_alpha_give_each_client_one_style(method, fn, column):
    ds = styled_rows()
    labels = ds[column]
    other = "caption_style" if column == "visual_style" else "visual_style"
    iid_js = heterogeneity_report(iid(STYLED_N, 4, seed=5), labels)["js_mean"]
    for seed in range(4):
        parts = partition(ds, 4, method, alpha=0.01, min_size=20, seed=seed)
        assert covers_once(parts, STYLED_N) and min(len(p) for p in parts) >= 20
        dominant = [max(np.unique(labels[p], return_counts=True)[1]) / len(p) for p in parts]
        assert np.mean(dominant) > 0.75, dominant
        # mean JS to the population near its maximum (one style per client: 0.549 bits here), far above IID's
        assert heterogeneity_report(parts, labels)["js_mean"] > 0.35 > 0.05 > iid_js
        # the other style column is untouched: each client looks like the population there
        assert heterogeneity_report(parts, ds[other])["js_mean"] < 0.05


def test_joint_labels_are_the_ranks_of_the_value_tuples():
    ds = styled_rows()
    tuples = list(zip(ds["shape"].tolist(), ds["caption_style"].tolist()))
    rank = {t: i for i, t in enumerate(sorted(set(tuples)))}
    assert joint_labels([ds["shape"], ds["caption_style"]]).tolist() == [rank[t] for t in tuples]
    assert joint_labels([[3, 1, 3]]).tolist() == [1, 0, 1]
    with pytest.raises(InputError, match="one length"):
        joint_labels([[1, 2], [1, 2, 3]])
    with pytest.raises(InputError, match="one or more columns"):
        joint_labels([])


def test_joint_without_quantity_skew_is_dirichlet_over_the_zipped_labels():
    ds = styled_rows()
    zipped = [f"{a}|{b}" for a, b in zip(ds["shape"], ds["caption_style"])]  # no '|' inside: the same order
    for seed in (0, 4):
        reference = dirichlet_label_skew(zipped, 5, alpha=0.3, seed=seed, min_size=10)
        for columns in (["shape", "caption_style"], "shape, caption_style"):
            got = partition(ds, 5, "joint", seed=seed, columns=columns, alpha=0.3, min_size=10)
            assert same_split(got, reference)
            assert covers_once(got, STYLED_N) and min(len(p) for p in got) >= 10
        direct = joint_skew([ds["shape"], ds["caption_style"]], 5, alpha=0.3, seed=seed, min_size=10)
        assert same_split(direct, reference)
    # one column: the dirichlet entry on it
    assert same_split(
        partition(ds, 5, "joint", seed=2, columns=["shape"]), partition(ds, 5, "dirichlet", seed=2, column="shape")
    )
    # every client's joint labels are skewed: far from the population over the product
    labels = joint_labels([ds["shape"], ds["caption_style"]])
    skewed = partition(ds, 5, "joint", seed=0, columns=["shape", "caption_style"], alpha=0.05)
    assert (
        heterogeneity_report(skewed, labels)["js_mean"] > 3 * heterogeneity_report(iid(STYLED_N, 5), labels)["js_mean"]
    )


def gini(sizes):
    x = np.asarray(sizes, dtype=np.float64)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_joint_quantity_exponent_makes_sizes_unequal_and_follows_the_power_law():
    ds = styled_rows()
    cols = ["shape", "caption_style"]
    flat = [gini([len(p) for p in partition(ds, 8, "joint", seed=s, columns=cols, alpha=1.0)]) for s in range(6)]
    steep = [
        gini([len(p) for p in partition(ds, 8, "joint", seed=s, columns=cols, alpha=1.0, quantity_exponent=1.5)])
        for s in range(6)
    ]
    assert np.mean(steep) > np.mean(flat) + 0.15
    # a huge alpha: every label's proportions sit at their mean p, so size_k ~ n p_k (the docstring's formula)
    for seed, exponent in ((0, 1.0), (7, 0.5)):
        parts = partition(ds, 6, "joint", seed=seed, columns=cols, alpha=1e5, quantity_exponent=exponent, min_size=1)
        w = (np.random.default_rng(seed).permutation(6) + 1.0) ** -exponent
        expected = STYLED_N * w / w.sum()
        labels = len(np.unique(joint_labels([ds[c] for c in cols])))
        assert np.all(np.abs(np.array([len(p) for p in parts]) - expected) <= labels + 1)
        assert covers_once(parts, STYLED_N)
    a = partition(ds, 6, "joint", seed=3, columns=cols, quantity_exponent=1.0)
    assert same_split(a, partition(ds, 6, "joint", seed=3, columns=cols, quantity_exponent=1.0))
    assert not same_split(a, partition(ds, 6, "joint", seed=4, columns=cols, quantity_exponent=1.0))


def test_joint_honours_min_size_or_says_why_not():
    ds = styled_rows()
    cols = ["shape", "caption_style"]
    parts = partition(ds, 8, "joint", seed=0, columns=cols, alpha=0.5, quantity_exponent=1.0, min_size=25)
    assert covers_once(parts, STYLED_N) and min(len(p) for p in parts) >= 25
    with pytest.raises(ConfigError, match="no joint Dirichlet.*gave every client 59 rows in 3 tries"):
        partition(ds, 8, "joint", seed=0, columns=cols, alpha=0.5, quantity_exponent=2.0, min_size=59, max_tries=3)
    with pytest.raises(ConfigError, match="cannot give 8 clients at least 61 rows"):
        partition(ds, 8, "joint", columns=cols, min_size=61)


def test_new_partitioners_reject_bad_options_and_missing_columns():
    ds = styled_rows()
    for method, options, message in [
        ("joint", {"columns": ["shape"], "column": "shape"}, "unknown option 'column' for partition 'joint'"),
        ("feature_skew", {"column": "shape"}, "unknown option 'column' for partition 'feature_skew'"),
        ("joint", {"columns": []}, "partition 'joint': columns must be a non-empty list of column names"),
        ("joint", {"columns": ["shape", 3]}, "columns must be a non-empty list"),
        ("joint", {"columns": 3}, "columns must be a non-empty list"),
        ("joint", {"columns": " , "}, "columns must be a non-empty list"),
        ("joint", {"columns": ["shape"], "quantity_exponent": -1}, "quantity_exponent must be >= 0 and finite"),
        ("joint", {"columns": ["shape"], "alpha": 0}, "partition 'joint': alpha must be > 0"),
        ("concept_shift", {"alpha": -0.1}, "partition 'concept_shift': alpha must be > 0"),
        ("feature_skew", {"style_column": 3}, "style_column must be a string, got 3"),
        ("joint", {}, "partition 'joint' needs columns"),
    ]:
        with pytest.raises(ConfigError, match=message):
            partition(ds, 4, method, **options)
    available = r"available: \['caption_style', 'shape', 'visual_style'\]"
    with pytest.raises(ConfigError, match=f"partition 'joint': no column 'colour' in the data; {available}"):
        partition(ds, 4, "joint", columns=["shape", "colour"])
    with pytest.raises(ConfigError, match="partition 'feature_skew': no column 'visual_style'.*'caption_style'"):
        partition({"caption_style": ds["caption_style"]}, 4, "feature_skew")
    with pytest.raises(ConfigError, match="no column 'caption_style' in the data .the data have no named columns"):
        partition(range(10), 2, "concept_shift")
    from datasets import Dataset

    table = Dataset.from_dict({"shape": ds["shape"].tolist()})
    with pytest.raises(ConfigError, match=r"no column 'visual_style' in the data; available: \['shape'\]"):
        partition(table, 4, "feature_skew")
    assert same_split(
        partition(table, 4, "feature_skew", style_column="shape", seed=1),
        dirichlet_label_skew(ds["shape"], 4, 0.1, seed=1),
    )


def test_the_command_line_options_reach_the_new_partitioners():
    from asymvlm.federated.config import FederatedArguments

    fed = FederatedArguments(partition="joint", partition_options='{"columns": ["shape", "caption_style"]}')
    kwargs = fed.partition_kwargs()
    assert kwargs["columns"] == ["shape", "caption_style"] and "column" not in kwargs
    assert FederatedArguments(partition="joint", partition_options={"columns": "shape,caption_style"})
    with pytest.raises(ConfigError, match="columns must be a non-empty list"):
        FederatedArguments(partition="joint", partition_options='{"columns": []}')
    # --partition_column (default caption_style) does not replace feature_skew's own column
    for method, column in (("feature_skew", "visual_style"), ("concept_shift", "caption_style")):
        kwargs = FederatedArguments(partition=method).partition_kwargs()
        assert "column" not in kwargs and PARTITIONER_REGISTRY.resolve(method, kwargs)["style_column"] == column


def test_a_partition_alpha_flag_left_at_its_default_gives_way_to_the_presets_own():
    from asymvlm.federated.config import FederatedArguments

    assert FederatedArguments(partition="feature_skew").partition_kwargs() == {"alpha": 0.1, "min_size": 4}
    assert FederatedArguments(partition="concept_shift", partition_alpha=0.3).partition_kwargs()["alpha"] == 0.3
    assert FederatedArguments(partition="dirichlet").partition_kwargs()["alpha"] == 0.5  # its own default is 0.5
