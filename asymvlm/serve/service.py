"""Retrieval with uncertainty as a service: the computations behind ``asymvlm-serve``, without HTTP.

:class:`RetrievalService` holds a model (:class:`~asymvlm.model.AsymVLM`) and an opened
:class:`~asymvlm.serve.gallery.Gallery`. Each of its batch functions takes a list of requests and
returns one answer per request — the HTTP app calls them through dynamic batchers with many
requests at once, the one-by-one path (and Python users) with a list of one; it is the same code:

* :meth:`search_text` — text -> images: top-k image ids, log-likelihood scores, cosines, the
  query's concentration and uncertainty, and whether it abstains (criterion, threshold, statistic);
* :meth:`search_image` — image (embedding or PIL image) -> captions of the gallery's caption index;
* :meth:`classify` — zero-shot classification with abstention (:mod:`asymvlm.zeroshot`);
* :meth:`distributions` — text -> (mu, kappa).

Every answer is a type of :mod:`asymvlm.serve.schemas` (``TextAnswer``, ``ImageAnswer``,
``ClassifyResponse``, ``Distribution``): the shape the HTTP API serves, built here once.

Uncertainty in words (:mod:`asymvlm.serve.words`): each query is placed among the gallery's own
captions (the percentile of its ``1/kappa`` among theirs, and ``specific`` / ``moderate`` /
``vague``). Without a caption index there is no reference and no word.

How likely an answer is right (:mod:`asymvlm.confidence`). Each text answer carries its
``confidence``: the parts of its uncertainty — ambiguity ``1/kappa`` (and its percentile among the
gallery's captions), the retrieval distribution ``p(i | t) ∝ q_t(x_i)`` over the whole gallery (its
entropy, the effective number of competing images ``exp(entropy)``, the best image's probability)
and, when the model carries a familiarity density, the text's unfamiliarity — and ``p_correct``,
the probability that the best image is right. ``p_correct`` comes from a calibrator fitted when the
service starts on the gallery's own captions (:func:`~asymvlm.confidence.fit_gallery_calibrator`:
right = the best image carries the caption; the gallery must record which images carry each
caption, as ``asymvlm-index build`` does), else from the model's own calibrator, else it is None
(uncalibrated). A ``verdict`` (``likely right`` at ``p_correct >= 0.5``, else ``uncertain``) and
one-line ``reasons`` (:data:`~asymvlm.serve.words.REASONS`) put it in words.

Abstention of a text query (:class:`~asymvlm.serve.abstention.Abstention`): ``uncertainty`` abstains when ``1/kappa`` is
above the threshold (the query is too vague to retrieve a particular image), ``likelihood`` when the
best image's ``log q(x)`` is below it (nothing in the gallery fits), ``p_correct`` when the
calibrated probability that the best image is right is below it. A threshold written ``q90``
is the 90th percentile of the caption index's uncertainties, resolved when the service starts;
``auto`` is ``p_correct:0.5`` on a calibrated service and ``none`` otherwise.

Example:
    >>> import tempfile, torch
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> from asymvlm.serve.indexing import write_gallery
    >>> torch.manual_seed(0) and None
    >>> images = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    >>> gallery = write_gallery(tempfile.mkdtemp() + "/g", images, captions=["a", "b"], caption_embeddings=images[:2])
    >>> service = RetrievalService(AsymVLM(TextHead(dim=8, hidden_dims=(16,), residual=True)), gallery)
    >>> [answer] = service.search_text([TextQuery(images[3:4], k=2)])
    >>> answer[0].hits[0].id, answer[0].abstained, answer[0].verdict  # no caption owners
    ('3', False, None)
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.serve.abstention import P_CORRECT, Abstention, parse_abstention
from asymvlm.serve.schemas import (
    Abstained,
    ClassifiedImage,
    ClassifyResponse,
    Confidence,
    Distribution,
    Hit,
    ImageAnswer,
    TextAnswer,
)
from asymvlm.serve.words import reasons_of, specificity_word, verdict_of

__all__ = [
    "RetrievalService",
    "TextQuery",
    "ImageQuery",
    "ClassifyQuery",
    "public_spec",
    "check_served",
    "NonFiniteResult",
]

log = logging.getLogger("asymvlm.serve")

NO_CALIBRATOR_HINT = (
    "rebuild the gallery with asymvlm-index build (it records which images carry each caption) or serve a "
    "model saved with a calibrator (asymvlm.confidence.fit_confidence)"
)


@dataclass
class TextQuery:
    """Texts (strings, or frozen text embeddings (Q, d)) searched against the gallery's images.
    ``abstain`` None: the service's default."""

    texts: Sequence[str] | Tensor
    k: int = 10
    abstain: Abstention | None = None

    @property
    def size(self) -> int:
        return len(self.texts)


