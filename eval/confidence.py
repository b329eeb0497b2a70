"""Does a model know when its answer is right? Each part of the uncertainty and the calibrated
probability ``p_correct``, scored side by side per caption level (``asymvlm-eval``'s confidence table).

For text -> image retrieval on an :class:`~asymvlm.eval.benchmark.EvalData`, every caption's best
image is right or wrong (:func:`positives_for` says what "right" means for the data: ShapeWorld's
consistency, identical captions, or the caption's own image). Each candidate score (larger = less
likely right) is judged on those outcomes, per caption level and over all captions:

* ``1/kappa`` (ambiguity), ``retrieval_entropy`` and ``top_surprise`` (``-log`` of the best image's
  probability: the gallery around the query), ``unfamiliarity`` (the model's familiarity density),
  ``1 - p_correct`` (the calibrated combination), and the ``rank_oracle``, ``log(1 + rank)`` of the
  first right image under the model's own ranking: a score that knows the answer, the floor of AURC
  for any score computed without it;
* error AUROC, AURC, selective accuracy (R@1) at 50% and 80% coverage, the binned Pearson
  correlation of R@1 with the score's bin (10 bins), and for ``p_correct`` its ECE (15 bins);
* with unfamiliar texts (``ood_texts``): the OOD AUROC of each score, in-distribution captions
  against them.

Sign conventions: :data:`asymvlm.eval.uncertainty.LEGEND` (printed under every table).

Example:
    >>> import torch
    >>> from asymvlm.eval.benchmark import EvalData
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> torch.manual_seed(0) and None
    >>> images = torch.nn.functional.normalize(torch.randn(60, 8), dim=-1)
    >>> data = EvalData(images, torch.nn.functional.normalize(images + 0.5 * torch.randn(60, 8), dim=-1),
    ...                 torch.arange(60))
    >>> model = AsymVLM(TextHead(dim=8, hidden_dims=(16,), residual=True))
    >>> model.confidence = fit_model_confidence(model, data.text_embeddings, data)
    >>> rep = confidence_report(model, data)
    >>> rep["label"], sorted(rep["levels"]["all"]["scores"])[:2]
    ('own image', ['1 - p_correct', '1/kappa'])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from asymvlm.eval.retrieval import positive_ranks
from asymvlm.eval.uncertainty import (
    LEGEND,
    bin_correlations,
    binned_recall,
    expected_calibration_error,
    ood_auroc,
    selective_report,
    uncertainty_direction,
)

logger = logging.getLogger(__name__)

__all__ = [
    "positives_for",
    "answer_outcomes",
    "fit_model_confidence",
    "confidence_report",
    "confidence_table",
    "check_uncertainty",
    "zero_shot_confidence",
    "calibrate_on",
]


def positives_for(data: Any) -> tuple[Tensor, str]:
    """``(positives (T, I) bool, label)``: which images are a right answer to each caption, and what
    that means: ``consistent`` (the image satisfies the caption: ShapeWorld's ground truth), ``caption
    identity`` (the image carries a caption with the same text), or ``own image``."""
    n_img = data.image_embeddings.shape[0]
    own = torch.zeros(len(data.text_image_index), n_img, dtype=torch.bool)
    own[torch.arange(len(data.text_image_index)), data.text_image_index] = True
    if data.consistent is not None:
        return data.consistent.bool() | own, "consistent (the image satisfies the caption)"
    if data.captions is not None and len(set(data.captions)) < len(data.captions):
        ids = {c: i for i, c in enumerate(dict.fromkeys(data.captions))}
        cid = torch.tensor([ids[c] for c in data.captions])
        owns = torch.zeros(len(ids), n_img, dtype=torch.bool)
        owns[cid, data.text_image_index] = True
        return owns[cid], "caption identity (the image carries a caption with this text)"
    return own, "own image"


@torch.no_grad()
def answer_outcomes(
    model: Any, data: Any, *, confidence: Any = None, positives: Tensor | None = None
) -> dict[str, Any]:
    """Search every caption of ``data`` in its images with ``model`` and judge the best image.

    Returns ``{"confidence": AnswerConfidence, "correct": (T,) bool, "top": (T,) int64, "rank": (T,)
    rank of the first right image under the model's ranking, "label": str}``.
    ``confidence`` (a :class:`~asymvlm.confidence.ConfidenceModel`) replaces the model's own.
    """
    if positives is None:
        positives, label = positives_for(data)
    else:
        label = "given"
    images = data.image_embeddings.float()
    text = data.text_embeddings.float()
    top, conf = _assess(model, confidence, images, text)
    top = top[:, 0]
    correct = positives[torch.arange(len(top)), top]
    ranks = torch.empty(len(top), dtype=torch.int64)
    for s in range(0, len(top), 1024):  # the model's own scores: log q_t(x), chunked over captions
        scores = model.log_likelihood(text[s : s + 1024], images)
        ranks[s : s + 1024] = positive_ranks(scores.cpu(), positives[s : s + 1024])
    return {"confidence": conf, "correct": correct, "top": top, "rank": ranks, "label": label}


def _assess(model: Any, confidence: Any, images: Tensor, texts: Tensor) -> tuple[Tensor, Any]:
    """Each text's best image ((Q, 1) rows) and the AnswerConfidence of that answer, by ``confidence``
    (a ConfidenceModel) or else the model's own (the calibration then says so)."""
    from asymvlm.confidence import ConfidenceModel
    from asymvlm.retrieval import ImageIndex

    res = ImageIndex(images, validate=False).search(model.encode_text(texts), k=1)
    cm = confidence if confidence is not None else (getattr(model, "confidence", None) or ConfidenceModel())
    own_cal = cm.calibrator if confidence is None else None
    source = None if own_cal is None else f"the model's own calibrator ({own_cal.info.get('source', 'its split')})"
    conf = cm.assess(
        1.0 / res.uncertainty.double(), res.entropy, res.posterior[:, 0], len(images), texts, calibration_source=source
    )
    return res.indices, conf


def _part_scores(c: Any) -> dict[str, Tensor]:
    """An AnswerConfidence's parts as scores, larger = less likely right (the known ones only)."""
    s = {
        "1/kappa": c.ambiguity,
        "retrieval_entropy": c.entropy,
        "top_surprise": -torch.log(c.top_probability.clamp_min(1e-300)),
    }
    if c.unfamiliarity is not None:
        s["unfamiliarity"] = c.unfamiliarity.double()
    if c.p_correct is not None:
        s["1 - p_correct"] = 1.0 - c.p_correct
    return s


def _scores(out: dict[str, Any]) -> dict[str, Tensor]:
    """The candidate scores, larger = less likely right: the parts and the rank oracle."""
    return {**_part_scores(out["confidence"]), "rank_oracle": torch.log1p(out["rank"].double())}


def _judge(score: Tensor, correct: Tensor, n_bins: int, coverages: Sequence[float]) -> dict[str, float]:
    rep = selective_report(score, correct, tuple(coverages))
    if score.numel() >= n_bins:
        rep["bin_pearson"] = bin_correlations(binned_recall(score, correct, n_bins)["recall"])["pearson"]
    return rep


def confidence_report(
    model: Any,
    data: Any,
    *,
    confidence: Any = None,
    ood_texts: Tensor | None = None,
    n_bins: int = 10,
    ece_bins: int = 15,
    coverages: Sequence[float] = (0.5, 0.8),
    keep_outcomes: bool = False,
) -> dict[str, Any]:
    """The confidence metrics of ``model`` on ``data`` (module docstring), JSON-ready (with
    ``keep_outcomes``, also ``"outcomes"``: the per-caption ``scores``, ``correct``, ``p_correct`` and
    ``levels`` tensors, for plots; not JSON).

    Args:
        model: an :class:`~asymvlm.model.AsymVLM`.
        data: an :class:`~asymvlm.eval.benchmark.EvalData` (its levels, when present, give per-level rows).
        confidence: a :class:`~asymvlm.confidence.ConfidenceModel` to use instead of the model's
            (e.g. one calibrated on a validation split of this gallery's size).
        ood_texts: (M, d) frozen embeddings of texts unlike the training texts (another caption style,
            another text collection): OOD AUROC of each score.
        n_bins, ece_bins, coverages: binned correlations, the ECE's bins, selective accuracy points.
    """
    out = answer_outcomes(model, data, confidence=confidence)
    conf = out["confidence"]
    scores = _scores(out)
    correct = out["correct"]
    groups: dict[str, Tensor] = {"all": torch.ones_like(correct)}
    if data.levels is not None:
        levels = torch.as_tensor(data.levels)
        for lv in sorted(set(levels.tolist())):
            groups[str(lv)] = levels == lv
    rows: dict[str, Any] = {}
    for name, mask in groups.items():
        y = correct[mask]
        row: dict[str, Any] = {"count": int(mask.sum()), "accuracy": float(y.double().mean())}
        row["scores"] = {k: _judge(v[mask], y, n_bins, coverages) for k, v in scores.items()}
        if conf.p_correct is not None:
            p = conf.p_correct[mask].clamp(0, 1)
            row["mean_p_correct"] = float(p.mean())
            row["scores"]["1 - p_correct"]["ece"] = expected_calibration_error(p, y, n_bins=ece_bins)
        rows[name] = row
    report: dict[str, Any] = {
        "label": out["label"],
        "calibration": conf.calibration,
        "gallery_size": int(data.image_embeddings.shape[0]),
        "levels": rows,
        "warnings": check_uncertainty(conf.ambiguity, correct, data),
    }
    if ood_texts is not None:
        report["ood"] = _ood(model, confidence, data, conf, ood_texts)
    if keep_outcomes:
        report["outcomes"] = {
            "scores": scores,
            "correct": correct,
            "p_correct": conf.p_correct,
            "levels": None if data.levels is None else torch.as_tensor(data.levels),
        }
    return report


@torch.no_grad()
def _ood(model: Any, confidence: Any, data: Any, conf: Any, ood_texts: Tensor) -> dict[str, Any]:
    """OOD AUROC of each text-side score: the data's captions (in) against ``ood_texts`` (out)."""
    _, c_out = _assess(model, confidence, data.image_embeddings.float(), ood_texts.float())
    scores_in, scores_out = _part_scores(conf), _part_scores(c_out)
    pairs = {k: (scores_in[k], scores_out[k]) for k in scores_in}
    out: dict[str, Any] = {"count_in": len(conf), "count_out": int(ood_texts.shape[0])}
    out["auroc"] = {k: ood_auroc(a.double(), b.double()) for k, (a, b) in pairs.items()}
    if c_out.p_correct is not None:
        out["mean_p_correct_out"] = float(c_out.p_correct.mean())
    return out


@torch.no_grad()
def zero_shot_confidence(model: Any, data: Any, calibration: Any, *, ece_bins: int = 15) -> dict[str, Any]:
    """Per zero-shot task of ``data`` (and of ``calibration``, a split with the same tasks): P(the
    predicted class is right) calibrated on ``calibration``'s images
    (:func:`asymvlm.zeroshot.fit_zero_shot_calibrator`) and judged on ``data``'s: accuracy, error AUROC
    and AURC of ``1 - p_correct`` next to ``1 - max posterior``, and the ECE of ``p_correct``."""
    from asymvlm.zeroshot import fit_zero_shot_calibrator, zero_shot_classify

    out: dict[str, Any] = {}
    for task, (prompts, names, labels) in (data.zero_shot or {}).items():
        if task not in (calibration.zero_shot or {}):
            continue
        c_prompts, c_names, c_labels = calibration.zero_shot[task]
        cal = fit_zero_shot_calibrator(model, calibration.image_embeddings.float(), c_labels, c_prompts.float(),
                                       class_names=c_names)  # fmt: skip
        res = zero_shot_classify(
            model, data.image_embeddings.float(), prompts.float(), class_names=names, calibrator=cal
        )
        right = res.best == labels
        p = res.p_correct.double().clamp(0, 1)
        out[task] = {
            "accuracy": float(right.double().mean()),
            "p_correct": selective_report(1 - p, right),
            "max_probability": selective_report(1 - res.probabilities.max(-1).values.double(), right),
            "ece": expected_calibration_error(p, right, n_bins=ece_bins),
            "mean_p_correct": float(p.mean()),
        }
    return out


def check_uncertainty(uncertainty: Tensor, correct: Tensor, data: Any) -> list[str]:
    """One-line warnings when ``1/kappa`` is inverted or flat against what the data can show:
    retrieval success within the most specific level (where a miss is a real miss) and the caption's
    true ambiguity, its level, or how often its text repeats
    (:func:`~asymvlm.eval.uncertainty.uncertainty_direction`)."""
    warn: list[str] = []
    if data.levels is not None:
        levels = torch.as_tensor(data.levels)
        top = levels == levels.max()
        warn += [f"{w} (most specific level)" for w in uncertainty_direction(uncertainty[top], correct[top])]
    else:
        warn += uncertainty_direction(uncertainty, correct)
    if data.ambiguity is not None:
        vague = torch.as_tensor(data.ambiguity, dtype=torch.float64)
        what = "true ambiguity"
    elif data.levels is not None:
        vague = -torch.as_tensor(data.levels, dtype=torch.float64)  # level 0 is the vaguest
        what = "caption level"
    elif data.captions is not None and len(set(data.captions)) < len(data.captions):
        from collections import Counter

        counts = Counter(data.captions)
        vague = torch.tensor([counts[c] for c in data.captions], dtype=torch.float64)  # a text true of many images
        what = "caption frequency"
    else:
        vague = None
    if vague is not None:
        warn += [f"{w} (against {what})" for w in uncertainty_direction(uncertainty, ambiguity=vague)]
    return warn


def calibrate_on(model: Any, data: Any, *, source: str | None = None) -> Any:
    """A :class:`~asymvlm.confidence.ConfidenceModel` of ``model`` with its own familiarity density
    (if it has one) and a calibrator fitted on ``data`` (:func:`positives_for` says what is right):
    e.g. a calibration split of the test gallery's size."""
    from asymvlm.confidence import fit_confidence

    positives, label = positives_for(data)
    own = getattr(model, "confidence", None)
    return fit_confidence(
        model,
        data.image_embeddings.float(),
        data.text_embeddings.float(),
        positives,
        familiarity=None if own is None else own.familiarity,
        label=label,
        source=source,
    )


def fit_model_confidence(model: Any, train_texts: Tensor | None, eval_data: Any = None, *, seed: int = 0) -> Any:
    """The :class:`~asymvlm.confidence.ConfidenceModel` a training run saves with its model: the
    familiarity density of the training texts, and with ``eval_data`` (a held-out split) the
    calibrator on its outcomes (:func:`positives_for`). Logs a one-line warning each time ``1/kappa``
    is inverted or flat on ``eval_data`` (:func:`check_uncertainty`), and records them in the
    calibrator's ``info["warnings"]``."""
    from asymvlm.confidence import ConfidenceModel, Familiarity, fit_confidence

    familiarity = Familiarity.fit(train_texts, seed=seed) if train_texts is not None else None
    if eval_data is None:
        return ConfidenceModel(familiarity)
    positives, label = positives_for(eval_data)
    conf = fit_confidence(
        model,
        eval_data.image_embeddings.float(),
        eval_data.text_embeddings.float(),
        positives,
        familiarity=familiarity,
        label=label,
        seed=seed,
        source=f"a held-out split of {eval_data.text_embeddings.shape[0]} captions",
    )
    with torch.no_grad():  # the checks need each caption's 1/kappa and whether its best image is right
        from asymvlm.confidence import retrieval_labels
        from asymvlm.retrieval import ImageIndex

        res = ImageIndex(eval_data.image_embeddings.float(), validate=False).search(
            model.encode_text(eval_data.text_embeddings.float()), k=1, posterior=False
        )
    correct = retrieval_labels(res.indices[:, 0], positives)
    found = check_uncertainty(res.uncertainty.double(), correct, eval_data)
    for w in found:
        logger.warning("warning: %s", w)
    conf.calibrator.info["warnings"] = found  # saved with the model
    return conf


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def confidence_table(report: dict[str, Any], level: str | None = None) -> str:
    """A text table of one level's row (default: the most specific level, else all captions): one
    line per score, then the OOD AUROC and the legend with every sign convention."""
    levels = report["levels"]
    if level is None:
        numeric = [k for k in levels if k != "all"]
        level = max(numeric, key=int) if numeric else "all"
    row = levels[level]
    cols = ("error_auroc", "aurc", "selective_accuracy@50", "selective_accuracy@80", "bin_pearson", "ece")
    head = f"{'score':<18}" + "".join(f"{c.replace('selective_accuracy', 'sel.acc'):>13}" for c in cols)
    where = "all captions" if level == "all" else f"caption level {level}"
    lines = [
        f"text -> image, {where}: {row['count']} captions, R@1 {row['accuracy']:.3f} "
        f"(right = {report['label']}; gallery {report['gallery_size']} images)",
        head,
    ]
    for name, m in row["scores"].items():
        lines.append(f"{name:<18}" + "".join(f"{_fmt(m.get(c)):>13}" for c in cols))
    numeric = sorted((k for k in levels if k != "all"), key=int)
    if len(numeric) > 1:  # every level in one line each: R@1, and error AUROC / ECE of p_correct and 1/kappa
        for name in ("1 - p_correct", "1/kappa"):
            if name not in levels["all"]["scores"]:
                continue
            cells = []
            for k in [*numeric, "all"]:
                m = levels[k]["scores"][name]
                ece = f" / {_fmt(m['ece'])}" if "ece" in m else ""
                cells.append(f"{'L' + k if k != 'all' else 'all'} {_fmt(m['error_auroc'])}{ece}")
            what = "error AUROC / ECE" if name == "1 - p_correct" else "error AUROC"
            lines.append(f"per level, {name} ({what}): " + ", ".join(cells))
        lines.append("per level, R@1: " + ", ".join(f"L{k} {levels[k]['accuracy']:.3f}" for k in numeric))
    cal = report.get("calibration") or {}
    if cal.get("source") is None:
        lines.append(f"p_correct: uncalibrated ({cal.get('reason', 'no calibrator')}); the parts are shown alone")
    else:
        lines.append(
            f"p_correct: calibrated on {cal.get('source')} (gallery of {cal.get('gallery_size')} images); "
            f"mean {row.get('mean_p_correct', float('nan')):.3f} against R@1 {row['accuracy']:.3f}"
        )
    if "ood" in report:
        o = report["ood"]
        lines.append(
            f"OOD AUROC ({o['count_in']} captions against {o['count_out']} unfamiliar texts): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in o["auroc"].items())
        )
    for task, z in (report.get("zero_shot") or {}).items():
        lines.append(
            f"zero-shot {task}: accuracy {z['accuracy']:.3f}; error AUROC of p_correct "
            f"{_fmt(z['p_correct']['error_auroc'])} (max posterior {_fmt(z['max_probability']['error_auroc'])}), "
            f"ECE {_fmt(z['ece'])}"
        )
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    lines.append(LEGEND.rstrip())
    lines.append("rank_oracle: log(1 + rank of the first right image), a score that knows the answer (the AURC floor).")
    return "\n".join(lines)
