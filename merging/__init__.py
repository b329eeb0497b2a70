"""merging: task vectors, task arithmetic, TIES, DARE and TaLoS on the federated core.

* :mod:`asymvlm.merging.task_vectors` — task vectors from checkpoints, AsymVLM heads and LoRA adapters,
  read lazily (memory-mapped, tensor by tensor);
* :mod:`asymvlm.merging.methods` — the method registry and streamed merging (``merge_params``,
  ``merge_files``);
* :mod:`asymvlm.merging.lora` — LoRA adapters merged on their exact dense updates (dense / concat / svd);
* :mod:`asymvlm.merging.talos` — TaLoS mask calibration for sparse, interference-free fine-tuning;
* :mod:`asymvlm.merging.api` — ``merge`` for any input kind and the lambda search (``asymvlm-merge``).

Importing ``merging`` (or these modules) does not import transformers or peft.
"""

__all__: list[str] = []
