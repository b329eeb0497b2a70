"""eval: retrieval and uncertainty metrics computed from ranks, zero-shot evaluation, plots.

Import it as ``from eval import ...`` (never a bare ``import eval``: it shadows the builtin).

* :mod:`eval.retrieval` — R@K, mean/median rank, RSUM (pessimistic ties);
* :mod:`eval.uncertainty` — binned R@1 vs uncertainty, error AUROC, ambiguity correlation;
* :mod:`eval.zeroshot` — zero-shot accuracy, risk-coverage, AURC;
* :mod:`eval.benchmark` — everything on one dataset next to the CLIP baseline, the summary table;
* :mod:`eval.plots` — PNG plots; :mod:`eval.cli` — ``asymvlm-eval``.
"""

__all__: list[str] = []
