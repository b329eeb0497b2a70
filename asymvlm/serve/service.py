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

Uncertainty in words. ``1/kappa`` has no absolute scale (it depends on the model and the
dimension), so the service places each query among the gallery's own captions: the percentile of
its uncertainty among theirs, and a word — ``specific`` (below the 1/3 quantile), ``moderate``, or
``vague`` (above the 2/3 quantile). Without a caption index there is no reference and no word.

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
one-line ``reasons`` (:data:`REASONS`) put it in words.

Abstention of a text query (:class:`Abstention`): ``uncertainty`` abstains when ``1/kappa`` is
above the threshold (the query is too vague to retrieve a particular image), ``likelihood`` when the
best image's ``log q(x)`` is below it (nothing in the gallery fits), ``p_correct`` when the
calibrated probability that the best image is right is below it. A threshold written ``q90``
is the 90th percentile of the caption index's uncertainties, resolved when the service starts;
``auto`` is ``p_correct:0.5`` on a calibrated service and ``none`` otherwise.

Example:
    >>> import tempfile, torch
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> from asymvlm.serve.gallery import write_gallery
    >>> torch.manual_seed(0) and None
    >>> images = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    >>> gallery = write_gallery(tempfile.mkdtemp() + "/g", images, captions=["a", "b"], caption_embeddings=images[:2])
    >>> service = RetrievalService(AsymVLM(TextHead(dim=8, hidden_dims=(16,), residual=True)), gallery)
    >>> [answer] = service.search_text([TextQuery(images[3:4], k=2)])
    >>> answer[0]["hits"][0]["id"], answer[0]["abstained"], answer[0]["verdict"]  # no caption owners
    ('3', False, None)
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError

__all__ = [
    "RetrievalService",
    "Abstention",
    "TextQuery",
    "ImageQuery",
    "ClassifyQuery",
    "SEARCH_CRITERIA",
    "REASONS",
    "parse_abstention",
    "specificity_word",
    "verdict_of",
    "reasons_of",
    "public_spec",
    "check_served",
    "NonFiniteResult",
]

log = logging.getLogger("asymvlm.serve")

SEARCH_CRITERIA = {
    "uncertainty": "abstain when the query's uncertainty 1/kappa is above the threshold (too vague)",
    "likelihood": "abstain when the best image's log-likelihood log q(x) is below the threshold (nothing fits)",
    "p_correct": "abstain when the calibrated probability that the best image is right is below the threshold",
}
AUTO_ABSTAIN = ("p_correct", 0.5)  # "auto" on a calibrated service (none on an uncalibrated one)
WORDS = ((1 / 3, "specific"), (2 / 3, "moderate"), (1.0, "vague"))
VERDICTS = (0.5, "likely right", "uncertain")  # p_correct >= 0.5: the first word, else the second
NO_CALIBRATOR_HINT = (
    "rebuild the gallery with asymvlm-index build (it records which images carry each caption) or serve a "
    "model saved with a calibrator (asymvlm.confidence.fit_confidence)"
)


def _share(p: float) -> str:
    """A percentile as a share of a reference: ``92%``, ``99.7%`` (one decimal above 99), ``all``."""
    if p >= 100:
        return "all"
    return f"{min(p, 99.9):.1f}%" if p >= 99 else f"{p:.0f}%"


# One line of why per part of an answer's uncertainty (:class:`~asymvlm.confidence.AnswerConfidence`
# as a dict): (name, when it applies, the line). Vague is the page's word (above the 2/3 quantile of
# the gallery's captions); two or more effective images compete; unfamiliar is beyond the 95th
# percentile of held-out training texts (the tail the calibrator's conformal scaling starts near).
REASONS: tuple[tuple[str, Callable[[dict], bool], Callable[[dict], str]], ...] = (
    (
        "ambiguity",
        lambda c: c.get("ambiguity_percentile") is not None and c["ambiguity_percentile"] > 200 / 3,
        lambda c: f"vague query: more uncertain than {_share(c['ambiguity_percentile'])} of the gallery's captions",
    ),
    (
        "retrieval",
        lambda c: c.get("effective_candidates") is not None and round(c["effective_candidates"]) >= 2,
        lambda c: f"about {round(c['effective_candidates'])} images compete for it",
    ),
    (
        "unfamiliarity",
        lambda c: c.get("unfamiliarity_percentile") is not None and c["unfamiliarity_percentile"] >= 95,
        lambda c: f"unfamiliar text: stranger than {_share(c['unfamiliarity_percentile'])} of the training texts",
    ),
)


