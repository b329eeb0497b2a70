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

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from asymvlm.errors import ArtefactError
from asymvlm.federated.core import flatten_state, unflatten_state
from asymvlm.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

__all__ = ["save_training_state", "load_training_state", "trainable_state", "CHECKPOINT_FILES"]

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json")


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


def load_training_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, *, rank: int) -> None:
    """Restore what :func:`save_training_state` wrote (the same model and optimizer layout)."""
    directory = Path(directory)
    try:
        state = load_safetensors(directory / "trainable.safetensors", mmap=False)
        expected = trainable_state(model)
        if set(state) != set(expected):
            only_saved, only_model = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
            raise ArtefactError(
                f"{directory / 'trainable.safetensors'} holds other parameters than this model (only in the file: "
                f"{only_saved[:3]}, only in the model: {only_model[:3]}): a checkpoint of another run?"
            )
        with torch.no_grad():
            for k, v in expected.items():
                if v.shape != state[k].shape:
                    raise ArtefactError(
                        f"{directory / 'trainable.safetensors'}: {k!r} has shape {tuple(state[k].shape)}"
                    )
                v.copy_(state[k])
        skeleton = _json(directory / "optimizer.json", "asymvlm.optimizer_state")["skeleton"]
        opt = unflatten_state(load_safetensors(directory / "optimizer.safetensors", mmap=False), skeleton)
        opt["state"] = {int(k): v for k, v in opt["state"].items()}
        optimizer.load_state_dict(opt)
        scheduler.load_state_dict(_json(directory / "scheduler.json", "asymvlm.scheduler_state")["state"])
        rng_file = directory / f"rng-{rank}.safetensors"
        if rng_file.is_file():  # another process count: the global streams restart from the seed
            rng = load_safetensors(rng_file, mmap=False)
            meta = _json(directory / f"rng-{rank}.json", "asymvlm.rng_state")
            torch.set_rng_state(rng["torch"].to(torch.uint8))
            if torch.cuda.is_available():
                cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
                if cuda:
                    torch.cuda.set_rng_state_all(cuda)
            name, pos, has_gauss, gauss = meta["numpy"]
            np.random.set_state((name, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
            version, internal, gauss_next = meta["python"]
            random.setstate((version, tuple(internal), gauss_next))
    except ArtefactError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ArtefactError(f"{directory}: an inconsistent checkpoint ({type(err).__name__}: {err})") from err
