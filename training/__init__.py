"""training: accelerate-launched training of AsymVLM heads and LoRA text adapters (``asymvlm-train``).

* :mod:`training.config` — ``TrainConfig`` / ``DataArguments`` (dataclasses; flags and YAML,
  unknown keys are errors);
* :mod:`training.loop` — ``train(cfg)``: one function for one CPU, one GPU or
  ``accelerate launch``; atomic checkpoints and ``--resume``;
* :mod:`training.data` — the data seam (embedding caches, ShapeWorld + toy CLIP by default);
* :mod:`training.lora` — peft LoRA on the frozen text tower; :mod:`training.masks` — sparse
  update masks (TaLoS).
"""

__all__: list[str] = []
