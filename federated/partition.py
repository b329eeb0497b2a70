"""Split a dataset among simulated clients: IID, Dirichlet label skew, pathological label skew,
quantity skew (Dirichlet or power law), domain skew, embedding-space skew, feature (visual-style)
skew, concept shift (caption styles) and joint skews over several columns.

Every partitioner is seeded, returns one index array per client (disjoint, covering every row)
and guarantees ``min_size`` rows per client (redrawing, as in the common Dirichlet recipe of
Hsu et al. 2019, https://arxiv.org/abs/1909.06335, up to ``max_tries``). They take the length or a
column of any ``datasets.Dataset``.

The partitioners are the entries of :data:`PARTITIONER_REGISTRY`, each declaring its options
(``alpha``, ``column``, ``min_size``, ...; ``PARTITIONER_REGISTRY.describe()``); the seed
and the number of clients are call arguments. :func:`partition` checks the options strictly (an
option the partitioner does not use is a :class:`~asymvlm.errors.ConfigError`).
:func:`asymvlm.federated.heterogeneity.heterogeneity_report` measures how skewed a split is.

Example:
    >>> parts = dirichlet_label_skew(["a", "b"] * 50, num_clients=4, alpha=0.3, seed=0)
    >>> sorted(int(i) for p in parts for i in p) == list(range(100))
    True
    >>> same = partition({"label": ["a", "b"] * 50}, 4, "dirichlet", column="label", alpha=0.3, seed=0)
    >>> all((x == y).all() for x, y in zip(parts, same))
    True
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from asymvlm.errors import ConfigError, InputError
from asymvlm.registry import Param, Registry, at_least, non_negative, positive

__all__ = [
    "iid",
    "dirichlet_label_skew",
    "quantity_skew",
    "domain_skew",
    "pathological_label_skew",
    "powerlaw_quantity_skew",
    "embedding_clusters",
    "embedding_skew",
    "feature_skew",
    "concept_shift",
    "joint_labels",
    "joint_skew",
    "PARTITIONER_REGISTRY",
    "partition",
    "partition_summary",
]


def _check(n: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ConfigError(f"{n} rows cannot give {num_clients} clients at least {min_size} rows each")


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")


def iid(n: int, num_clients: int, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """A random permutation cut into nearly equal parts."""
    _check(n, num_clients, min_size)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet_label_skew(
    labels: Sequence[Any], num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """For each label, split its rows among clients with proportions ~ Dirichlet(alpha)
    (small alpha: each client sees few labels; large alpha: close to IID)."""
    labels = np.asarray(labels)
    n = len(labels)
    _check(n, num_clients, min_size)
    _check_alpha(alpha)
    parts = _dirichlet_split(
        labels, np.full(num_clients, float(alpha)), np.random.default_rng(seed), min_size, max_tries
    )
    if parts is not None:
        return parts
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gave every client {min_size} rows in {max_tries} tries; "
        f"raise alpha or lower min_size"
    )


def quantity_skew(n: int, num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Client sizes ~ Dirichlet(alpha) (IID content, unequal amounts), each at least ``min_size``."""
    _check(n, num_clients, min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    extra = n - num_clients * min_size
    sizes = min_size + np.floor(rng.dirichlet([alpha] * num_clients) * extra).astype(int)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def domain_skew(domains: Sequence[Any], num_clients: int, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Each client draws from one domain: domains are dealt to clients round-robin (clients of the
    same domain split its rows IID). Needs at least as many clients as domains."""
    domains = np.asarray(domains)
    n = len(domains)
    _check(n, num_clients, min_size)
    values = list(np.unique(domains))
    if num_clients < len(values):
        raise ConfigError(f"{len(values)} domains need at least as many clients, got {num_clients}")
    rng = np.random.default_rng(seed)
    order = [values[i] for i in rng.permutation(len(values))]
    owners = {v: [k for k in range(num_clients) if k % len(values) == i] for i, v in enumerate(order)}
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for v, ks in owners.items():
        rows = rng.permutation(np.nonzero(domains == v)[0])
        for k, chunk in zip(ks, np.array_split(rows, len(ks))):
            parts[k] = np.sort(chunk)
    if min(len(p) for p in parts) < min_size:
        raise ConfigError(f"a domain has too few rows for its clients to get {min_size} each")
    return parts


def _shard_counts(counts: np.ndarray, total: int, num_clients: int) -> np.ndarray:
    """Shards per class: one each, then one at a time to the class whose shards are largest
    (rows per shard), never more shards than rows or than clients (so no client gets two)."""
    shards = np.ones(len(counts), dtype=np.int64)
    cap = np.minimum(counts, num_clients)
    for _ in range(total - len(counts)):
        room = np.where(shards < cap, counts / shards, -1.0)
        shards[int(np.argmax(room))] += 1
    return shards


def pathological_label_skew(
    labels: Sequence[Any], num_clients: int, classes_per_client: int = 2, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Every client holds rows of exactly ``classes_per_client`` distinct labels (McMahan et al.
    2017's shards, https://arxiv.org/abs/1602.05629), every row assigned once.

    The rows, sorted by label, are cut into ``num_clients * classes_per_client`` shards; unlike
    the paper's equal cuts of the sorted list, a shard never straddles two labels and a client never
    gets two shards of one label (so the count is exact): each label gets at least one shard, the
    rest go one at a time to the label with the largest shards. The shards, listed label by label
    in a random label order, are dealt round-robin to the clients in a random client order; each
    label's rows are shuffled and split evenly among its shards.

    Raises:
        ConfigError: fewer labels than ``classes_per_client``; fewer shards than labels
            (``num_clients * classes_per_client`` < labels, so a label would have no client); more
            shards than possible (a label gives at most one shard per client and per row); a
            client under ``min_size``.
    """
    labels = np.asarray(labels)
    n, k = len(labels), classes_per_client
    _check(n, num_clients, min_size)
    if k < 1:
        raise ConfigError(f"classes_per_client must be >= 1, got {k}")
    classes, counts = np.unique(labels, return_counts=True)
    total = num_clients * k
    if k > len(classes):
        raise ConfigError(f"classes_per_client={k} exceeds the {len(classes)} distinct labels")
    if total < len(classes):
        raise ConfigError(
            f"{num_clients} clients x {k} labels = {total} shards cannot cover {len(classes)} labels "
            f"(every row is assigned); raise num_clients or classes_per_client"
        )
    possible = int(np.minimum(counts, num_clients).sum())
    if total > possible:
        raise ConfigError(
            f"{num_clients} clients x {k} labels = {total} shards exceed the {possible} possible "
            f"(a label gives at most one shard per client and per row); lower classes_per_client"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))
    shards = _shard_counts(counts[order].astype(np.float64), total, num_clients)
    owner_of_slot = rng.permutation(num_clients)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    slot = 0
    for c, s in zip(order, shards):
        rows = rng.permutation(np.nonzero(labels == classes[c])[0])
        for chunk in np.array_split(rows, int(s)):
            parts[int(owner_of_slot[slot % num_clients])].extend(chunk.tolist())
            slot += 1
    if min(len(p) for p in parts) < min_size:
        raise ConfigError(f"a client of the pathological split has fewer than min_size={min_size} rows")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def powerlaw_quantity_skew(
    n: int, num_clients: int, exponent: float = 1.0, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew with power-law client sizes (IID content), each at least ``min_size``.

    With ``r`` a random permutation of ``0..num_clients-1`` (client ``k`` has rank ``r_k``),
    ``w_k = (r_k + 1) ** -exponent``, ``p_k = w_k / sum(w)`` and ``E = n - num_clients * min_size``:
    ``size_k = min_size + floor(p_k * E)``, the rows left over (fewer than ``num_clients``) going
    one each to the clients with the largest fractional parts ``p_k * E - floor(p_k * E)`` (ties:
    lower client index). ``exponent = 0`` gives equal sizes. Then a random permutation of the rows
    is cut into those sizes.
    """
    _check(n, num_clients, min_size)
    if not (exponent >= 0 and np.isfinite(exponent)):
        raise ConfigError(f"exponent must be >= 0 and finite, got {exponent}")
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(num_clients)
    weights = (ranks + 1.0) ** -float(exponent)
    share = weights / weights.sum() * (n - num_clients * min_size)
    sizes = min_size + np.floor(share).astype(np.int64)
    left = n - int(sizes.sum())
    sizes[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def embedding_clusters(vectors: Any, clusters: int, seed: int = 0) -> np.ndarray:
    """Cluster ids (``0..clusters-1``, one per row) of k-means on the rows of ``vectors`` (scipy's
    ``kmeans2``, k-means++ initialisation, seeded)."""
    from scipy.cluster.vq import kmeans2

    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"embedding skew needs a column of vectors (2-D), got shape {x.shape}")
    if not 1 <= clusters <= len(x):
        raise ConfigError(f"clusters must be in [1, {len(x)}] (the rows), got {clusters}")
    _, ids = kmeans2(x, clusters, iter=20, minit="++", seed=np.random.default_rng(seed))
    return ids.astype(np.int64)


def embedding_skew(
    vectors: Any,
    num_clients: int,
    clusters: int = 10,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-free skew: k-means of the rows' vectors (e.g. frozen image embeddings) into
    ``clusters`` groups, then :func:`dirichlet_label_skew` over the cluster ids."""
    ids = embedding_clusters(vectors, clusters, seed)
    return dirichlet_label_skew(ids, num_clients, alpha, seed, min_size, max_tries)


def feature_skew(
    styles: Sequence[Any], num_clients: int, alpha: float = 0.1, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Feature (visual-style) skew: :func:`dirichlet_label_skew` over a column of visual domains
    (ShapeWorld's ``visual_style``): each client sees few image styles (FedBN's feature shift)."""
    return dirichlet_label_skew(styles, num_clients, alpha, seed, min_size, max_tries)


def concept_shift(
    styles: Sequence[Any], num_clients: int, alpha: float = 0.1, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Concept shift (the same scenes in other words): :func:`dirichlet_label_skew` over a
    caption-style column (each image's captions are in one style)."""
    return dirichlet_label_skew(styles, num_clients, alpha, seed, min_size, max_tries)


def joint_labels(columns: Sequence[Sequence[Any]]) -> np.ndarray:
    """One id per row for the tuple of its values in ``columns``, in the tuples' lexicographic
    order (each column ordered as ``np.unique`` orders it).

    Example:
        >>> joint_labels([["b", "a", "b", "a"], [1, 1, 0, 1]]).tolist()
        [2, 0, 1, 0]
    """
    codes = [np.unique(np.asarray(c), return_inverse=True)[1].reshape(-1) for c in columns]
    if len({len(c) for c in codes}) != 1:
        raise InputError(f"need one or more columns of one length, got lengths {[len(c) for c in codes]}")
    return np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _dirichlet_split(
    labels: np.ndarray, concentration: np.ndarray, rng: np.random.Generator, min_size: int, max_tries: int
) -> list[np.ndarray] | None:
    """Each label's rows split with proportions ~ Dirichlet(concentration); None after ``max_tries``."""
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in concentration]
        for c in np.unique(labels):
            rows = rng.permutation(np.nonzero(labels == c)[0])
            cuts = (np.cumsum(rng.dirichlet(concentration))[:-1] * len(rows)).astype(int)
            for k, chunk in enumerate(np.split(rows, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    return None


def joint_skew(
    columns: Sequence[Sequence[Any]],
    num_clients: int,
    alpha: float = 0.5,
    quantity_exponent: float = 0.0,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Compositions: Dirichlet skew over the Cartesian product of columns (e.g. attribute skew and
    concept shift, ``shape`` x ``caption_style``), optionally with power-law quantity skew.

    ``quantity_exponent = 0``: exactly :func:`dirichlet_label_skew` over :func:`joint_labels`.
    ``quantity_exponent = e > 0``: first ``r = rng.permutation(num_clients)`` and target shares
    ``p_k = (r_k + 1)^-e / sum_j (r_j + 1)^-e`` (as :func:`powerlaw_quantity_skew`); then each joint
    label's proportions are ~ Dirichlet(alpha * num_clients * p), whose mean is ``p``: client ``k``
    gets a share ``p_k`` of every label on average, the total concentration staying
    ``alpha * num_clients``. Splits under ``min_size`` are redrawn (the ranks are kept).
    """
    labels = joint_labels(columns)
    _check(len(labels), num_clients, min_size)
    _check_alpha(alpha)
    if not (quantity_exponent >= 0 and np.isfinite(quantity_exponent)):
        raise ConfigError(f"quantity_exponent must be >= 0 and finite, got {quantity_exponent}")
    rng = np.random.default_rng(seed)
    concentration = np.full(num_clients, float(alpha))
    if quantity_exponent > 0:  # no draw at 0: the split is then dirichlet_label_skew's, draw for draw
        weights = (rng.permutation(num_clients) + 1.0) ** -float(quantity_exponent)
        concentration = alpha * num_clients * weights / weights.sum()
    parts = _dirichlet_split(labels, concentration, rng, min_size, max_tries)
    if parts is None:
        raise ConfigError(
            f"no joint Dirichlet(alpha={alpha}, quantity_exponent={quantity_exponent}) split gave every client "
            f"{min_size} rows in {max_tries} tries; raise alpha or lower quantity_exponent or min_size"
        )
    return parts


# ----------------------------------------------------------------------------------------------
# the registry: PARTITIONER_REGISTRY.build(method, **options) -> split(dataset, num_clients, seed=0)
# ----------------------------------------------------------------------------------------------
PARTITIONER_REGISTRY = Registry("partition")

_MIN_SIZE = Param("min_size", int, 1, "Fewest rows per client.", check=at_least(1))
_ALPHA = Param(
    "alpha", float, 0.5, "Dirichlet concentration: small = strongly skewed, large = close to IID.", check=positive
)

_REDRAWN_MIN_SIZE = Param(
    "min_size", int, 1, "Fewest rows per client (the split is redrawn until it holds).", check=at_least(1)
)
_MAX_TRIES = Param("max_tries", int, 1000, "Redraws before giving up on min_size.", check=at_least(1))

Split = Callable[..., list[np.ndarray]]  # (dataset, num_clients, seed=0) -> one index array per client


def _column(method: str, column: str | None, what: str) -> str:
    if column is None:
        raise ConfigError(f"partition {method!r} needs a column (the {what}); pass column=...")
    return column


@PARTITIONER_REGISTRY.register(
    "iid",
    params=[_MIN_SIZE],
    help="A random permutation cut into nearly equal parts.",
    reference="McMahan et al. 2017 (FedAvg's IID split) https://arxiv.org/abs/1602.05629",
    fn=iid,
)
def _iid(min_size: int) -> Split:
    return lambda dataset, num_clients, seed=0: iid(len(dataset), num_clients, seed, min_size)


@PARTITIONER_REGISTRY.register(
    "dirichlet",
    params=[
        Param("column", str, None, "Column of labels to skew (required)."),
        _ALPHA,
        _REDRAWN_MIN_SIZE,
        _MAX_TRIES,
    ],
    help="Label skew: each label's rows split among clients with proportions ~ Dirichlet(alpha).",
    reference="Hsu et al. 2019 https://arxiv.org/abs/1909.06335",
    fn=dirichlet_label_skew,
)
def _dirichlet(column: str | None, alpha: float, min_size: int, max_tries: int) -> Split:
    column = _column("dirichlet", column, "label column to skew")
    return lambda dataset, num_clients, seed=0: dirichlet_label_skew(
        dataset[column], num_clients, alpha, seed, min_size, max_tries
    )


@PARTITIONER_REGISTRY.register(
    "quantity",
    params=[_ALPHA, _MIN_SIZE],
    help="Quantity skew: IID content, client sizes ~ Dirichlet(alpha), each at least min_size.",
    reference="Li et al. 2022 (NIID-Bench) https://arxiv.org/abs/2102.02079",
    fn=quantity_skew,
)
def _quantity(alpha: float, min_size: int) -> Split:
    return lambda dataset, num_clients, seed=0: quantity_skew(len(dataset), num_clients, alpha, seed, min_size)


@PARTITIONER_REGISTRY.register(
    "domain",
    params=[Param("column", str, None, "Column of domains, one domain per client (required)."), _MIN_SIZE],
    help="Domain (feature) skew: domains dealt to clients round-robin; needs clients >= domains.",
    reference="Li et al. 2021 (FedBN) https://arxiv.org/abs/2102.07623",
    fn=domain_skew,
)
def _domain(column: str | None, min_size: int) -> Split:
    column = _column("domain", column, "domain column")
    return lambda dataset, num_clients, seed=0: domain_skew(dataset[column], num_clients, seed, min_size)


@PARTITIONER_REGISTRY.register(
    "pathological",
    params=[
        Param("column", str, None, "Column of labels (required)."),
        Param("classes_per_client", int, 2, "Distinct labels every client holds (exactly).", check=at_least(1)),
        _MIN_SIZE,
    ],
    help="Pathological label skew: every client holds exactly classes_per_client labels (label-sorted shards).",
    reference="McMahan et al. 2017 (FedAvg's pathological non-IID shards) https://arxiv.org/abs/1602.05629",
    fn=pathological_label_skew,
)
def _pathological(column: str | None, classes_per_client: int, min_size: int) -> Split:
    column = _column("pathological", column, "label column")
    return lambda dataset, num_clients, seed=0: pathological_label_skew(
        dataset[column], num_clients, classes_per_client, seed, min_size
    )


@PARTITIONER_REGISTRY.register(
    "powerlaw",
    params=[
        Param(
            "exponent",
            float,
            1.0,
            "Power-law exponent: size_k ~ (rank_k + 1)^-exponent (0 = equal).",
            check=non_negative,
        ),
        _MIN_SIZE,
    ],
    help="Quantity skew: IID content, client sizes ~ (random rank + 1)^-exponent, each at least min_size.",
    reference=(
        "power-law client sizes as in LEAF (Caldas et al. 2018) https://arxiv.org/abs/1812.01097; "
        "quantity skew: Li et al. 2022 (NIID-Bench) https://arxiv.org/abs/2102.02079"
    ),
    fn=powerlaw_quantity_skew,
)
def _powerlaw(exponent: float, min_size: int) -> Split:
    return lambda dataset, num_clients, seed=0: powerlaw_quantity_skew(
        len(dataset), num_clients, exponent, seed, min_size
    )


@PARTITIONER_REGISTRY.register(
    "embedding",
    params=[
        Param("column", str, None, "Column of vectors, e.g. frozen image embeddings (required)."),
        Param("clusters", int, 10, "k-means clusters of the vectors.", check=at_least(1)),
        _ALPHA,
        _REDRAWN_MIN_SIZE,
        _MAX_TRIES,
    ],
    help="Embedding-space skew (no labels needed): k-means of a vector column, then Dirichlet(alpha) over clusters.",
    reference=(
        "k-means: scipy.cluster.vq.kmeans2; Dirichlet over clusters: Hsu et al. 2019 https://arxiv.org/abs/1909.06335"
    ),
    fn=embedding_skew,
)
def _embedding(column: str | None, clusters: int, alpha: float, min_size: int, max_tries: int) -> Split:
    column = _column("embedding", column, "vector column to cluster")
    return lambda dataset, num_clients, seed=0: embedding_skew(
        dataset[column], num_clients, clusters, alpha, seed, min_size, max_tries
    )


def _get(method: str, dataset: Any, column: str) -> Any:
    """``dataset[column]``, or a :class:`ConfigError` naming it and the columns the data have."""
    try:
        return dataset[column]
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError, IndexError):
        names = dataset.keys() if hasattr(dataset, "keys") else getattr(dataset, "column_names", None)
        have = f"; available: {sorted(map(str, names))}" if names is not None else " (the data have no named columns)"
        raise ConfigError(f"partition {method!r}: no column {column!r} in the data{have}") from None


_FEATURE_SKEW_REF = (
    "FedBN (Li et al. 2021) https://arxiv.org/abs/2102.07623; NIID-Bench https://arxiv.org/abs/2102.02079"
)
_KAIROUZ = "Kairouz et al. 2021 §3.1 https://arxiv.org/abs/1912.04977"


def _style_preset(method: str, fn: Split, default: str, what: str, reference: str) -> None:
    """A named Dirichlet preset over ``style_column`` (not ``column``: ``--partition_column`` goes
    to every partitioner declaring ``column``, and its default would replace the preset's)."""

    def factory(style_column: str, alpha: float, min_size: int, max_tries: int) -> Split:
        return lambda dataset, num_clients, seed=0: fn(
            _get(method, dataset, style_column), num_clients, alpha, seed, min_size, max_tries
        )

    PARTITIONER_REGISTRY.register(
        method,
        params=[
            Param("style_column", str, default, f"Column of {what} to skew."),
            Param("alpha", float, 0.1, _ALPHA.help, check=positive),
            _REDRAWN_MIN_SIZE,
            _MAX_TRIES,
        ],
        help=f"Dirichlet(alpha) over a column of {what} (a named preset of dirichlet).",
        reference=reference,
        fn=fn,
    )(factory)


_style_preset("feature_skew", feature_skew, "visual_style", "visual domains", _FEATURE_SKEW_REF)
_style_preset("concept_shift", concept_shift, "caption_style", "caption styles", f"concept shift: {_KAIROUZ}")


def _column_list(value: Any) -> str | None:
    """A non-empty list of column names, or a comma-separated string of them."""
    names = value.split(",") if isinstance(value, str) else value
    ok = isinstance(names, (list, tuple)) and len(names) >= 1 and all(isinstance(c, str) and c.strip() for c in names)
    return None if ok else 'a non-empty list of column names (or "a,b")'


@PARTITIONER_REGISTRY.register(
    "joint",
    params=[
        Param("columns", list[str], None, 'Columns (required): a list, or "a,b".', check=_column_list),
        _ALPHA,
        Param(
            "quantity_exponent",
            float,
            0.0,
            "Power-law client shares p_k ~ (rank_k + 1)^-exponent; each label ~ Dirichlet(alpha*K*p) (0 = off).",
            check=non_negative,
        ),
        _REDRAWN_MIN_SIZE,
        _MAX_TRIES,
    ],
    help="Compositions: Dirichlet(alpha) over the Cartesian product of columns, optionally with power-law sizes.",
    reference=(
        f"Hsu et al. 2019 https://arxiv.org/abs/1909.06335 over joint labels; mixed skews: {_KAIROUZ}; "
        "power-law sizes: LEAF https://arxiv.org/abs/1812.01097"
    ),
    fn=joint_skew,
)
def _joint(
    columns: list[str] | str | None, alpha: float, quantity_exponent: float, min_size: int, max_tries: int
) -> Split:
    if columns is None:
        raise ConfigError("partition 'joint' needs columns (a list of column names); pass columns=[...]")
    names = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else list(columns)
    return lambda dataset, num_clients, seed=0: joint_skew(
        [_get("joint", dataset, c) for c in names], num_clients, alpha, quantity_exponent, seed, min_size, max_tries
    )


def partition(
    dataset: Any, num_clients: int, method: str = "iid", *, seed: int = 0, **options: Any
) -> list[np.ndarray]:
    """Partition the rows of ``dataset`` (anything with ``len`` and ``[column]``, e.g. a
    ``datasets.Dataset``) with ``method``'s declared options, checked strictly.

    Args:
        dataset: the rows to split.
        num_clients: number of clients (>= 1).
        method: an entry of :data:`PARTITIONER_REGISTRY`: ``iid``, ``dirichlet``, ``pathological``,
            ``quantity``, ``powerlaw``, ``domain``, ``embedding``, ``feature_skew``,
            ``concept_shift``, ``joint``.
        seed: seed of the split.
        **options: the method's options (``PARTITIONER_REGISTRY.describe()``).

    Raises:
        ConfigError: an unknown method, an option the method does not declare (e.g. ``alpha``
            for ``iid``), a value of the wrong type or out of range, a missing column.

    Example:
        >>> [len(p) for p in partition(range(10), 3, "iid", seed=0)]
        [4, 3, 3]
        >>> partition(range(10), 3, "iid", alpha=0.5)
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: unknown option 'alpha' for partition 'iid'; valid options: min_size
    """
    return PARTITIONER_REGISTRY.build(method, **options)(dataset, num_clients, seed)


def partition_summary(parts: Sequence[np.ndarray], labels: Sequence[Any] | None = None, top: int = 4) -> str:
    """One line per client: its size and (if labels are given) its most common labels."""
    labels = None if labels is None else np.asarray(labels)
    lines = []
    for k, p in enumerate(parts):
        line = f"client {k:>3}: {len(p):>6} rows"
        if labels is not None and len(p):
            common = Counter(labels[p].tolist()).most_common(top)
            line += "  " + ", ".join(f"{v}:{c}" for v, c in common)
        lines.append(line)
    return "\n".join(lines)
