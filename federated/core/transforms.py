"""Server optimizers: pure transforms ``(init, update)`` on the pseudo-gradient (the aggregate delta).

``init(params) -> state``; ``update(delta, state, params, **info) -> (step, new_state)``,
composable with :func:`chain`. State lives in the returned value, never on an object (optax's
design: https://github.com/google-deepmind/optax), so a checkpoint is just the state
(:func:`flatten_state` splits it into tensors and a JSON skeleton). A chain's member given as
``(name, transform)`` is addressed by that name (optax's ``named_chain``): :func:`named_state`
reads its state, so a recipe finds its own server state without knowing the chain's layout.

Example:
    >>> import torch
    >>> params = {"w": torch.zeros(2)}
    >>> tx = chain(scale_by_adam(b1=0.9, b2=0.99, eps=1e-3), scale(0.1))
    >>> state = tx.init(params)
    >>> step, state = tx.update({"w": torch.tensor([1.0, -1.0])}, state, params)
    >>> [round(float(x), 4) for x in step["w"]], state[0]["count"]
    ([0.099, -0.099], 1)
    >>> tx = chain(("adam", scale_by_adam()), ("lr", scale(0.1)))
    >>> named_state(tx, tx.init(params), "adam")["count"]
    0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.federated.core.tree import Params, ScaledView, tree_zeros_like

__all__ = [
    "Transform",
    "chain",
    "named_state",
    "identity",
    "scale",
    "trace",
    "scale_by_adam",
    "scale_by_yogi",
    "scale_by_adagrad",
    "flatten_state",
    "unflatten_state",
]


class Transform(NamedTuple):
    """``init(params) -> state``; ``update(delta, state, params, **info) -> (step, state)``.

    ``names``: for a :func:`chain`, its members' names in order (``""`` for an unnamed member);
    its state is the tuple of the members' states in that order."""

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    names: tuple[str, ...] = ()


def identity() -> Transform:
    return Transform(lambda params: {}, lambda delta, state, params=None, **info: (dict(delta), state))


def scale(factor: float) -> Transform:
    """Multiply the step by ``factor`` (a server learning rate; 1 = FedAvg; a merge's lambda).

    The step is a lazy view (each tensor is scaled when read), so a streamed merge never holds a
    scaled copy of the whole model."""
    return Transform(lambda params: {}, lambda delta, state, params=None, **info: (ScaledView(delta, factor), state))


def chain(*members: Transform | tuple[str, Transform]) -> Transform:
    """Apply transforms in order; the state is a tuple of their states.

    A member given as ``(name, transform)`` is named (optax's ``named_chain``): :func:`named_state`
    reads its state by that name. Names are unique within the chain; naming changes nothing in
    the state's layout (a checkpoint of a named chain is that of the unnamed one)."""
    names = tuple(m[0] if isinstance(m, tuple) and not isinstance(m, Transform) else "" for m in members)
    transforms = [m[1] if isinstance(m, tuple) and not isinstance(m, Transform) else m for m in members]
    given = [n for n in names if n]
    if len(set(given)) != len(given):
        raise ConfigError(f"a chain's member names must be unique, got {list(given)}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(delta, state, params=None, **info):
        new_states = []
        for t, s in zip(transforms, state):
            delta, s = t.update(delta, s, params, **info)
            new_states.append(s)
        return delta, tuple(new_states)

    return Transform(init, update, names)


def named_state(transform: Transform, state: Any, name: str) -> Any:
    """The state of ``transform``'s chain member called ``name`` (optax's ``named_chain``).

    Raises:
        ConfigError: ``transform`` has no member of that name (the names it has are listed).
    """
    if name not in transform.names or not name:
        raise ConfigError(f"the server transform has no member named {name!r}; its members: {list(transform.names)}")
    return state[transform.names.index(name)]


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """Server momentum ``v = momentum * v + delta``; step ``v`` (or ``delta + momentum * v`` with
    Nesterov). FedAvgM (Hsu et al. 2019, https://arxiv.org/abs/1909.06335)."""

    def init(params):
        return {"v": tree_zeros_like(params)}

    def update(delta, state, params=None, **info):
        v = {k: momentum * state["v"][k] + delta[k] for k in delta}
        step = {k: delta[k] + momentum * v[k] for k in delta} if nesterov else v
        return step, {"v": v}

    return Transform(init, update)


def _moments_init(params: Params) -> dict[str, Any]:
    return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "count": 0}


