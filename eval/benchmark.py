"""Evaluate AsymVLM heads next to the deterministic CLIP baseline on one dataset.

:func:`evaluate` computes, for the CLIP baseline (cosine scores) and every model given:

* exact retrieval (the caption's own image; the COCO/Flickr convention): t2i and i2t R@1/5/10,
  ranks, RSUM;
* where ground truth exists (ShapeWorld): *consistent* t2i R@K (the retrieved image satisfies
  the caption, which vague captions do trivially) overall and per caption level; never mixed
  with the exact numbers;
* for models with uncertainty: R@1 per equal-count uncertainty bin with its Spearman/Pearson
  correlation to the bin index (exact hits; negative is good), the error AUROC, the mean
  uncertainty per caption level and the Spearman correlation with the true ambiguity;
* zero-shot classification of ShapeWorld's shape and colour (accuracy, selective accuracy and
  AURC, abstaining on the least confident predictions), by the package's one zero-shot classifier
  :func:`asymvlm.zeroshot.zero_shot_classify` (the CLIP baseline through a cosine adapter).

Example:
    >>> import torch
    >>> data = EvalData(image_embeddings=torch.nn.functional.normalize(torch.randn(6, 8), dim=-1),
    ...                 text_embeddings=torch.nn.functional.normalize(torch.randn(6, 8), dim=-1),
    ...                 text_image_index=torch.arange(6))
    >>> sorted(evaluate(data, {})["clip"])[:3]
    ['i2t_R@1', 'i2t_R@10', 'i2t_R@5']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymvlm.errors import InputError
from asymvlm.eval.retrieval import positive_ranks, positives_from_index, recall_at_k, retrieval_metrics
from asymvlm.eval.uncertainty import ambiguity_spearman, uncertainty_report
from asymvlm.eval.zeroshot import accuracy, aurc, risk_coverage, selective_accuracy_at
from asymvlm.zeroshot import zero_shot_classify

__all__ = ["EvalData", "evaluate", "shapeworld_eval_data", "summary_table", "specific_table"]


@dataclass
class EvalData:
    """Frozen embeddings of an evaluation split, with optional ground truth.

    Attributes:
        image_embeddings: (I, d) unit.
        text_embeddings: (T, d) unit, the frozen caption embeddings.
        text_image_index: (T,) the image row of each caption (exact positives).
        levels: (T,) caption specificity level (ShapeWorld) or None.
        ambiguity: (T,) true ambiguity of each caption or None.
        consistent: (T, I) bool, image satisfies caption (ShapeWorld) or None.
        zero_shot: {task: (class prompt embeddings (C, d), class names, labels (I,))} or {}.
        captions: (T,) the caption strings, or None; models that adapt the text tower
            (``AsymVLM.adapts_text_tower``: LoRA, folded federated updates) embed these themselves.
        zero_shot_prompts: {task: the C class prompt strings} for the same purpose, or None.
    """

    image_embeddings: Tensor
    text_embeddings: Tensor
    text_image_index: Tensor
    levels: Tensor | None = None
    ambiguity: Tensor | None = None
    consistent: Tensor | None = None
    zero_shot: dict[str, tuple[Tensor, list[str], Tensor]] | None = None
    captions: list[str] | None = None
    zero_shot_prompts: dict[str, list[str]] | None = None


def shapeworld_eval_data(encoder: Any, n: int = 1000, seed: int = 12345, **world: Any) -> EvalData:
    """Embed a held-out ShapeWorld split (all caption levels) with ``encoder``."""
    from PIL import Image

    from asymvlm.worlds import shapeworld as sw

    w = sw.generate_arrays(n, seed=seed, **world)
    images = encoder.encode_image([Image.fromarray(im) for im in w.images])
    levels_per_image = len(w.config.levels)
    captions = [c for row in w.captions for c in row]
    specs = w.specs.reshape(-1, w.specs.shape[-1])  # width 4 (v2) or 8 (v3)
    text = encoder.encode_text(captions)
    class_names = sw.attribute_names(w.config.version)
    zero_shot, prompt_texts = {}, {}
    for task, attr in (("shape", 0), ("colour", 1)):
        names = list(class_names[task])
        width = specs.shape[-1]  # a spec stating only this attribute
        prompt_texts[task] = [sw.describe([i if a == attr else -1 for a in range(width)]) for i in range(len(names))]
        zero_shot[task] = (encoder.encode_text(prompt_texts[task]), names, torch.from_numpy(w.objects[:, 0, attr]))
    return EvalData(
        image_embeddings=images,
        text_embeddings=text,
        text_image_index=torch.arange(n).repeat_interleave(levels_per_image),
        levels=torch.tensor(list(w.config.levels) * n),
        ambiguity=torch.as_tensor(sw.ambiguities(specs), dtype=torch.float64),
        consistent=torch.from_numpy(sw.consistency_matrix(specs, w.objects)),
        zero_shot=zero_shot,
        captions=captions,
        zero_shot_prompts=prompt_texts,
    )


def with_text_tower(data: EvalData, encoder: Any) -> EvalData:
    """The data with its captions (and zero-shot prompts) embedded by ``encoder`` — e.g. a text
    tower adapted by LoRA or folded federated updates. Zero-shot tasks without prompt strings are
    dropped rather than scored with the frozen prompts."""
    if data.captions is None:
        raise InputError("re-embedding the text side needs the caption strings (EvalData.captions)")
    with torch.no_grad():
        text = encoder.encode_text(data.captions).float().cpu()
        zero_shot = {}
        for task, (_frozen, names, labels) in (data.zero_shot or {}).items():
            strings = (data.zero_shot_prompts or {}).get(task)
            if strings is not None:
                zero_shot[task] = (encoder.encode_text(strings).float().cpu(), names, labels)
    return dataclasses.replace(data, text_embeddings=text, zero_shot=zero_shot)


def _own_text(model: Any, data: EvalData) -> EvalData:
    """The data as a model that adapts the text tower sees it: its own embeddings of the captions
    (and zero-shot prompts) through its encoder; the frozen ones otherwise."""
    if model is None or not getattr(model, "adapts_text_tower", False):
        return data
    if model.encoder is None or data.captions is None:
        raise InputError(
            "this model adapts the text tower (LoRA / folded updates): evaluating it needs its encoder "
            "(AsymVLM.from_pretrained(dir) with load_encoder=True) and the caption strings (EvalData.captions)"
        )
    return with_text_tower(data, model.encoder)


def _scores_and_uncertainty(model: Any, data: EvalData) -> tuple[Tensor, Tensor | None]:
    if model is None:  # the CLIP baseline: cosine
        return data.text_embeddings.float() @ data.image_embeddings.float().T, None
    with torch.no_grad():
        q = model.encode_text(data.text_embeddings.float())
        return model.log_likelihood(q, data.image_embeddings.float()).cpu(), (1.0 / q.concentration).cpu()


class _CosineZeroShot:
    """The CLIP baseline in the shape :func:`~asymvlm.zeroshot.zero_shot_classify` asks of a model,
    so that the baseline goes through the same classifier as every AsymVLM: cosine scores, CLIP's
    fixed logit scale 100 and a constant concentration (the baseline has no uncertainty)."""

    # exp(log 100) = 100.00000000000004 in float64, exactly 100.0 once cast to the float32 scores
    logit_scale = math.log(100.0)

    def encode_text(self, prompts: Tensor) -> SimpleNamespace:
        return SimpleNamespace(loc=prompts, concentration=torch.ones(prompts.shape[0], dtype=prompts.dtype))

    def log_likelihood(self, q: SimpleNamespace, images: Tensor) -> Tensor:
        return (images @ q.loc.T).T  # (C, I): the (I, C) cosine of the baseline's retrieval, transposed


def _zero_shot(model: Any, data: EvalData) -> dict[str, float]:
    out: dict[str, float] = {}
    for task, (prompts, names, labels) in (data.zero_shot or {}).items():
        res = zero_shot_classify(
            _CosineZeroShot() if model is None else model,
            data.image_embeddings.float(),
            prompts.float(),
            class_names=names,
        )  # no threshold, no abstention: the most likely class (torch's max: the first one on ties)
        correct = res.predictions == labels
        unc = 1 - res.probabilities.max(1).values  # 1 - the posterior of the predicted class
        out[f"zeroshot_{task}_accuracy"] = accuracy(res.predictions, labels)
        out[f"zeroshot_{task}_aurc"] = aurc(unc, correct)
        out[f"zeroshot_{task}_selective_accuracy@50"] = selective_accuracy_at(unc, correct, 0.5)
        cov, acc = risk_coverage(unc, correct)
        pick = np.unique(np.linspace(0, cov.numel() - 1, min(100, cov.numel())).round().astype(int))
        out[f"zeroshot_{task}_risk_coverage"] = {"coverage": cov[pick].tolist(), "risk": (1 - acc[pick]).tolist()}
        if model is not None:  # the likelihood itself as the confidence: abstain on unlikely images
            out[f"zeroshot_{task}_aurc_likelihood"] = aurc(-res.log_likelihood, correct)  # (I,) log q_c(x), predicted c
    return out


def _i2t_by_level(scores: Tensor, exact: Tensor, data: EvalData) -> dict[str, float]:
    """``i2t_R@1_level{lv}``: each image retrieves among the captions of one level only, and a
    caption whose text equals one of the image's own captions there counts as its own (identical
    texts score identically, so pessimistic ties would otherwise make every repeated caption a miss)."""
    out: dict[str, float] = {}
    for lv in sorted(set(data.levels.tolist())):
        rows = torch.nonzero(data.levels == lv).flatten()
        pos = exact[rows].T.clone()  # (I, T_lv)
        if data.captions is not None:  # image i owns text u if one of its captions reads u: (I, U), then (I, T_lv)
            texts = [data.captions[int(t)] for t in rows]
            ids = {c: i for i, c in enumerate(dict.fromkeys(texts))}
            cid = torch.tensor([ids[c] for c in texts])
            owns = torch.zeros(pos.shape[0], len(ids), dtype=torch.bool)
            img, col = torch.nonzero(pos, as_tuple=True)
            owns[img, cid[col]] = True
            pos = owns[:, cid]
        keep = pos.any(1)
        if bool(keep.any()):
            ranks = positive_ranks(scores[rows].T[keep], pos[keep])
            out[f"i2t_R@1_level{lv}"] = float((ranks == 0).double().mean())
    return out


def evaluate(
    data: EvalData,
    models: dict[str, Any],
    *,
    n_bins: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    include_clip: bool = True,
) -> dict[str, dict[str, Any]]:
    """Metrics for the CLIP baseline (``"clip"``) and each named AsymVLM (see the module docstring)."""
    exact = positives_from_index(data.text_image_index, data.image_embeddings.shape[0])
    entries: dict[str, Any] = ({"clip": None} if include_clip else {}) | dict(models)
    report: dict[str, dict[str, Any]] = {}
    frozen = data
    for name, model in entries.items():
        data = _own_text(model, frozen)
        scores, unc = _scores_and_uncertainty(model, data)
        m: dict[str, Any] = dict(retrieval_metrics(scores, exact, ks))
        hits = positive_ranks(scores, exact) == 0  # exact t2i hit@1 per caption
        if data.levels is not None:
            for lv in sorted(set(data.levels.tolist())):
                m[f"t2i_R@1_level{lv}"] = float(hits[data.levels == lv].double().mean())
            m.update(_i2t_by_level(scores, exact, data))
        if data.consistent is not None:
            cranks = positive_ranks(scores, data.consistent)
            m.update({f"consistent_t2i_{k}": v for k, v in recall_at_k(cranks, ks).items()})
            if data.levels is not None:
                for lv in sorted(set(data.levels.tolist())):
                    m[f"consistent_t2i_R@1_level{lv}"] = float((cranks[data.levels == lv] == 0).double().mean())
        if unc is not None:
            m.update(uncertainty_report(unc, hits, n_bins))
            if data.ambiguity is not None:
                m["uncertainty_ambiguity_spearman"] = ambiguity_spearman(unc, data.ambiguity)
            if data.levels is not None:
                m["uncertainty_by_level"] = [
                    float(unc[data.levels == lv].mean()) for lv in sorted(set(data.levels.tolist()))
                ]
        m.update(_zero_shot(model, data))
        report[name] = m
    return report


# the headline metrics training and federated runs log while they train
PROGRESS_KEYS = (
    "t2i_R@1",
    "i2t_R@1",
    "rsum",
    "consistent_t2i_R@1",
    "bin_spearman",
    "error_auroc",
    "uncertainty_ambiguity_spearman",
)


def progress_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``{"eval/<key>": value}`` for the :data:`PROGRESS_KEYS` a model's report has."""
    return {f"eval/{k}": float(report[k]) for k in PROGRESS_KEYS if report.get(k) is not None}


