"""Split a dataset among simulated clients: IID, Dirichlet label skew, quantity skew, domain skew.

Every partitioner is seeded, returns one index array per client (disjoint, covering every row)
and guarantees ``min_size`` rows per client (redrawing, as in the common Dirichlet recipe of
Hsu et al. 2019, https://arxiv.org/abs/1909.06335, up to ``max_tries``). They take the length or a
column of any ``datasets.Dataset``.

The partitioners are the entries of :data:`PARTITIONER_REGISTRY`, each declaring its options
(``alpha``, ``column``, ``min_size``, ``max_tries``; ``PARTITIONER_REGISTRY.describe()``); the seed
and the number of clients are call arguments. :func:`partition` checks the options strictly (an
option the partitioner does not use is a :class:`~asymvlm.errors.ConfigError`).

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

from asymvlm.errors import ConfigError
from asymvlm.registry import Param, Registry, at_least, positive

__all__ = [
    "iid",
    "dirichlet_label_skew",
    "quantity_skew",
    "domain_skew",
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
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            rows = rng.permutation(np.nonzero(labels == c)[0])
            props = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(props)[:-1] * len(rows)).astype(int)
            for k, chunk in enumerate(np.split(rows, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
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


# ----------------------------------------------------------------------------------------------
# the registry: PARTITIONER_REGISTRY.build(method, **options) -> split(dataset, num_clients, seed=0)
# ----------------------------------------------------------------------------------------------
PARTITIONER_REGISTRY = Registry("partition")

_MIN_SIZE = Param("min_size", int, 1, "Fewest rows per client.", check=at_least(1))
_ALPHA = Param(
    "alpha", float, 0.5, "Dirichlet concentration: small = strongly skewed, large = close to IID.", check=positive
)

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
        Param("min_size", int, 1, "Fewest rows per client (the split is redrawn until it holds).", check=at_least(1)),
        Param("max_tries", int, 1000, "Redraws before giving up on min_size.", check=at_least(1)),
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


def partition(
    dataset: Any, num_clients: int, method: str = "iid", *, seed: int = 0, **options: Any
) -> list[np.ndarray]:
    """Partition the rows of ``dataset`` (anything with ``len`` and ``[column]``, e.g. a
    ``datasets.Dataset``) with ``method``'s declared options, checked strictly.

    Args:
        dataset: the rows to split.
        num_clients: number of clients (>= 1).
        method: an entry of :data:`PARTITIONER_REGISTRY`: ``iid``, ``dirichlet``, ``quantity``, ``domain``.
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
