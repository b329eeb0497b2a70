"""asymvlm.training: accelerate-launched training, and the commands that compose every package.

* :mod:`asymvlm.training.config` — ``TrainConfig`` (``DataArguments``, the head's ``HeadConfig``,
  ``TrainArguments``, a ``LoraArguments`` and a ``RunArguments`` as ``asymvlm-federate``'s are;
  flags and YAML, unknown keys are errors);
* :mod:`asymvlm.training.loop` — ``train(cfg)``: one function for one CPU, one GPU or
  ``accelerate launch``; atomic checkpoints and ``--resume``;
* :mod:`asymvlm.training.data` — the data seam (embedding caches, ShapeWorld + toy CLIP by default);
* :mod:`asymvlm.training.federate` — ``asymvlm-federate`` (federation + evaluation);
* :mod:`asymvlm.training.demo` — ``asymvlm-demo``, the whole package end to end (its steps in
  :mod:`asymvlm.training.demo_steps`, :mod:`asymvlm.training.demo_federated` and
  :mod:`asymvlm.training.demo_report`);
* :mod:`asymvlm.training.cli` — ``asymvlm-train``.

The shared building blocks live in the core: :mod:`asymvlm.lora` (peft LoRA on the text tower),
:mod:`asymvlm.masks` (sparse update masks), :mod:`asymvlm.trainable` (the trained model),
:mod:`asymvlm.batching` (index-drawn batches).
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "train": "asymvlm.training.loop",
    "latest_checkpoint": "asymvlm.training.loop",
    "TrainConfig": "asymvlm.training.config",
    "TrainArguments": "asymvlm.training.config",
    "TRAIN_GROUPS": "asymvlm.training.config",
    "parse_config": "asymvlm.training.config",
    "TrainData": "asymvlm.training.data",
    "get_dataloaders": "asymvlm.training.data",
    "federate": "asymvlm.training.federate",
    "evaluator": "asymvlm.training.evaluation",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
