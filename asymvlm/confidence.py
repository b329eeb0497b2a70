"""How likely is an answer right? The parts of a retrieval's uncertainty and one calibrated probability.

A text's concentration ``kappa`` says how vague the text is. It cannot say whether a retrieval will
succeed: that also depends on the gallery around the query and on what the encoder knows
(DESIGN.md, "Known traps"). An answer's uncertainty here has three parts, each readable alone:

* **ambiguity** (aleatoric, of the text): ``1/kappa`` from the head;
* **retrieval** (the gallery around the query): the entropy of the head's retrieval distribution
  ``p(i | t) ∝ q_t(x_i)`` over the searched collection, and the probability of the returned best
  image. With the frozen mean direction the head's ``kappa`` is the temperature: a vague text
  spreads over many images, a specific text in a crowded neighbourhood spreads over its near
  neighbours, a specific text with a clear winner does not. ``exp(entropy)`` is the effective
  number of competing images. Computed in the top-k's own streamed pass
  (:class:`asymvlm.retrieval.OnlineSoftmax`);
* **unfamiliarity** (epistemic): how far the query's frozen text embedding lies from the texts the
  model was trained on, under a compact density fitted at training time and saved with the model
  (:class:`Familiarity`, a mixture of von Mises-Fisher components with one shared concentration).

They combine into ``p_correct``, the probability that the top-1 answer is right, by a
:class:`Calibrator` fitted on a validation split (logistic regression on the parts, Platt 1999, one
model per stratum of the ambiguity; optionally followed by isotonic regression, Zadrozny & Elkan
2002). What "right" means is recorded with the calibrator (``label``): the image satisfies the query
where the data say so (ShapeWorld's consistency, identical captions), else the caption's own image.
The retrieval parts depend on the gallery, so a calibrator records the gallery size it was fitted
on; ``asymvlm-serve`` refits one per gallery from the gallery's own captions. A query stranger than
what the calibrator saw for texts of its kind gets no confident answer: below a p-value of
``familiarity_alpha`` (its unfamiliarity among the calibrated answers of its stratum, with an
exponential tail beyond them), ``p_correct`` is scaled by ``p / familiarity_alpha``
(:meth:`ConfidenceModel.assess`).

Without a calibrator the parts are reported alone and ``p_correct`` is None ("uncalibrated").
The density is :mod:`asymvlm.familiarity`'s and the calibrator :mod:`asymvlm.calibration`'s; this
module exports both, and holds the parts of an answer, the confidence model saved with a model and
its fitting.

Example:
    >>> import torch
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> torch.manual_seed(0) and None
    >>> model = AsymVLM(TextHead(dim=8, hidden_dims=(16,)))
    >>> images = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    >>> texts = torch.nn.functional.normalize(images + 0.3 * torch.randn(40, 8), dim=-1)
    >>> conf = fit_confidence(model, images, texts, torch.arange(40), train_texts=texts)
    >>> model.confidence = conf
    >>> from asymvlm.retrieval import ImageIndex
    >>> res = ImageIndex(images).search(texts[:2], k=3, model=model)
    >>> sorted(res.to_dict()["queries"][0]["confidence"])[:3]
    ['ambiguity', 'ambiguity_percentile', 'calibrated']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.calibration import Calibrator
from asymvlm.errors import ArtefactError, ConfigError, InputError
from asymvlm.familiarity import Familiarity, finite_float64, percentile_of, tail_p_value
from asymvlm.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_tagged_json

__all__ = [
    "Familiarity",
    "tail_p_value",
    "percentile_of",
    "Calibrator",
    "ConfidenceModel",
    "AnswerConfidence",
    "answer_features",
    "fit_confidence",
    "fit_gallery_calibrator",
    "zero_shot_features",
    "retrieval_labels",
    "CONFIDENCE_NAME",
    "FAMILIARITY_NAME",
]

CONFIDENCE_NAME = "confidence.json"
FAMILIARITY_NAME = "familiarity.safetensors"
CONFIDENCE_TYPE = "asymvlm.confidence"
CONFIDENCE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# parts of an answer
# ----------------------------------------------------------------------------------------------
def answer_features(
    kappa: Tensor, entropy: Tensor, top_probability: Tensor, gallery_size: int, unfamiliarity: Tensor | None
) -> dict[str, Tensor]:
    """The calibrator's features of text -> image answers (float64, (Q,) each): ``ambiguity``
    ``log(1/kappa)``, ``retrieval_entropy`` the entropy over ``log N`` and ``top_surprise``
    ``-log p(best)`` over ``log N`` (both in [0, 1]: 0 for one clear winner, 1 for a uniform spread, on
    a gallery of any size N), and ``unfamiliarity`` when known."""
    log_n = max(math.log(gallery_size), 1e-12)
    out = {
        "ambiguity": -torch.log(finite_float64(kappa, "kappa").clamp_min(1e-30)),
        "retrieval_entropy": finite_float64(entropy, "entropy") / log_n,
        "top_surprise": -torch.log(finite_float64(top_probability, "top probability").clamp_min(1e-300)) / log_n,
    }
    if unfamiliarity is not None:
        out["unfamiliarity"] = finite_float64(unfamiliarity, "unfamiliarity")
    return out


@dataclass
class AnswerConfidence:
    """Per query: the parts of an answer's uncertainty and the probability that its best hit is right.

    Attributes:
        ambiguity: (Q,) ``1/kappa`` of the query text (or of the predicted class prompt).
        ambiguity_percentile: (Q,) its percentile among the reference captions (NaN: no reference).
        entropy: (Q,) the retrieval distribution's entropy (nats) over the searched collection.
        effective_candidates: (Q,) ``exp(entropy)``.
        top_probability: (Q,) the best hit's probability under that distribution.
        unfamiliarity: (Q,) or None (no density saved with the model).
        unfamiliarity_percentile: (Q,) its percentile among held-out training texts, or None.
        p_correct: (Q,) P(the best hit is right), or None (uncalibrated).
        calibration: how ``p_correct`` was obtained (``source``, ``label``, ``gallery_size``...), or
            ``{"source": None, "reason": ...}`` when it was not.
    """

    ambiguity: Tensor
    ambiguity_percentile: Tensor
    entropy: Tensor
    effective_candidates: Tensor
    top_probability: Tensor
    unfamiliarity: Tensor | None = None
    unfamiliarity_percentile: Tensor | None = None
    p_correct: Tensor | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.ambiguity.numel()

    def to_dict(self, q: int) -> dict[str, Any]:
        """Query ``q``'s parts, JSON-ready (non-finite numbers None)."""

        def num(t: Tensor | None) -> float | None:
            if t is None:
                return None
            v = float(t[q])
            return v if math.isfinite(v) else None

        return {
            "p_correct": num(self.p_correct),
            "calibrated": self.p_correct is not None,
            "ambiguity": num(self.ambiguity),
            "ambiguity_percentile": num(self.ambiguity_percentile),
            "retrieval_entropy": num(self.entropy),
            "effective_candidates": num(self.effective_candidates),
            "top_probability": num(self.top_probability),
            "unfamiliarity": num(self.unfamiliarity),
            "unfamiliarity_percentile": num(self.unfamiliarity_percentile),
        }


