"""asymvlm.merging: task vectors, task arithmetic, TIES, DARE, TaLoS, the spectral methods (Iso-C,
Iso-CTS, TSV-M), Fisher-weighted merging of probabilistic heads, LoRA-native merging (KnOTS, Core
Space) and LiNeS, on the federated core.

* :mod:`asymvlm.merging.task_vectors` — task vectors from checkpoints, AsymVLM heads and LoRA
  adapters, read lazily (memory-mapped, tensor by tensor);
* :mod:`asymvlm.merging.methods` — the merge methods (recipes of :mod:`asymvlm.federated.core`
  with declared options) and merging through its one server step (``merge_params``, ``merge_files``);
* :mod:`asymvlm.merging.ties` — the TIES and DARE aggregators and the exact streaming top-k selection;
* :mod:`asymvlm.merging.spectral` — Iso-C, Iso-CTS and TSV-M, per 2-D weight;
* :mod:`asymvlm.merging.fisher` — the heads' diagonal Fisher (of their own vMF/PS) and Fisher-weighted merging;
* :mod:`asymvlm.merging.lines` — LiNeS, depth-wise scaling after any method;
* :mod:`asymvlm.merging.lora` — LoRA adapters merged on their exact dense updates (dense / concat / svd);
* :mod:`asymvlm.merging.lora_spaces` — KnOTS and Core Space: LoRA merges in an aligned low-rank space;
* :mod:`asymvlm.merging.talos` — TaLoS mask calibration for sparse, interference-free fine-tuning;
* :mod:`asymvlm.merging.api` — ``merge`` for any input kind (``asymvlm-merge``), and every public
  name of the three modules behind it:
* :mod:`asymvlm.merging.inputs` — what an input is, where it is, and whether it was fine-tuned
  from the base;
* :mod:`asymvlm.merging.search` — the lambda search and its flat-criterion check;
* :mod:`asymvlm.merging.selection` — the lambda-search criteria of AsymVLM heads (R@1, likelihood,
  error AUROC).

Importing ``asymvlm.merging`` (or these modules) does not import transformers or peft.
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "METHODS": "asymvlm.merging.methods",
    "make_method": "asymvlm.merging.methods",
    "merge_params": "asymvlm.merging.methods",
    "merge_files": "asymvlm.merging.methods",
    "Ties": "asymvlm.merging.methods",
    "Dare": "asymvlm.merging.methods",
    "merge": "asymvlm.merging.api",
    "lambda_search": "asymvlm.merging.search",
    "recall_metric": "asymvlm.merging.selection",
    "recall_at_1": "asymvlm.merging.selection",
    "LazyTaskVector": "asymvlm.merging.task_vectors",
    "MergeInputError": "asymvlm.merging.task_vectors",
    "task_vector_from_checkpoints": "asymvlm.merging.task_vectors",
    "task_vector_from_models": "asymvlm.merging.task_vectors",
    "task_vector_from_lora": "asymvlm.merging.task_vectors",
    "merge_lora_adapters": "asymvlm.merging.lora",
    "calibrate_mask": "asymvlm.merging.talos",
    "compute_fisher": "asymvlm.merging.fisher",
    "head_fisher": "asymvlm.merging.fisher",
    "FisherWeighted": "asymvlm.merging.fisher",
    "IsoC": "asymvlm.merging.spectral",
    "IsoCTS": "asymvlm.merging.spectral",
    "TsvM": "asymvlm.merging.spectral",
    "LinesScaled": "asymvlm.merging.lines",
    "LoraSpaceMerge": "asymvlm.merging.lora_spaces",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
