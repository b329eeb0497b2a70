"""training: accelerate-launched training of AsymVLM heads and LoRA text adapters (``asymvlm-train``).

* :mod:`asymvlm.training.config` — ``TrainConfig`` / ``DataArguments`` (dataclasses; flags and YAML,
  unknown keys are errors);
* :mod:`asymvlm.training.loop` — ``train(cfg)``: one function for one CPU, one GPU or
  ``accelerate launch``; atomic checkpoints and ``--resume``;
* :mod:`asymvlm.training.data` — the data seam (embedding caches, ShapeWorld + toy CLIP by default);
* :mod:`asymvlm.lora` — peft LoRA on the frozen text tower; :mod:`asymvlm.masks` — sparse
  update masks (TaLoS).
"""

__all__: list[str] = []
