"""``Params`` trees: flat ``{name: tensor}`` dicts, the arithmetic on them, and their validation.

Nothing here modifies a tensor in place: every function returns new tensors (inputs may be
memory-mapped, read-only views).

Example:
    >>> import torch
    >>> apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})["w"].tolist()
    [1.5, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ClientUpdateError, InputError

__all__ = [
    "Params",
    "ClientUpdateError",
    "apply_updates",
    "tree_map",
    "tree_sub",
    "tree_add",
    "tree_scale",
    "tree_zeros_like",
    "tree_norm",
    "keys_of",
    "stack_key",
    "ScaledView",
    "check_delta",
    "check_stacked",
    "validate_deltas",
    "first_non_finite",
]

Params = dict[str, Tensor]


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Params:
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    """``params + updates`` (in the dtype of ``params``); keys without an update are copied."""
    return {k: (v + updates[k].to(v.dtype)) if k in updates else v.clone() for k, v in params.items()}


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return {k: a[k] - b[k] for k in a}


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return {k: a[k] + b[k] for k in a}


def tree_scale(a: Mapping[str, Tensor], s: float) -> Params:
    return {k: v * s for k, v in a.items()}


def tree_zeros_like(a: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_norm(a: Mapping[str, Tensor]) -> float:
    """Global L2 norm over every tensor (float64 accumulation)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in a.values()))


def keys_of(deltas: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """The keys of the first delta (every rule works key by key in this order)."""
    if not deltas:
        raise InputError("no client deltas to aggregate")
    return list(deltas[0].keys())


def stack_key(deltas: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """``(K, ...)``: the K deltas' copies of one tensor (never the whole model)."""
    return torch.stack([d[key] for d in deltas])


class ScaledView(Mapping):
    """A lazy ``s * base`` (each tensor is computed when read; nothing is copied up front)."""

    def __init__(self, base: Mapping[str, Tensor], s: float):
        self.base, self.s = base, s

    def __getitem__(self, k: str) -> Tensor:
        return self.base[k] * self.s

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def check_delta(reference: Mapping[str, Tensor], delta: Mapping[str, Tensor], client: Any) -> None:
    """Raise :class:`ClientUpdateError` if ``delta`` has other keys, shapes or dtypes than
    ``reference`` or holds NaN/inf; the message names the client and the key."""
    ref_keys, keys = set(reference), set(delta)
    if keys != ref_keys:
        missing, extra = sorted(ref_keys - keys), sorted(keys - ref_keys)
        raise ClientUpdateError(
            f"client {client!r}: keys differ from the global state (missing {missing[:5]}, unexpected {extra[:5]})",
            client,
            (missing or extra)[0],
        )
    for k in reference:
        r, d = reference[k], delta[k]
        if tuple(d.shape) != tuple(r.shape):
            raise ClientUpdateError(
                f"client {client!r}: {k!r} has shape {tuple(d.shape)}, the global state {tuple(r.shape)}", client, k
            )
        if d.dtype != r.dtype:
            raise ClientUpdateError(
                f"client {client!r}: {k!r} has dtype {d.dtype}, the global state {r.dtype}", client, k
            )
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise ClientUpdateError(f"client {client!r}: {k!r} contains NaN or inf", client, k)


def check_stacked(reference: Mapping[str, Tensor], stacked: Mapping[str, Tensor], clients: Sequence[Any]) -> list[str]:
    """:func:`check_delta` for a chunk of clients whose deltas are the rows of ``stacked``
    (``(G, *shape)`` per key): the keys, shapes and dtypes once for all, NaN/inf per row with one
    ``isfinite`` per key. Returns each client's reason to be rejected (``""``: valid), worded as
    :func:`check_delta`'s.

    Example:
        >>> ref = {"w": torch.zeros(2)}
        >>> check_stacked(ref, {"w": torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])}, ["a", "b"])
        ['', "client 'b': 'w' contains NaN or inf"]
    """
    n = len(clients)
    if set(stacked) != set(reference):
        missing, extra = sorted(set(reference) - set(stacked)), sorted(set(stacked) - set(reference))
        why = f"keys differ from the global state (missing {missing[:5]}, unexpected {extra[:5]})"
        return [f"client {c!r}: {why}" for c in clients]
    reasons = [""] * n
    for k, r in reference.items():  # in check_delta's order: a row's first problem is its reason
        v, why = stacked[k], ""
        if tuple(v.shape) != (n, *r.shape):
            why = f"{k!r} has shape {tuple(v.shape[1:])}, the global state {tuple(r.shape)}"
        elif v.dtype != r.dtype:
            why = f"{k!r} has dtype {v.dtype}, the global state {r.dtype}"
        if why:  # the same for every row still valid
            reasons = [x or f"client {c!r}: {why}" for x, c in zip(reasons, clients)]
        elif v.is_floating_point():
            rows = v.reshape(n, -1)
            # a row with NaN/inf has a non-finite sum; only those rows (or rows whose finite values
            # overflow the sum) are checked entry by entry: one pass over the chunk instead of four
            suspect = torch.nonzero(~torch.isfinite(rows.sum(1))).flatten()
            bad = torch.zeros(n, dtype=torch.bool)
            bad[suspect] = ~torch.isfinite(rows[suspect]).all(1)
            for i in torch.nonzero(bad).flatten().tolist():
                reasons[i] = reasons[i] or f"client {clients[i]!r}: {k!r} contains NaN or inf"
    return reasons


def validate_deltas(
    reference: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], clients: Sequence[Any] | None = None
) -> tuple[list[int], list[tuple[Any, str]]]:
    """Indices of the valid deltas and ``(client, reason)`` for each rejected one."""
    clients = list(range(len(deltas))) if clients is None else list(clients)
    ok, rejected = [], []
    for i, (c, d) in enumerate(zip(clients, deltas)):
        try:
            check_delta(reference, d, c)
            ok.append(i)
        except ClientUpdateError as err:
            rejected.append((c, str(err)))
    return ok, rejected


def first_non_finite(tree: Any, name: str = "", sep: str = ".") -> str | None:
    """The path of the first floating tensor or float in a nested state (dicts, lists, tuples) that
    holds NaN or inf, or None: what a server checks before it steps, checkpoints or saves a model.
    Keys join with ``sep``; list items are ``[i]``.

    Example:
        >>> first_non_finite({"params": {"w": torch.ones(2)}, "opt": [torch.tensor([float("nan")])]})
        'opt[0]'
    """
    if isinstance(tree, Tensor):
        ok = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return None if ok else name or "value"
    if isinstance(tree, float):
        return None if math.isfinite(tree) else name or "value"
    if isinstance(tree, Mapping):
        items: Any = ((f"{name}{sep}{k}" if name else str(k), v) for k, v in tree.items())
    elif isinstance(tree, list | tuple):
        items = ((f"{name}[{i}]", v) for i, v in enumerate(tree))
    else:
        return None
    for key, value in items:
        bad = first_non_finite(value, key, sep)
        if bad is not None:
            return bad
    return None