@dataclass
class ConfidenceModel:
    """What a model carries to say how likely its answers are right (saved with it as
    ``confidence.json`` + ``familiarity.safetensors``).

    Attributes:
        familiarity: the density of the training texts' frozen embeddings, or None.
        calibrator: text -> image ``P(right | parts)``, or None (parts reported uncalibrated).
        ambiguity_reference: sorted ``1/kappa`` of the calibration captions (the percentile scale).
        familiarity_alpha: below this p-value of the query's unfamiliarity (among the calibrated
            answers of its stratum: :meth:`Calibrator.gate_p_value`; else among held-out training
            texts), ``p_correct`` is scaled by ``p / alpha``: a query stranger than what the
            calibrator saw for texts of its kind is not confidently right.
    """

    familiarity: Familiarity | None = None
    calibrator: Calibrator | None = None
    ambiguity_reference: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    familiarity_alpha: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.familiarity_alpha < 1:
            raise ConfigError(f"familiarity_alpha must be in [0, 1), got {self.familiarity_alpha}")

    def unfamiliarity(self, text_embeddings: Tensor | None) -> Tensor | None:
        if self.familiarity is None or text_embeddings is None:
            return None
        return self.familiarity.score(text_embeddings.detach().float().cpu())

    def assess(
        self,
        kappa: Tensor,
        entropy: Tensor,
        top_probability: Tensor,
        gallery_size: int,
        text_embeddings: Tensor | None = None,
        calibrator: Calibrator | None = None,
        calibration_source: str | None = None,
    ) -> AnswerConfidence:
        """The parts and ``p_correct`` of Q text -> image answers.

        Args:
            kappa, entropy, top_probability: (Q,) each, from the head and the search.
            gallery_size: N, the searched collection's size.
            text_embeddings: (Q, d) frozen text embeddings (for unfamiliarity; None: not reported).
            calibrator: use this one (e.g. fitted on the served gallery) instead of the model's.
            calibration_source: recorded in ``calibration["source"]`` (default: what the calibrator's
                ``info["source"]`` says, else ``model``).
        """
        kappa = kappa.detach().double().cpu()
        entropy = entropy.detach().double().cpu()
        u = self.unfamiliarity(text_embeddings)
        amb = 1.0 / kappa
        conf = AnswerConfidence(
            ambiguity=amb,
            ambiguity_percentile=percentile_of(self.ambiguity_reference, amb),
            entropy=entropy,
            effective_candidates=torch.exp(entropy),
            top_probability=top_probability.detach().double().cpu(),
            unfamiliarity=u,
            unfamiliarity_percentile=None if u is None else self.familiarity.percentile(u),
        )
        cal = calibrator if calibrator is not None else self.calibrator
        if cal is None:
            conf.calibration = {"source": None, "reason": "no calibrator: fit one on a validation split"}
            return conf
        if "unfamiliarity" in cal.features and u is None:
            conf.calibration = {"source": None, "reason": "the calibrator needs unfamiliarity (text embeddings)"}
            return conf
        feats = answer_features(kappa, conf.entropy, conf.top_probability, gallery_size, u)
        p = cal.predict(feats)
        if u is not None and self.familiarity_alpha > 0:
            # beyond what calibration saw, its evidence does not apply: scale by the p-value of the
            # query's unfamiliarity among the calibrated answers of its kind (the training texts'
            # when the calibrator was fitted without unfamiliarity)
            pv = cal.gate_p_value(feats)
            if pv is None:
                pv = self.familiarity.p_value(u)
            p = p * (pv / self.familiarity_alpha).clamp_max(1.0)
        conf.p_correct = p
        fitted_n = cal.info.get("gallery_size")
        conf.calibration = {
            "source": calibration_source or cal.info.get("source") or "model",
            "label": cal.info.get("label"),
            "gallery_size": fitted_n,
            "matches_gallery": fitted_n == gallery_size,
        }
        return conf

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``confidence.json`` (and ``familiarity.safetensors``) into a model folder, atomically."""
        directory = Path(directory)
        doc: dict[str, Any] = {
            "type": CONFIDENCE_TYPE,
            "format_version": CONFIDENCE_VERSION,
            "calibrator": None if self.calibrator is None else self.calibrator.to_dict(),
            "familiarity": None,
            "familiarity_alpha": self.familiarity_alpha,
        }
        tensors = {"ambiguity_reference": self.ambiguity_reference.double()}
        if self.familiarity is not None:
            doc["familiarity"] = self.familiarity.meta()
            tensors.update({f"familiarity.{k}": v for k, v in self.familiarity.tensors().items()})
        atomic_save_safetensors(tensors, directory / FAMILIARITY_NAME)
        atomic_write_json(doc, directory / CONFIDENCE_NAME)

    @classmethod
    def load(cls, directory: str | Path) -> ConfidenceModel:
        directory = Path(directory)
        doc = read_tagged_json(
            directory / CONFIDENCE_NAME,
            CONFIDENCE_TYPE,
            CONFIDENCE_VERSION,
            required=("calibrator", "familiarity"),
            known=("familiarity_alpha",),
        )
        t = load_safetensors(directory / FAMILIARITY_NAME, mmap=False)
        where = str(directory / FAMILIARITY_NAME)
        fam = None
        if doc["familiarity"] is not None:
            if not isinstance(doc["familiarity"], Mapping):
                raise ArtefactError(f"{directory / CONFIDENCE_NAME}: 'familiarity' must be an object or null")
            fam = Familiarity.from_saved(
                {k.removeprefix("familiarity."): v for k, v in t.items() if k.startswith("familiarity.")},
                doc["familiarity"],
                where,
            )
        cal = (
            None
            if doc["calibrator"] is None
            else Calibrator.from_dict(doc["calibrator"], str(directory / CONFIDENCE_NAME))
        )
        ref = t.get("ambiguity_reference", torch.empty(0)).double()
        if ref.dim() != 1 or not bool(torch.isfinite(ref).all()):
            raise ArtefactError(f"{where}: ambiguity_reference must be a finite vector")
        alpha = doc.get("familiarity_alpha", 0.05)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
            raise ArtefactError(f"{directory / CONFIDENCE_NAME}: familiarity_alpha must be in [0, 1)")
        return cls(fam, cal, torch.sort(ref).values, float(alpha))


# ----------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------
def retrieval_labels(top1: Tensor, positives: Tensor) -> Tensor:
    """(Q,) bool: the best hit is a positive. ``positives`` is (Q, N) bool (the images that satisfy
    each query), or (Q,) int64 (each query's own image)."""
    if positives.dim() == 1:
        return top1 == positives.to(top1.device)
    return positives.gather(1, top1.unsqueeze(1).to(positives.device)).squeeze(1)


@torch.no_grad()
def fit_confidence(
    model: Any,
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    positives: Tensor,
    *,
    train_texts: Tensor | None = None,
    familiarity: Familiarity | None = None,
    label: str = "own image",
    method: str = "logistic",
    familiarity_alpha: float = 0.05,
    seed: int = 0,
    source: str | None = None,
) -> ConfidenceModel:
    """Fit a model's :class:`ConfidenceModel` on a validation split.

    Args:
        model: the :class:`~asymvlm.model.AsymVLM` (its head maps the texts).
        image_embeddings: (N, d) the validation gallery (unit).
        text_embeddings: (Q, d) frozen embeddings of the validation captions.
        positives: (Q, N) bool (images that satisfy each caption) or (Q,) the caption's own image.
        train_texts: (M, d) frozen embeddings of the head's training texts: the familiarity density
            is fitted on them (None, and no ``familiarity``: unfamiliarity is not part of the model).
        familiarity: an already fitted density (instead of ``train_texts``).
        label: what "right" means for these positives (recorded, and reported with every figure).
        method: the calibrator's (:meth:`Calibrator.fit`).
        familiarity_alpha: see :class:`ConfidenceModel`.
        seed: the density's fit.
        source: what the split is, recorded (default ``a validation split of <Q> captions``).
    """
    from asymvlm.retrieval import ImageIndex

    if familiarity is None and train_texts is not None:
        familiarity = Familiarity.fit(train_texts, seed=seed)
    conf = ConfidenceModel(familiarity, None, familiarity_alpha=familiarity_alpha)
    index = ImageIndex(image_embeddings.float(), validate=True)
    emb = text_embeddings.float()
    conf.calibrator, res = _calibrate_on_captions(
        model,
        index,
        emb,
        lambda top: retrieval_labels(top, positives),
        conf.unfamiliarity(emb),
        method,
        {"label": label, "source": source or f"a validation split of {emb.shape[0]} captions"},
    )
    conf.ambiguity_reference = torch.sort(res.uncertainty.double()).values
    return conf


def _calibrate_on_captions(
    model: Any,
    index: Any,
    text_embeddings: Tensor,
    right: Any,
    unfamiliarity: Tensor | None,
    method: str,
    info: dict[str, Any],
) -> tuple[Calibrator, Any]:
    """Search each caption's best image, judge it (``right(top (Q,)) -> (Q,) bool``) and fit a
    :class:`Calibrator` on the parts; returns it and the search. Warns about a stratum too short of
    right or wrong answers to fit (it predicts its base rate)."""
    res = index.search(model.encode_text(text_embeddings), k=1)
    correct = right(res.indices[:, 0])
    feats = answer_features(1.0 / res.uncertainty.double(), res.entropy, res.posterior[:, 0], len(index), unfamiliarity)
    cal = Calibrator.fit(
        feats,
        correct,
        method=method,
        info={**info, "gallery_size": len(index), "direction": "text_to_image"},
    )
    for m in cal.strata:
        if m.degenerate:
            warnings.warn(f"confidence calibration: a stratum of {m.count} answers has {m.degenerate}", stacklevel=3)
    return cal, res


@torch.no_grad()
def fit_gallery_calibrator(
    model: Any,
    index: Any,
    caption_embeddings: Tensor,
    owner_offsets: Tensor,
    owner_rows: Tensor,
    *,
    max_captions: int = 2000,
    seed: int = 0,
    method: str = "logistic",
    label: str = "caption identity (the best image carries the caption)",
) -> Calibrator:
    """A text -> image calibrator for one served gallery, fitted on the gallery's own captions: a
    caption's answer is right when the best image is one of the caption's positives — by default the
    images that carry it (caption identity); where the collection knows which images a caption is
    true of (ShapeWorld), those.

    Args:
        model: the :class:`~asymvlm.model.AsymVLM` (its ``confidence.familiarity``, when present, adds
            unfamiliarity to the parts).
        index: the gallery's :class:`~asymvlm.retrieval.ImageIndex`.
        caption_embeddings: (M, d) the distinct captions' frozen text embeddings.
        owner_offsets, owner_rows: each caption's positive images, in compressed rows: caption
            ``c``'s are ``owner_rows[owner_offsets[c]:owner_offsets[c + 1]]``.
        max_captions: a seeded uniform sample of at most this many captions is searched (the
            fit's cost is one search of that many queries).
        seed: the sample.
        method: the calibrator's (:meth:`Calibrator.fit`).
        label: what the positives mean (recorded in the calibrator's ``info``).

    The gallery's captions describe images that are in the gallery; a query that fits none of them
    is not represented, and a gallery the head was trained on makes the fit optimistic.
    """
    m = caption_embeddings.shape[0]
    if owner_offsets.shape != (m + 1,) or int(owner_offsets[0]) != 0 or int(owner_offsets[-1]) != owner_rows.numel():
        raise InputError(f"caption owners do not match the {m} captions (offsets {tuple(owner_offsets.shape)})")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(m, generator=gen)[:max_captions] if m > max_captions else torch.arange(m)
    emb = caption_embeddings[pick].float()

    def right(top: Tensor) -> Tensor:
        rows = [set(owner_rows[int(owner_offsets[c]) : int(owner_offsets[c + 1])].tolist()) for c in pick.tolist()]
        return torch.tensor([t in r for t, r in zip(top.tolist(), rows)], dtype=torch.bool)

    confidence = getattr(model, "confidence", None)
    u = confidence.unfamiliarity(emb) if confidence is not None else None
    info = {"label": label, "source": "gallery captions"}
    return _calibrate_on_captions(model, index, emb, right, u, method, info)[0]


# ----------------------------------------------------------------------------------------------
# zero-shot
# ----------------------------------------------------------------------------------------------
def zero_shot_features(
    class_uncertainty: Tensor, probabilities: Tensor, unfamiliarity: Tensor | None = None
) -> dict[str, Tensor]:
    """The calibrator's features of zero-shot predictions: the predicted class prompt's
    ``log(1/kappa)``, the class posterior's entropy and ``-log`` of its top probability, both over
    ``log C`` (and the image's unfamiliarity when known)."""
    p = finite_float64(probabilities, "probabilities")
    c = p.shape[-1]
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    out = {
        "ambiguity": torch.log(finite_float64(class_uncertainty, "class uncertainty").clamp_min(1e-30)),
        "class_entropy": ent / max(math.log(c), 1e-12),
        "top_surprise": -torch.log(p.max(-1).values.clamp_min(1e-300)) / max(math.log(c), 1e-12),
    }
    if unfamiliarity is not None:
        out["unfamiliarity"] = finite_float64(unfamiliarity, "unfamiliarity")
    return out