def reasons_of(confidence: dict[str, Any]) -> list[str]:
    """The one-line reasons (:data:`REASONS`) that apply to an answer's confidence parts.

    Example:
        >>> parts = {"ambiguity_percentile": 92.0, "effective_candidates": 37.2, "unfamiliarity_percentile": 99.74}
        >>> for line in reasons_of(parts):
        ...     print(line)
        vague query: more uncertain than 92% of the gallery's captions
        about 37 images compete for it
        unfamiliar text: stranger than 99.7% of the training texts
        >>> reasons_of({"ambiguity_percentile": 10.0, "effective_candidates": 1.2, "unfamiliarity_percentile": None})
        []
    """
    return [line(confidence) for _, applies, line in REASONS if applies(confidence)]


def verdict_of(p_correct: float | None) -> str | None:
    """``likely right`` at ``p_correct >= 0.5``, ``uncertain`` below, None when uncalibrated."""
    if p_correct is None:
        return None
    bound, right, unsure = VERDICTS
    return right if p_correct >= bound else unsure


def specificity_word(percentile: float | None) -> str | None:
    """``specific`` / ``moderate`` / ``vague`` for an uncertainty percentile in [0, 100] (None: None)."""
    if percentile is None:
        return None
    for bound, word in WORDS:
        if percentile <= 100 * bound:
            return word
    return WORDS[-1][1]