def _adaptive(
    second_moment: Callable[[Tensor, Tensor, float], Tensor],
    b1: float,
    b2: float,
    eps: float,
    bias_correction: bool,
    bias_correction_offset: int = 0,
) -> Transform:
    """Shared body of Adam / Yogi / Adagrad on the pseudo-gradient ``delta`` (Reddi et al. 2021,
    "Adaptive Federated Optimization", https://arxiv.org/abs/2003.00295, Algorithm 2):
    ``m = b1 m + (1 - b1) delta``, ``v = second_moment(v, delta)`` (m, v start at zero), step
    ``m / (sqrt(v) + eps)``; with bias correction times ``sqrt(1 - b2^e) / (1 - b1^e)`` where
    ``e = t + bias_correction_offset`` and t counts updates from 1 (Kingma & Ba: offset 0;
    Flower's FedAdam uses its round number + 1, i.e. offset 1). The paper itself has no bias
    correction (the default)."""

    def update(delta, state, params=None, b1_override: float | None = None, b2_override: float | None = None, **info):
        beta1 = b1 if b1_override is None else b1_override
        beta2 = b2 if b2_override is None else b2_override
        t = state["count"] + 1
        m = {k: beta1 * state["m"][k] + (1 - beta1) * delta[k] for k in delta}
        v = {k: second_moment(state["v"][k], delta[k], beta2) for k in delta}
        e = t + bias_correction_offset
        corr = math.sqrt(1 - beta2**e) / (1 - beta1**e) if bias_correction else 1.0
        step = {k: corr * m[k] / (v[k].sqrt() + eps) for k in delta}
        return step, {"m": m, "v": v, "count": t}

    return Transform(_moments_init, update)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.99, eps: float = 1e-9, bias_correction: bool = False, bias_correction_offset: int = 0
) -> Transform:
    """FedAdam's direction: ``v = b2 v + (1 - b2) delta^2`` (Reddi et al. 2021). Flower's FedAdam is
    ``bias_correction=True, bias_correction_offset=1``."""
    return _adaptive(
        lambda v, d, beta2: beta2 * v + (1 - beta2) * d * d, b1, b2, eps, bias_correction, bias_correction_offset
    )


def scale_by_yogi(
    b1: float = 0.9, b2: float = 0.99, eps: float = 1e-9, bias_correction: bool = False, bias_correction_offset: int = 0
) -> Transform:
    """FedYogi's direction: ``v = v - (1 - b2) delta^2 sign(v - delta^2)`` (Reddi et al. 2021)."""
    return _adaptive(
        lambda v, d, beta2: v - (1 - beta2) * d * d * torch.sign(v - d * d),
        b1,
        b2,
        eps,
        bias_correction,
        bias_correction_offset,
    )


def scale_by_adagrad(b1: float = 0.0, eps: float = 1e-9, bias_correction: bool = False) -> Transform:
    """FedAdagrad's direction: ``v = v + delta^2`` (Reddi et al. 2021; momentum b1, 0 by default)."""
    return _adaptive(lambda v, d, beta2: v + d * d, b1, 0.0, eps, bias_correction)


# ----------------------------------------------------------------------------------------------
# state <-> (tensors, JSON) for checkpoints
# ----------------------------------------------------------------------------------------------
def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, tuples, lists, tensors, numbers, strings, None) into a flat
    ``{path: tensor}`` dict and a JSON skeleton referencing those paths."""
    tensors: dict[str, Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {"__dict__": {str(k): walk(v, f"{path}/{k}") for k, v in obj.items()}}
        if isinstance(obj, (tuple, list)):
            return {"__list__": [walk(v, f"{path}/{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}")

    return tensors, walk(state, prefix)


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]].clone()
        if "__dict__" in skeleton:
            return {k: unflatten_state(tensors, v) for k, v in skeleton["__dict__"].items()}
        if "__list__" in skeleton:
            items = [unflatten_state(tensors, v) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton
