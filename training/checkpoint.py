"""Training checkpoints in safetensors + JSON only: nothing a resumed run reads is unpickled.

accelerate's ``save_state`` writes the optimizer, scheduler and RNG states with ``torch.save``
and loads a registered object back with ``weights_only=False``, i.e. by unpickling it: a planted
file then runs code on ``--resume``. This module writes every piece itself:

* ``trainable.safetensors`` — the trained parameters (head, temperature, LoRA factors) and the
  head's buffers; the frozen encoder weights are not copied (they come from the encoder);
* ``optimizer.safetensors`` + ``optimizer.json`` — the optimizer state's tensors and its
  skeleton (:func:`asymvlm.federated.core.flatten_state`: numbers, tuples, names);
* ``scheduler.json`` — the LR scheduler's plain state;
* ``rng-<rank>.safetensors`` + ``rng-<rank>.json`` — each process's torch (CPU, CUDA), NumPy and
  Python random states;
* ``trainer_state.json`` — the step and the run's config (``--resume`` compares it).

Every file is read with :mod:`safetensors` or :mod:`json`; a missing, corrupt or mismatched file
is an :class:`~asymvlm.errors.ArtefactError` naming it.

Example:
    >>> sorted(CHECKPOINT_FILES)[:3]
    ['optimizer.json', 'optimizer.safetensors', 'scheduler.json']
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from asymvlm.errors import ArtefactError
from asymvlm.federated.core import flatten_state, unflatten_state
from asymvlm.io import (
    atomic_save_safetensors,
    atomic_write_json,
    inside_folder,
    is_json_int,
    is_json_number,
    load_safetensors,
    read_json,
)

__all__ = [
    "save_training_state",
    "load_training_state",
    "read_trainer_state",
    "trainable_state",
    "CHECKPOINT_FILES",
    "STATE_NAME",
]

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json")
STATE_NAME = "trainer_state.json"  # the step and the run's config (written last: a checkpoint is complete)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (``requires_grad``) and every buffer of the model's head."""
    out = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    out.update({f"head.{k}": b.detach() for k, b in model.head.named_buffers()})
    return out


def save_training_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, *, rank: int, main: bool):
    """Write this process's RNG state, and on the main process the model, optimizer and scheduler."""
    directory = Path(directory)
    if main:
        atomic_save_safetensors({k: v.contiguous() for k, v in trainable_state(model).items()},
                                directory / "trainable.safetensors")  # fmt: skip
        tensors, skeleton = flatten_state(optimizer.state_dict())
        atomic_save_safetensors(tensors, directory / "optimizer.safetensors")
        atomic_write_json({"type": "asymvlm.optimizer_state", "skeleton": skeleton}, directory / "optimizer.json")
        sched = scheduler.state_dict()  # plain numbers (the lr lambda is a function: stored as None)
        atomic_write_json({"type": "asymvlm.scheduler_state", "state": sched}, directory / "scheduler.json")
    np_state = np.random.get_state()
    py_state = random.getstate()
    rng = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        rng.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    atomic_save_safetensors(rng, directory / f"rng-{rank}.safetensors")
    atomic_write_json(
        {
            "type": "asymvlm.rng_state",
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        },
        directory / f"rng-{rank}.json",
    )


def _json(path: Path, type_tag: str) -> dict[str, Any]:
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("type") != type_tag:
        raise ArtefactError(f"{path}: not an {type_tag} file")
    return doc


def _tampered(path: Path, field: str, why: str) -> ArtefactError:
    """One line naming the file and the field (``--resume`` must not continue from it)."""
    return ArtefactError(
        f"{path}: {field} {why}; the checkpoint was altered or corrupted: remove its folder to resume from an "
        "earlier one, or start again with --overwrite"
    )


def _own_folder(directory: Path) -> None:
    """The checkpoint folder is a folder of its run's ``checkpoints/``, not a link to another run's
    (``checkpoints/`` itself may be a link, e.g. to another disk). Its files are checked one by one,
    as they are opened (:func:`asymvlm.io.inside_folder`): a stray entry nobody reads does not matter."""
    resolved = directory.resolve()
    if resolved.parent != directory.parent.resolve():
        raise ArtefactError(
            f"{directory}: {directory.name!r} resolves outside {directory.parent} (a link to {resolved}): refused; "
            "a checkpoint folder must be its run's own"
        )