@dataclass
class ImageQuery:
    """Images (PIL images, or unit image embeddings (Q, d)) searched against the caption index."""

    images: Sequence[Any] | Tensor
    k: int = 10

    @property
    def size(self) -> int:
        return len(self.images)


@dataclass
class ClassifyQuery:
    """Zero-shot classification of images into ``classes`` (one prompt each) with abstention."""

    images: Sequence[Any] | Tensor
    classes: tuple[str, ...]
    criterion: str = "probability"
    threshold: float | None = None

    @property
    def size(self) -> int:
        return len(self.images)


@dataclass
class _Reference:
    """Sorted uncertainties of the caption index: the scale queries are placed on."""

    sorted_uncertainty: Tensor | None = field(default=None)

    def percentile(self, u: Tensor) -> list[float | None]:
        """Mid-rank percentiles (:func:`asymvlm.confidence.percentile_of`), None without a reference."""
        from asymvlm.confidence import percentile_of

        if self.sorted_uncertainty is None or self.sorted_uncertainty.numel() == 0:
            return [None] * u.numel()
        return percentile_of(self.sorted_uncertainty, u.reshape(-1)).tolist()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def public_spec(spec: Any) -> Any:
    """A spec as the service shows it: every part (between colons) that is a local path reduced to its
    last two parts (:func:`asymvlm.hub.public_name`), so no answer names a server path.

    Example:
        >>> public_spec("open_clip:local-dir:/srv/models/clip/tiny"), public_spec("imagefolder:/data/photos")
        ('open_clip:local-dir:clip/tiny', 'imagefolder:data/photos')
        >>> public_spec("open_clip:hf-hub:timm/ViT-B-16-SigLIP"), public_spec(None)
        ('open_clip:hf-hub:timm/ViT-B-16-SigLIP', None)
    """
    if not isinstance(spec, str):
        return spec
    from asymvlm.hub import public_name

    return ":".join(public_name(part) if ("/" in part or "\\" in part) else part for part in spec.split(":"))


class NonFiniteResult(RuntimeError):
    """The model produced a non-finite number (NaN) for an answer: it is not served (HTTP 500)."""


def check_served(what: str, **tensors: Tensor | None) -> None:
    """Raise :class:`NonFiniteResult` naming the first of ``tensors`` that holds a NaN (the model's
    raw outputs, checked before they are serialised: the shared serialisations turn non-finite
    numbers into None, which would serve a broken model's answer as a normal one). ``-inf`` scores
    (an image outside a distribution's support) stay legitimate: they are served as null."""
    for name, t in tensors.items():
        if t is not None and bool(torch.isnan(t).any()):
            raise NonFiniteResult(f"the model produced a non-finite value (NaN) in {what}'s {name}: not served")


def _degenerate(calibrator: Any) -> str | None:
    """Why (part of) a calibrator predicts a base rate (too few right or wrong answers), or None."""
    whys = [m.degenerate for m in getattr(calibrator, "strata", ()) if getattr(m, "degenerate", None)]
    if calibrator.info.get("degenerate"):
        whys.append(calibrator.info["degenerate"])
    return "; ".join(whys) or None


