"""Mutations and outcomes of the artefact fuzzer: one change (:class:`Mutation`), what came of it
(:class:`Result`, :data:`OUTCOMES`), and the comparison of loaded results (:func:`same`).

Example:
    >>> m = Mutation("model", "head.safetensors", "<file>", "garbage")
    >>> str(m), count_outcomes([Result(m.kind, m.file, m.field, m.op, "clean")])["model"]["clean"]
    ('model:head.safetensors:<file>:garbage', 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["OUTCOMES", "ACCEPTABLE", "Mutation", "Result", "count_outcomes", "same", "first_difference"]

OUTCOMES = ("clean", "equal", "traceback", "silent", "unnamed")
ACCEPTABLE = frozenset({"clean", "equal"})


# ----------------------------------------------------------------------------------------------
# mutations and results
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    """One change to one artefact: ``op`` applied to ``field`` of ``file`` (relative to the artefact).

    ``field`` is a JSON path (``head.hidden_dims[0]``, ``<root>`` for the document, ``<file>`` for
    the whole file), a tensor name, a folder entry, or for Flower ``record.key`` of a reply.
    """

    kind: str
    file: str
    field: str
    op: str
    path: tuple = ()  # the JSON path as keys and indices (not shown)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.file}:{self.field}:{self.op}"

    def __str__(self) -> str:
        return self.id


@dataclass
class Result:
    """The outcome of one mutation (``line``: the exception or the difference, one line)."""

    kind: str
    file: str
    field: str
    op: str
    outcome: str
    line: str = ""
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.file}:{self.field}:{self.op}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_outcomes(results: Sequence[Result]) -> dict[str, dict[str, int]]:
    """``{kind: {outcome: count}}`` (every outcome present, zeros included), plus ``"all"``."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for key in (r.kind, "all"):
            row = out.setdefault(key, dict.fromkeys(OUTCOMES, 0))
            row[r.outcome] += 1
    if "all" in out:
        out["all"] = out.pop("all")
    return out


# ----------------------------------------------------------------------------------------------
# comparing loaded results
# ----------------------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Structural equality of loaded results: tensors equal in dtype, shape and values; floats equal
    (NaN equals NaN); containers recursively; other values of the same type and equal.

    Example:
        >>> import torch
        >>> same({"w": torch.ones(2), "s": [1, 2.0]}, {"w": torch.ones(2), "s": (1, 2.0)})
        True
        >>> same({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)}), same(1, 1.0), same(1, True)
        (False, False, False)
    """
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(
                torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        return bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two loaded results first differ (for the report line)."""
    import torch

    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{where or 'result'}: keys {sorted(map(str, set(a) ^ set(b)))[:3]} differ"
        for k in a:
            if not same(a[k], b[k]):
                return first_difference(a[k], b[k], f"{where}.{k}" if where else str(k))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not same(x, y):
                return first_difference(x, y, f"{where}[{i}]")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {b.dtype} {tuple(b.shape)} instead of {a.dtype} {tuple(a.shape)}"
        finite = bool(torch.isfinite(b).all()) if b.is_floating_point() else True
        return f"{where}: other values{'' if finite else ' (not finite)'}"
    return f"{where}: {_short(b)} instead of {_short(a)}"


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