def read_trainer_state(directory: Path, step: int) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint folder of ``step`` (its name's): an object whose
    ``step`` is that integer, at least 1 and at most its config's ``max_steps``, and whose
    ``config`` is an object (``--resume`` then compares it with the run's).

    Example:
        >>> import tempfile, json
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / STATE_NAME).write_text(json.dumps({"step": -5, "config": {"max_steps": 8}}))
        >>> read_trainer_state(d, 4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.errors.ArtefactError: ...trainer_state.json: step is -5, expected 4 (its folder's step)...
    """
    directory = Path(directory)
    _own_folder(directory)  # not a link to another run's checkpoint
    path = inside_folder(directory, STATE_NAME)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise _tampered(path, "the document", f"is a {type(doc).__name__}, not an object")
    config = doc.get("config")
    if not isinstance(config, dict):
        raise _tampered(path, "config", f"is a {type(config).__name__}, not an object")
    value = doc.get("step")
    if not is_json_int(value) or value != step or value < 1:
        raise _tampered(path, "step", f"is {value!r}, expected {step} (its folder's step)")
    limit = config.get("max_steps")
    if not is_json_int(limit) or value > limit:
        raise _tampered(path, "step", f"is {value!r}, beyond the run's max_steps {limit!r}")
    return doc


def _check_tensor(path: Path, key: str, value: Any, like: torch.Tensor, *, nonneg: bool = False) -> torch.Tensor:
    """A tensor of ``like``'s shape and dtype, finite (and ``>= 0`` where ``nonneg``)."""
    if not isinstance(value, torch.Tensor):
        raise _tampered(path, repr(key), f"is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(like.shape):
        raise _tampered(path, repr(key), f"has shape {tuple(value.shape)}, the model's is {tuple(like.shape)}")
    if value.dtype != like.dtype:
        raise _tampered(path, repr(key), f"has dtype {value.dtype}, the model's is {like.dtype}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise _tampered(path, repr(key), "holds NaN or inf")
    if nonneg and bool((value < 0).any()):
        raise _tampered(path, repr(key), "holds negative values (a second moment is >= 0)")
    return value


def _load_trainable(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    state = load_safetensors(path, mmap=False)
    expected = trainable_state(model)
    if set(state) != set(expected):
        only_saved, only_model = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise ArtefactError(
            f"{path} holds other parameters than this model (only in the file: "
            f"{only_saved[:3]}, only in the model: {only_model[:3]}): a checkpoint of another run?"
        )
    return {k: _check_tensor(path, k, state[k], v) for k, v in expected.items()}


_NONNEG = ("exp_avg_sq", "max_exp_avg_sq")


def _expected_lrs(scheduler: Any, step: int) -> list[float] | None:
    """The learning rates the scheduler sets after ``step`` steps (LambdaLR: base x factor)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None or len(lambdas) != len(scheduler.base_lrs):
        return None
    return [base * fn(step) for base, fn in zip(scheduler.base_lrs, lambdas)]


def _same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _check_skeleton(path: Path, node: Any, where: str, tensors: Any, depth: int = 0) -> None:
    """A :func:`~asymvlm.federated.core.flatten_state` skeleton: plain JSON values, and objects that
    are exactly a tensor reference (a name ``tensors`` holds), a ``__dict__`` object or a ``__list__``
    list (with a boolean ``tuple``)."""
    if depth > 32:
        raise _tampered(path, where, "is nested too deeply for an optimizer state")
    if isinstance(node, list):
        raise _tampered(path, where, "is a bare list (a skeleton wraps lists in __list__)")
    if not isinstance(node, dict):
        return
    keys = set(node)
    if keys == {"__tensor__"}:
        name = node["__tensor__"]
        if not isinstance(name, str) or name not in tensors:
            raise _tampered(path, f"{where}.__tensor__", f"names {name!r}, not a tensor of optimizer.safetensors")
    elif keys == {"__dict__"}:
        if not isinstance(node["__dict__"], dict):
            raise _tampered(path, f"{where}.__dict__", f"is a {type(node['__dict__']).__name__}, not an object")
        for k, v in node["__dict__"].items():
            _check_skeleton(path, v, f"{where}.{k}", tensors, depth + 1)
    elif keys in ({"__list__"}, {"__list__", "tuple"}):
        if not isinstance(node["__list__"], list) or not isinstance(node.get("tuple", False), bool):
            raise _tampered(path, f"{where}.__list__", "is not a list (with a boolean tuple flag)")
        for i, v in enumerate(node["__list__"]):
            _check_skeleton(path, v, f"{where}[{i}]", tensors, depth + 1)
    else:
        raise _tampered(path, where, f"has keys {sorted(keys)[:4]}, not one of __tensor__, __dict__, __list__")


def _required_state(optimizer: Any, group: dict[str, Any]) -> tuple[str, ...] | None:
    """The per-parameter state keys ``optimizer`` keeps for a parameter of ``group`` once it has
    stepped (AdamW: step and both moments, the maximum too with amsgrad; SGD: the momentum buffer
    when momentum is on); None for another optimizer."""
    name = type(getattr(optimizer, "optimizer", optimizer)).__name__
    if name == "AdamW":
        return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
    if name == "SGD":
        return ("momentum_buffer",) if group.get("momentum") else ()
    return None


def _load_optimizer(directory: Path, optimizer: Any, scheduler: Any, step: int) -> dict[str, Any]:
    """The optimizer state of ``optimizer.json`` + ``optimizer.safetensors``, checked against the
    live optimizer: the same groups, parameters and hyperparameters (the learning rate the
    scheduler's at ``step``), per-parameter state of the parameter's shape and dtype, finite."""
    path_json = inside_folder(directory, "optimizer.json")
    path_st = inside_folder(directory, "optimizer.safetensors")
    skeleton = _json(path_json, "asymvlm.optimizer_state").get("skeleton")
    if not isinstance(skeleton, dict) or not isinstance(skeleton.get("__dict__"), dict):
        raise _tampered(path_json, "skeleton", "is not an optimizer state (an object of state and param_groups)")
    tensors = load_safetensors(path_st, mmap=False)
    _check_skeleton(path_json, skeleton, "skeleton", tensors)
    try:
        opt = unflatten_state(tensors, skeleton)
    except KeyError as err:
        raise _tampered(path_json, "skeleton", f"names tensor {err} that {path_st.name} lacks") from err
    except (TypeError, ValueError, AttributeError, RecursionError) as err:
        raise _tampered(path_json, "skeleton", f"is malformed ({type(err).__name__})") from err
    live = optimizer.state_dict()
    if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"}:
        keys = sorted(opt) if isinstance(opt, dict) else type(opt).__name__
        raise _tampered(path_json, "skeleton", f"holds {keys}, expected ['param_groups', 'state']")
    groups = opt["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live["param_groups"]):
        n = len(groups) if isinstance(groups, list) else type(groups).__name__
        raise _tampered(path_json, "param_groups", f"has {n} group(s), the optimizer {len(live['param_groups'])}")
    lrs = _expected_lrs(scheduler, step)
    params: dict[int, torch.Tensor] = {}
    required: dict[int, tuple[str, ...] | None] = {}
    for i, (saved, now) in enumerate(zip(groups, live["param_groups"])):
        where = f"param_groups[{i}]"
        if not isinstance(saved, dict) or set(saved) != set(now):
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise _tampered(path_json, where, f"has keys {keys}, the optimizer's are {sorted(now)}")
        for key, value in now.items():
            if key == "lr":
                ok = is_json_number(saved[key], finite=True) and saved[key] >= 0
                if ok and lrs is not None:
                    ok = _same_lr(float(saved[key]), lrs[i])
                if not ok:
                    want = f"{lrs[i]!r} (the schedule's at step {step})" if lrs is not None else "a number >= 0"
                    raise _tampered(path_json, f"{where}.lr", f"is {saved[key]!r}, expected {want}")
            elif saved[key] != value or type(saved[key]) is not type(value):
                raise _tampered(path_json, f"{where}.{key}", f"is {saved[key]!r}, this run's is {value!r}")
        for index, p in zip(now["params"], optimizer.param_groups[i]["params"]):
            params[index] = p
            required[index] = _required_state(optimizer, now)
    state = opt["state"]
    if not isinstance(state, dict):
        raise _tampered(path_json, "state", f"is a {type(state).__name__}, not an object")
    out: dict[int, dict[str, Any]] = {}
    for name, entry in state.items():
        index = int(name) if isinstance(name, str) and name.isdigit() else None
        if index not in params:
            raise _tampered(path_json, f"state[{name!r}]", "is not a parameter of this optimizer")
        if not isinstance(entry, dict):
            raise _tampered(path_json, f"state[{name!r}]", f"is a {type(entry).__name__}, not an object")
        p = params[index].detach()
        need = required[index]
        lacking = [k for k in need or () if k not in entry]
        if lacking:
            raise _tampered(
                path_json, f"state/{name}/{lacking[0]}", "is missing (the optimizer keeps it for each parameter)"
            )
        checked: dict[str, Any] = {}
        for key, value in entry.items():
            field = f"state/{name}/{key}"
            if need is not None and key not in need:
                raise _tampered(path_json, field, f"is not part of the optimizer's state ({', '.join(need) or 'none'})")
            if key == "step":
                scalar = isinstance(value, torch.Tensor) and value.ndim == 0 and value.is_floating_point()
                number = float(value) if scalar or is_json_int(value) else None
                if number is None or not (math.isfinite(number) and number == int(number) and 0 <= number <= step):
                    shown = number if number is not None else value
                    raise _tampered(path_st, field, f"is {shown!r}, expected a whole count in 0..{step}")
            elif key == "momentum_buffer" and value is None:
                pass
            elif not isinstance(value, torch.Tensor):  # the skeleton names no tensor here
                raise _tampered(path_json, field, f"is a {type(value).__name__}, not a tensor")
            else:
                value = _check_tensor(path_st, field, value, p, nonneg=key in _NONNEG)
            checked[key] = value
        out[index] = checked
    # every parameter has stepped by step >= 1 (each receives a gradient); with a gradient scaler (fp16)
    # the first steps may have been skipped, so a parameter without state is then its own
    scaled = getattr(optimizer, "scaler", None) is not None
    absent = [i for i, need in required.items() if need and i not in out]
    if absent and step >= 1 and not scaled:
        raise _tampered(path_json, f"state/{absent[0]}", f"is missing: after {step} step(s) every parameter has state")
    return {"state": out, "param_groups": groups}


def _load_scheduler(path: Path, scheduler: Any, lrs: list[float], step: int) -> dict[str, Any]:
    """The scheduler state of ``scheduler.json``: exactly the live scheduler's keys, each of its type,
    ``last_epoch`` = ``step``, the base rates this run's and the last rates ``lrs`` (the checked
    optimizer state's)."""
    state = _json(path, "asymvlm.scheduler_state").get("state")
    live = scheduler.state_dict()
    if not isinstance(state, dict):
        raise _tampered(path, "state", f"is a {type(state).__name__}, not an object")
    extra, missing = sorted(set(state) - set(live)), sorted(set(live) - set(state))
    if extra or missing:
        field = (extra or missing)[0]
        raise _tampered(path, field, f"is {'not a key of' if extra else 'missing from'} the scheduler's state "
                                     f"(expected exactly {sorted(live)})")  # fmt: skip
    expected = {"last_epoch": step, "_step_count": step + 1, "base_lrs": live.get("base_lrs"),
                "lr_lambdas": live.get("lr_lambdas"), "_last_lr": lrs}  # fmt: skip
    for key, now in live.items():
        value = state[key]
        if key in expected:
            want = expected[key]
            same = value == want and type(value) is type(want)
            if key == "_last_lr" and isinstance(value, list) and len(value) == len(want):
                same = all(is_json_number(a, finite=True) and _same_lr(float(a), float(b)) for a, b in zip(value, want))
            if not same:
                raise _tampered(path, key, f"is {value!r}, expected {want!r}")
        elif type(value) is not type(now) or (isinstance(value, float) and not math.isfinite(value)):
            raise _tampered(path, key, f"is {value!r}, expected a {type(now).__name__}")
    return state


def _load_rng(directory: Path, rank: int) -> None:
    rng_file = inside_folder(directory, f"rng-{rank}.safetensors")
    if not rng_file.is_file():  # another process count: the global streams restart from the seed
        return
    meta_file = inside_folder(directory, f"rng-{rank}.json")
    rng = load_safetensors(rng_file, mmap=False)
    meta = _json(meta_file, "asymvlm.rng_state")
    torch_state = rng.get("torch")
    if torch_state is None or torch_state.shape != torch.get_rng_state().shape:
        raise _tampered(rng_file, "torch", "is not a torch random state of this version")
    keys = rng.get("numpy_keys")
    if keys is None or tuple(keys.shape) != (624,) or bool(((keys < 0) | (keys >= 2**32)).any()):
        raise _tampered(rng_file, "numpy_keys", "is not a NumPy MT19937 key (624 values in [0, 2**32))")
    np_meta, py_meta = meta.get("numpy"), meta.get("python")
    if not (isinstance(np_meta, list) and len(np_meta) == 4 and is_json_int(np_meta[1]) and 0 <= np_meta[1] <= 624
            and is_json_int(np_meta[2]) and is_json_number(np_meta[3], finite=True)):  # fmt: skip
        raise _tampered(meta_file, "numpy", f"is {np_meta!r}, not a NumPy random state")
    if not (isinstance(py_meta, list) and len(py_meta) == 3 and isinstance(py_meta[1], list)
            and all(is_json_int(x) for x in py_meta[1])
            and (py_meta[2] is None or is_json_number(py_meta[2], finite=True))):  # fmt: skip
        raise _tampered(meta_file, "python", "is not a Python random state")
    cuda = [
        rng[k]
        for k in sorted((k for k in rng if k.startswith("cuda/")), key=lambda k: int(k[5:]) if k[5:].isdigit() else -1)
    ]
    py_state = (py_meta[0], tuple(py_meta[1]), py_meta[2])
    np_state = (np_meta[0], keys.numpy().astype(np.uint32), np_meta[1], np_meta[2], np_meta[3])
    try:
        random.Random().setstate(py_state)  # validated on a throwaway generator first
        np.random.RandomState().set_state(np_state)
    except (TypeError, ValueError, OverflowError) as err:
        raise _tampered(meta_file, "python/numpy", f"is not a valid random state ({err})") from err
    torch.set_rng_state(torch_state.to(torch.uint8))
    if torch.cuda.is_available() and cuda:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)


def load_training_state(
    directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, *, rank: int, step: int
) -> None:
    """Restore what :func:`save_training_state` wrote into the checkpoint of ``step`` (the same model
    and optimizer layout). Everything is read and checked (keys, types, shapes and dtypes equal to
    the live model and optimizer, finiteness, the scheduler's keys and step) before anything is
    changed: a tampered or corrupt file is one :class:`ArtefactError` naming it and the field."""
    directory = Path(directory)
    current = directory
    try:
        _own_folder(directory)
        current = inside_folder(directory, "trainable.safetensors")
        params = _load_trainable(current, model)
        current = directory / "optimizer.json"
        opt = _load_optimizer(directory, optimizer, scheduler, step)
        current = inside_folder(directory, "scheduler.json")
        sched = _load_scheduler(current, scheduler, [g["lr"] for g in opt["param_groups"]], step)
        # all checked: now change the live objects
        current = directory / "trainable.safetensors"
        live = trainable_state(model)
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(params[k])
        current = directory / "optimizer.json"
        optimizer.load_state_dict(opt)
        current = directory / "scheduler.json"
        scheduler.load_state_dict(sched)
        current = directory / f"rng-{rank}.safetensors"
        _load_rng(directory, rank)
    except ArtefactError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ArtefactError(f"{current}: an inconsistent checkpoint ({type(err).__name__}: {err})") from err
