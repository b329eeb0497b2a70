"""eval: retrieval and uncertainty metrics computed from ranks, zero-shot evaluation, plots.

Import it as ``from asymvlm.eval import ...`` (never a bare ``import eval``: it shadows the builtin).

* :mod:`asymvlm.eval.retrieval` — R@K, mean/median rank, RSUM (pessimistic ties), and
  ``t2i_recall_at_1``, the one text -> image R@1 of the package;
* :mod:`asymvlm.eval.uncertainty` — binned R@1 vs uncertainty, error AUROC, ambiguity correlation;
* :mod:`asymvlm.eval.zeroshot` — zero-shot accuracy, risk-coverage, AURC;
* :mod:`asymvlm.eval.benchmark` — everything on one dataset next to the CLIP baseline, the summary table;
* :mod:`asymvlm.eval.plots` — PNG plots; :mod:`asymvlm.eval.cli` — ``asymvlm-eval``.
"""

__all__: list[str] = []