@dataclass(frozen=True)
class Abstention:
    """When a text query abstains: ``criterion`` (``uncertainty``, ``likelihood``, ``p_correct``, None =
    never) and its ``threshold``; ``quantile`` records a threshold given as a quantile of the captions.

    The rule is the zero-shot classifier's (:data:`asymvlm.zeroshot.ABSTAIN_REGISTRY`: its statistic,
    direction and threshold range), applied to the best image's log-likelihood, the query's 1/kappa
    and the calibrated probability that the best image is right (abstain when ``p_correct < t``).
    """

    criterion: str | None = None
    threshold: float | None = None
    quantile: float | None = None

    def __post_init__(self) -> None:
        from asymvlm.zeroshot import ABSTAIN_REGISTRY

        if self.criterion is not None and self.criterion not in SEARCH_CRITERIA:
            raise ConfigError(
                f"unknown abstention criterion {self.criterion!r}; choose one of {sorted(SEARCH_CRITERIA)}"
            )
        if (self.criterion is None) != (self.threshold is None):
            raise ConfigError("an abstention criterion needs a threshold (and a threshold a criterion)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"the abstention threshold must be a finite number, got {self.threshold}")
        if self.criterion is not None:  # the registry checks the threshold's range (uncertainty: >= 0)
            object.__setattr__(self, "_rule", ABSTAIN_REGISTRY.build(self.criterion, threshold=self.threshold))

    def decide(
        self, best_log_likelihood: Tensor, uncertainty: Tensor, p_correct: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(abstained (Q,) bool, the statistic compared (Q,) or None)`` for Q queries.

        ``p_correct`` (Q,): the calibrated probability that each best image is right (the
        ``p_correct`` criterion needs it: a :class:`~asymvlm.errors.ConfigError` without).
        """
        if self.criterion is None:
            return torch.zeros_like(uncertainty, dtype=torch.bool), None
        from asymvlm.zeroshot import ABSTAIN_REGISTRY

        statistic = ABSTAIN_REGISTRY[self.criterion].extra["statistic"](
            best_log_likelihood, uncertainty, None, p_correct
        )
        return self._rule(best_log_likelihood, uncertainty, None, p_correct), statistic

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"criterion": self.criterion, "threshold": self.threshold}
        if self.quantile is not None:
            out["quantile"] = self.quantile
        return out


def parse_abstention(spec: str | None, reference: Tensor | None = None, *, calibrated: bool = False) -> Abstention:
    """``none``, ``auto``, ``uncertainty:<x>``, ``uncertainty:q<percent>``, ``likelihood:<x>`` or
    ``p_correct:<x>``.

    ``reference``: the sorted uncertainties a quantile threshold is read from; ``calibrated``: whether
    the service has a calibrator (``auto`` is ``p_correct:0.5`` then, ``none`` otherwise).

    Example:
        >>> parse_abstention("uncertainty:0.05")
        Abstention(criterion='uncertainty', threshold=0.05, quantile=None)
        >>> parse_abstention("none").criterion is None
        True
        >>> parse_abstention("uncertainty:q50", torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)).threshold
        0.2
        >>> parse_abstention("p_correct:0.5")
        Abstention(criterion='p_correct', threshold=0.5, quantile=None)
        >>> parse_abstention("auto", calibrated=True).criterion, parse_abstention("auto").criterion
        ('p_correct', None)
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return Abstention()
    if spec.strip().lower() == "auto":
        return Abstention(*AUTO_ABSTAIN) if calibrated else Abstention()
    criterion, sep, value = spec.partition(":")
    criterion = criterion.strip()
    if not sep or criterion not in SEARCH_CRITERIA:
        raise ConfigError(
            f"cannot parse abstention {spec!r}: write none, auto, uncertainty:<x>, uncertainty:q<percent>, "
            "likelihood:<x> or p_correct:<x>"
        )
    value = value.strip()
    if value.startswith("q"):
        if criterion != "uncertainty":
            raise ConfigError(f"a quantile threshold ({spec!r}) is defined for the uncertainty criterion only")
        if reference is None or reference.numel() == 0:
            raise ConfigError(f"{spec!r} is a quantile of the gallery captions' uncertainties; this gallery has none")
        try:
            q = float(value[1:])
        except ValueError as err:
            raise ConfigError(f"cannot parse the quantile in {spec!r}") from err
        if not 0 <= q <= 100:
            raise ConfigError(f"the quantile in {spec!r} must be in [0, 100]")
        t = float(torch.quantile(reference.double(), q / 100))
        return Abstention(criterion, t, q)
    try:
        t = float(value)
    except ValueError as err:
        raise ConfigError(f"cannot parse the threshold in {spec!r}") from err
    return Abstention(criterion, t)


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
        if self.default_abstain.criterion == "p_correct" and not self.calibrated:
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
    def search_text(self, requests: Sequence[TextQuery]) -> list[list[dict[str, Any]]]:
        """One list of per-text answers for each request (one encoder + head forward and one
        chunked top-k over the gallery for all of them)."""
        if not requests:
            return []
        strings = [r for r in requests if not isinstance(r.texts, Tensor)]
        if strings and any(isinstance(r.texts, Tensor) for r in requests):
            return [self.search_text([r])[0] for r in requests]  # one kind per forward
        for r in requests:
            if r.abstain is not None and r.abstain.criterion == "p_correct" and not self.calibrated:
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
        out: list[list[dict[str, Any]]] = []
        at = 0
        for r in requests:
            rule = r.abstain if r.abstain is not None else self.default_abstain
            mine = torch.tensor(rows[at : at + r.size])
            abstained, stats = rule.decide(best_ll[mine], unc[mine], None if p_correct is None else p_correct[mine])
            answers = []
            for j in range(r.size):
                i = rows[at]
                hits = [{**h, "id": str(h["id"])} for h in found[i]["hits"][: r.k]]
                u = float(unc[i])
                stat = None if stats is None else float(stats[j])
                parts = conf.to_dict(i)
                answers.append(
                    {
                        **({"query": labels[at]} if labels[at] is not None else {}),
                        "concentration": _finite(float(kappa[i])),
                        "uncertainty": _finite(u),
                        "uncertainty_percentile": pct[i],
                        "specificity": specificity_word(pct[i]),
                        "confidence": parts,
                        "verdict": verdict_of(parts["p_correct"]),
                        "reasons": reasons_of(parts),
                        "abstained": bool(abstained[j]),
                        "abstention": {**rule.to_dict(), "statistic": None if stat is None else _finite(stat)},
                        "hits": hits,
                    }
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
    def search_image(self, requests: Sequence[ImageQuery]) -> list[list[dict[str, Any]]]:
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
                hits = found[at]["hits"][: r.k]
                for h, p in zip(hits, pct[at]):
                    h["uncertainty_percentile"] = p
                    h["specificity"] = specificity_word(p)
                answers.append({"hits": hits})
                at += 1
            out.append(answers)
        return out

    # -- zero-shot ----------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, requests: Sequence[ClassifyQuery]) -> list[dict[str, Any]]:
        """One :meth:`~asymvlm.zeroshot.ZeroShotResult.to_dict` per request; requests with the same
        classes and rule share one forward."""
        from asymvlm.zeroshot import zero_shot_classify

        if not requests:
            return []
        x = self._image_embeddings(requests)
        spans, at = [], 0
        for r in requests:
            spans.append((at, at + r.size))
            at += r.size
        out: list[dict[str, Any] | None] = [None] * len(requests)
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
                out[i] = {**{k: v for k, v in res.items() if k != "images"}, "images": res["images"][at : at + n]}
                at += n
        return out

    # -- text -> distribution -----------------------------------------------------------------
    @torch.no_grad()
    def distributions(self, requests: Sequence[Sequence[str]]) -> list[list[dict[str, Any]]]:
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
                {
                    "text": t,
                    "family": d["family"],
                    "dim": d["dim"],
                    "mu": d["mu"][pos[t]],
                    "kappa": d["kappa"][pos[t]],
                    "uncertainty": d["uncertainty"][pos[t]],
                    "uncertainty_percentile": pct[pos[t]],
                    "specificity": specificity_word(pct[pos[t]]),
                }
                for t in r
            ]
            for r in requests
        ]