def summary_table(report: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the headline numbers, one row per model."""
    cols = [
        ("t2i_R@1", "t2i R@1"),
        ("i2t_R@1", "i2t R@1"),
        ("rsum", "RSUM"),
        ("consistent_t2i_R@1", "cons. R@1"),
        ("bin_spearman", "bin rho"),
        ("error_auroc", "err AUROC"),
        ("uncertainty_ambiguity_spearman", "amb. rho"),
        ("zeroshot_shape_accuracy", "ZS shape"),
    ]
    cols = [c for c in cols if any(c[0] in m for m in report.values())]
    return "\n".join(_table_lines(report, list(report), cols))


def _table_lines(report: dict[str, dict[str, Any]], models: Sequence[str], cols: Sequence[tuple[str, str]]) -> list:
    """A header and one row per model: each column's value to 3 decimals, '-' when absent or NaN."""
    width = max([12, *(len(name) + 1 for name in models)])
    lines = [f"{'model':<{width}}" + "".join(f"{label:>11}" for _, label in cols)]
    for name in models:
        cells = []
        for key, _ in cols:
            v = report[name].get(key)
            cells.append(f"{'-':>11}" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:>11.3f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return lines


def specific_table(report: dict[str, dict[str, Any]], models: Sequence[str], data: EvalData) -> str:
    """The newcomer's table: per model the retrieval of the most specific captions and the
    uncertainty metrics, with a legend that says what each column means and its chance level.

    ``data`` must carry caption levels and the consistency matrix (ShapeWorld).
    """
    if data.levels is None or data.consistent is None:
        raise InputError("specific_table needs an EvalData with caption levels and ground truth (ShapeWorld)")
    levels = torch.as_tensor(data.levels)
    top = int(levels.max())
    n_img = data.image_embeddings.shape[0]
    rows = torch.nonzero(levels == top).flatten().tolist()
    n_texts = len({data.captions[i] for i in rows}) if data.captions else len(rows)
    cons_chance = float(data.consistent.double().mean())
    cols = [
        (f"t2i_R@1_level{top}", f"R@1 L{top}"),
        (f"i2t_R@1_level{top}", f"i2t L{top}"),
        ("consistent_t2i_R@1", "cons. R@1"),
        ("uncertainty_ambiguity_spearman", "amb. rho"),
        ("bin_pearson", "bin r"),
        ("error_auroc", "err AUROC"),
    ]
    lines = _table_lines(report, models, cols)
    lines += [
        f"R@1 L{top}: the top image of a level-{top} (most specific) caption is its own image, {n_img} images "
        f"(chance {1 / n_img:.3f}).",
        f"i2t L{top}: an image's own level-{top} caption ranks first among {n_texts} distinct ones "
        f"(chance {1 / max(1, n_texts):.4f}).",
        f"cons. R@1: the top image satisfies the caption, every level (chance {cons_chance:.3f}).",
        "amb. rho: Spearman of predicted uncertainty vs the caption's true ambiguity (1 ideal, 0 none; "
        "CLIP has no uncertainty: '-').",
        "bin r: Pearson of uncertainty bin (10 bins) vs exact R@1 (-1: uncertainty predicts failure). "
        "err AUROC: uncertainty as a detector of retrieval misses (0.5 chance).",
    ]
    return "\n".join(lines)
