"""asymvlm.eval: retrieval and uncertainty metrics computed from ranks, zero-shot evaluation, plots.

* :mod:`asymvlm.eval.retrieval` — R@K, mean/median rank, RSUM (pessimistic ties), and
  ``t2i_recall_at_1``, the one text -> image R@1 of the package;
* :mod:`asymvlm.eval.uncertainty` — binned R@1 vs uncertainty, error AUROC, ambiguity correlation;
* :mod:`asymvlm.eval.zeroshot` — zero-shot accuracy, risk-coverage, AURC (classification itself is
  :func:`asymvlm.zeroshot.zero_shot_classify`);
* :mod:`asymvlm.eval.confidence` — does the model know when its answer is right: each part of the
  uncertainty and the calibrated ``p_correct`` per caption level (error AUROC, AURC, selective R@1,
  ECE, OOD AUROC), the checks that warn when uncertainty is inverted or flat;
* :mod:`asymvlm.eval.benchmark` — everything on one dataset next to the CLIP baseline, the summary table;
* :mod:`asymvlm.eval.plots` — PNG plots; :mod:`asymvlm.eval.cli` — ``asymvlm-eval``.
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "confidence_report": "asymvlm.eval.confidence",
    "confidence_table": "asymvlm.eval.confidence",
    "fit_model_confidence": "asymvlm.eval.confidence",
    "positives_for": "asymvlm.eval.confidence",
    "check_uncertainty": "asymvlm.eval.confidence",
    "positive_ranks": "asymvlm.eval.retrieval",
    "recall_at_k": "asymvlm.eval.retrieval",
    "rank_summary": "asymvlm.eval.retrieval",
    "retrieval_metrics": "asymvlm.eval.retrieval",
    "positives_from_index": "asymvlm.eval.retrieval",
    "t2i_recall_at_1": "asymvlm.eval.retrieval",
    "binned_recall": "asymvlm.eval.uncertainty",
    "bin_correlations": "asymvlm.eval.uncertainty",
    "error_auroc": "asymvlm.eval.uncertainty",
    "ambiguity_spearman": "asymvlm.eval.uncertainty",
    "uncertainty_report": "asymvlm.eval.uncertainty",
    "expected_calibration_error": "asymvlm.eval.uncertainty",
    "reliability_curve": "asymvlm.eval.uncertainty",
    "ood_auroc": "asymvlm.eval.uncertainty",
    "selective_report": "asymvlm.eval.uncertainty",
    "uncertainty_direction": "asymvlm.eval.uncertainty",
    "accuracy": "asymvlm.eval.zeroshot",
    "risk_coverage": "asymvlm.eval.zeroshot",
    "aurc": "asymvlm.eval.zeroshot",
    "selective_accuracy_at": "asymvlm.eval.zeroshot",
    "EvalData": "asymvlm.eval.benchmark",
    "evaluate": "asymvlm.eval.benchmark",
    "shapeworld_eval_data": "asymvlm.eval.benchmark",
    "summary_table": "asymvlm.eval.benchmark",
    "plot_report": "asymvlm.eval.plots",
    "plot_risk_coverage": "asymvlm.eval.plots",
    "plot_reliability": "asymvlm.eval.plots",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