class RetrievalService:
    """A model and a gallery, answering batches of requests (see the module docstring).

    Args:
        model: an :class:`~asymvlm.model.AsymVLM`; it needs its encoder for strings and images
            (embeddings work without one).
        gallery: an opened :class:`~asymvlm.serve.gallery.Gallery` built with the model's encoder.
        abstain: the default abstention of text queries (an :class:`Abstention` or a string for
            :func:`parse_abstention`, e.g. ``"uncertainty:q90"``, ``"p_correct:0.5"``, ``"auto"``).
        calibration_captions: fit ``p_correct``'s calibrator on a seeded sample of at most this many
            of the gallery's captions (when the gallery records which images carry them); 0 does not
            fit (the model's own calibrator, if any, is used).
        allow_unverified_gallery: serve a gallery that records no encoder fingerprint (with a logged
            warning) instead of refusing it (:meth:`~asymvlm.serve.gallery.Gallery.check_encoder`).

    Raises:
        ConfigError: abstention on ``p_correct`` without a calibrator.
        ArtefactError: a gallery of another encoder, or of unknown provenance.
    """

    def __init__(
        self,
        model: Any,
        gallery: Any,
        *,
        abstain: Abstention | str | None = None,
        calibration_captions: int = 2000,
        allow_unverified_gallery: bool = False,
    ):
        from asymvlm.confidence import ConfidenceModel
        from asymvlm.retrieval import TextIndex

        n_cal = calibration_captions
        if not isinstance(n_cal, int) or isinstance(n_cal, bool) or n_cal < 0:
            raise ConfigError(f"calibration_captions must be an integer >= 0, got {calibration_captions!r}")
        gallery.check_encoder(model, allow_unverified=allow_unverified_gallery)
        self.model = model.eval()
        self.gallery = gallery
        self.caption_index = None
        ref = None
        if gallery.caption_embeddings is not None and len(gallery.captions):
            with torch.no_grad():
                self.caption_index = TextIndex.from_texts(model, gallery.caption_embeddings, ids=gallery.captions)
            ref = torch.sort((1.0 / self.caption_index.concentration.double()).clamp_max(1e300)).values
        self.reference = _Reference(ref)
        self.device = next(model.head.parameters()).device
        own = getattr(model, "confidence", None)
        # the parts of each answer: the model's familiarity density (if any), ambiguity placed among
        # the gallery's captions (the same scale as uncertainty_percentile)
        self.confidence = ConfidenceModel(
            familiarity=None if own is None else own.familiarity,
            ambiguity_reference=torch.empty(0, dtype=torch.float64) if ref is None else ref,
            **({} if own is None else {"familiarity_alpha": own.familiarity_alpha}),
        )
        if not isinstance(abstain, Abstention):
            parse_abstention(abstain, ref, calibrated=True)  # a malformed spec fails before any fitting
        self.calibrator, self.calibration, said = self._calibrate(calibration_captions)
        self.default_abstain = (
            abstain if isinstance(abstain, Abstention) else parse_abstention(abstain, ref, calibrated=self.calibrated)
        )
        if self.default_abstain.criterion == P_CORRECT and not self.calibrated:
            raise ConfigError(
                f"abstaining on p_correct needs a calibrator, and this service has none "
                f"({self.calibration['reason']}): {NO_CALIBRATOR_HINT}"
            )
        log.info("%s", said)  # once the service stands: an error above stays one line

    @property
    def calibrated(self) -> bool:
        """Whether answers carry ``p_correct`` (a calibrator for this gallery, or the model's)."""
        return self.calibrator is not None

    def _calibrate(self, max_captions: int) -> tuple[Any, dict[str, Any], str]:
        """The calibrator of ``p_correct``, what it is (:meth:`info`'s ``calibration``) and a log line."""
        from asymvlm.confidence import fit_gallery_calibrator

        g = self.gallery
        own = getattr(self.model, "confidence", None)
        own_cal = None if own is None else own.calibrator
        # the positives of each caption: the images it is true of where the collection knows
        # (ShapeWorld), else the images that carry it
        positives = g.caption_truth if g.caption_truth is not None else g.caption_owners
        label = {"label": g.meta["truth"]} if g.caption_truth is not None else {}
        can_fit = positives is not None and g.caption_embeddings is not None and len(g.captions) > 0
        cal, source, seconds = None, None, None
        if can_fit and max_captions > 0:
            start = time.perf_counter()
            with torch.no_grad():
                cal = fit_gallery_calibrator(
                    self.model, g.index, g.caption_embeddings, *positives, max_captions=max_captions, seed=0, **label
                )
            seconds = time.perf_counter() - start
            source = "gallery captions"
        elif own_cal is not None:
            cal, source = own_cal, "model"
        if cal is None:
            if not len(g.captions):
                why = "the gallery has no captions to calibrate on"
            elif g.caption_owners is None:
                why = "the gallery does not record which images carry its captions"
            else:
                why = "calibration on the gallery's captions is off (calibration_captions=0)"
            reason = f"{why}, and the model carries no calibrator"
            return None, {"source": None, "reason": reason}, f"confidence: uncalibrated ({reason})"
        info = {
            "source": source,
            "label": cal.info.get("label"),
            "gallery_size": cal.info.get("gallery_size"),
            "count": cal.info.get("count"),
            "base_rate": cal.info.get("base_rate"),
            "weights": cal.weights(),
            "seconds": seconds,
        }
        degenerate = _degenerate(cal)
        if degenerate:
            info["degenerate"] = degenerate
        if source == "model" and info["gallery_size"] not in (None, len(g)):
            info["note"] = (
                f"fitted on a gallery of {info['gallery_size']} images, serving {len(g)}: the retrieval parts "
                "shift with the gallery's size"
            )
        if seconds is not None:
            said = (
                f"confidence: calibrator fitted on {info['count']} of the gallery's {len(g.captions)} captions in "
                f"{seconds:.2f} s ({100 * (info['base_rate'] or 0.0):.0f}% right"
                + (f"; {info['degenerate']})" if "degenerate" in info else ")")
            )
        else:
            said = f"confidence: the model's own calibrator ({info.get('note') or 'label: ' + str(info['label'])})"
        return cal, info, said

    # -- what the service is ------------------------------------------------------------------
    @functools.cached_property
    def _info(self) -> dict[str, Any]:
        src = self.model.encoder_source or {}
        ref = self.reference.sorted_uncertainty
        return {
            "family": self.model.family,
            "dim": self.model.dim,
            "encoder": {
                "spec": public_spec(src.get("spec")),
                "pretrained": public_spec(src.get("pretrained")),
                "fingerprint": src.get("fingerprint"),
            },
            "accepts_text": self.model.encoder is not None,
            "accepts_images": self.model.encoder is not None,
            "gallery": {
                "size": len(self.gallery),
                "captions": len(self.gallery.captions),
                "thumbnails": self.gallery.has_thumbnails,
                "source": public_spec(self.gallery.meta.get("source", "")),
            },
            "abstain": self.default_abstain.to_dict(),
            "calibration": self.calibration,
            "examples": self.examples(),
            "uncertainty_scale": None
            if ref is None
            else {
                "reference": "the gallery's captions",
                **{f"q{q}": float(torch.quantile(ref, q / 100)) for q in (5, 33, 50, 67, 95)},
            },
        }

    def info(self) -> dict[str, Any]:
        """The model, the gallery and the defaults (``GET /v1/info``; computed once: none of it changes)."""
        return self._info

    def examples(self, quantiles: Sequence[float] = (0.98, 0.6, 0.3, 0.02)) -> list[str]:
        """Captions of the gallery from vague to specific (at these quantiles of their uncertainty):
        example queries for the page."""
        if self.caption_index is None:
            return []
        order = torch.argsort(self.caption_index.concentration, stable=True)  # low kappa = vague first
        n = order.numel()
        picks = [self.gallery.captions[int(order[min(n - 1, int((1 - q) * n))])] for q in quantiles]
        return list(dict.fromkeys(picks))

    # -- text -> images -----------------------------------------------------------------------
    @torch.no_grad()
    def search_text(self, requests: Sequence[TextQuery]) -> list[list[TextAnswer]]:
        """One list of per-text answers for each request (one encoder + head forward and one
        chunked top-k over the gallery for all of them)."""
        if not requests:
            return []
        strings = [r for r in requests if not isinstance(r.texts, Tensor)]
        if strings and any(isinstance(r.texts, Tensor) for r in requests):
            return [self.search_text([r])[0] for r in requests]  # one kind per forward
        for r in requests:
            if r.abstain is not None and r.abstain.criterion == P_CORRECT and not self.calibrated:
                raise ConfigError(
                    f"abstaining on p_correct needs a calibrator, and this service has none: {NO_CALIBRATOR_HINT}"
                )
        if strings:
            unique = list(dict.fromkeys(t for r in requests for t in r.texts))  # identical texts once
            emb = self.model.text_embeddings(unique)  # (U, d) frozen: the head's input and unfamiliarity's
            pos = {t: i for i, t in enumerate(unique)}
            rows = [pos[t] for r in requests for t in r.texts]
            labels = [t for r in requests for t in r.texts]
        else:
            emb = torch.cat([r.texts for r in requests]).to(self.device)
            rows = list(range(emb.shape[0]))
            labels = [None] * len(rows)
        q = self.model.encode_text(emb)
        k = max(r.k for r in requests)
        res = self.gallery.index.search(q, k=k)  # top-k and the retrieval distribution, one pass
        found = res.to_dict()["queries"]
        kappa = q.concentration.detach().double().cpu()
        unc = 1.0 / kappa
        best_ll = res.scores[:, 0].double().cpu()  # (Q,) the best image's log q(x)
        pct = self.reference.percentile(unc)
        conf = self.confidence.assess(
            kappa, res.entropy, res.posterior[:, 0], len(self.gallery), emb,
            calibrator=self.calibrator, calibration_source=self.calibration["source"] or "model",
        )  # fmt: skip
        p_correct = conf.p_correct  # (Q,) float64, or None uncalibrated
        check_served(
            "text search", score=res.scores, cosine=res.cosine, probability=res.posterior, entropy=res.entropy,
            concentration=kappa, mean_direction=q.loc.detach(), p_correct=p_correct,
        )  # fmt: skip
        out: list[list[TextAnswer]] = []
        at = 0
        for r in requests:
            rule = r.abstain if r.abstain is not None else self.default_abstain
            mine = torch.tensor(rows[at : at + r.size])
            abstained, stats = rule.decide(best_ll[mine], unc[mine], None if p_correct is None else p_correct[mine])
            answers = []
            for j in range(r.size):
                i = rows[at]
                stat = None if stats is None else float(stats[j])
                parts = conf.to_dict(i)
                answers.append(
                    TextAnswer(
                        **({"query": labels[at]} if labels[at] is not None else {}),
                        concentration=_finite(float(kappa[i])),
                        uncertainty=_finite(float(unc[i])),
                        uncertainty_percentile=pct[i],
                        specificity=specificity_word(pct[i]),
                        confidence=Confidence(**parts),
                        verdict=verdict_of(parts["p_correct"]),
                        reasons=reasons_of(parts),
                        abstained=bool(abstained[j]),
                        abstention=Abstained(**rule.to_dict(), statistic=None if stat is None else _finite(stat)),
                        hits=[Hit(**{**h, "id": str(h["id"])}) for h in found[i]["hits"][: r.k]],
                    )
                )
                at += 1
            out.append(answers)
        return out

    # -- image -> captions --------------------------------------------------------------------
    def _image_embeddings(self, requests: Sequence[ImageQuery | ClassifyQuery]) -> Tensor:
        """All requests' images as unit embeddings (PIL images encoded in one forward)."""
        pil = [im for r in requests if not isinstance(r.images, Tensor) for im in r.images]
        encoded = self.model.encode_image(pil) if pil else None
        parts, at = [], 0
        for r in requests:
            if isinstance(r.images, Tensor):
                parts.append(r.images.float().cpu())
            else:
                parts.append(encoded[at : at + len(r.images)])
                at += len(r.images)
        return torch.cat(parts)

    @torch.no_grad()
    def search_image(self, requests: Sequence[ImageQuery]) -> list[list[ImageAnswer]]:
        """One list of per-image answers (the k captions under which each image is most likely)."""
        if not requests:
            return []
        if self.caption_index is None:
            raise InputError("this gallery has no caption index (build it from a collection with captions)")
        x = self._image_embeddings(requests)
        res = self.caption_index.search(x, k=max(r.k for r in requests))
        check_served("image search", score=res.scores, cosine=res.cosine, probability=res.posterior)
        found = res.to_dict()["queries"]
        unc = torch.tensor([[h["uncertainty"] or math.inf for h in q["hits"]] for q in found], dtype=torch.float64)
        pct = [self.reference.percentile(row) for row in unc]
        out, at = [], 0
        for r in requests:
            answers = []
            for _ in range(r.size):
                hits = [
                    Hit(**h, uncertainty_percentile=p, specificity=specificity_word(p))
                    for h, p in zip(found[at]["hits"][: r.k], pct[at])
                ]
                answers.append(ImageAnswer(hits=hits))
                at += 1
            out.append(answers)
        return out

    # -- zero-shot ----------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, requests: Sequence[ClassifyQuery]) -> list[ClassifyResponse]:
        """One answer per request (:meth:`~asymvlm.zeroshot.ZeroShotResult.to_dict`'s fields); requests
        with the same classes and rule share one forward."""
        from asymvlm.zeroshot import zero_shot_classify

        if not requests:
            return []
        x = self._image_embeddings(requests)
        spans, at = [], 0
        for r in requests:
            spans.append((at, at + r.size))
            at += r.size
        out: list[ClassifyResponse | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.classes, r.criterion, r.threshold), []).append(i)
        for (classes, criterion, threshold), members in groups.items():
            rows = torch.cat([torch.arange(*spans[i]) for i in members])
            result = zero_shot_classify(self.model, x[rows], list(classes), criterion=criterion, threshold=threshold)
            check_served(
                "classification", log_likelihood=result.log_likelihood, uncertainty=result.uncertainty,
                probabilities=result.probabilities, p_correct=result.p_correct,
            )  # fmt: skip
            res = result.to_dict()
            at = 0
            for i in members:
                n = spans[i][1] - spans[i][0]
                images = [ClassifiedImage(**image) for image in res["images"][at : at + n]]
                out[i] = ClassifyResponse(criterion=res["criterion"], threshold=res["threshold"], images=images)
                at += n
        return out

    # -- text -> distribution -----------------------------------------------------------------
    @torch.no_grad()
    def distributions(self, requests: Sequence[Sequence[str]]) -> list[list[Distribution]]:
        """Per request, per text: ``family``, ``mu``, ``kappa``, ``uncertainty`` (and its place among
        the gallery's captions)."""
        if not requests:
            return []
        unique = list(dict.fromkeys(t for r in requests for t in r))
        q = self.model.encode_text(unique)
        check_served("distribution", mean_direction=q.loc.detach(), concentration=q.concentration.detach())
        d = q.to_dict()
        pct = self.reference.percentile(1.0 / q.concentration.detach().double().cpu())
        pos = {t: i for i, t in enumerate(unique)}
        return [
            [
                Distribution(
                    text=t,
                    family=d["family"],
                    dim=d["dim"],
                    mu=d["mu"][pos[t]],
                    kappa=d["kappa"][pos[t]],
                    uncertainty=d["uncertainty"][pos[t]],
                    uncertainty_percentile=pct[pos[t]],
                    specificity=specificity_word(pct[pos[t]]),
                )
                for t in r
            ]
            for r in requests
        ]
