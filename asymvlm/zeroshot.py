"""Zero-shot classification with abstention: the one implementation (``asymvlm.eval`` scores it).

An image is classified by the class text distribution under which it is most likely
(``argmax_c log q_c(x)``); the posterior over classes is ``softmax(exp(logit_scale) log q_c(x))``.
The classifier abstains when a criterion of :data:`ABSTAIN_REGISTRY` crosses its threshold:
the best class's likelihood is too low, its uncertainty ``1/kappa`` too high, the posterior too
flat (probability, entropy), or the calibrated probability that the prediction is right too low
(``p_correct``: a :class:`~asymvlm.confidence.Calibrator` fitted on labelled validation images,
:func:`fit_zero_shot_calibrator`).

Example:
    >>> import torch
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> model = AsymVLM(TextHead(dim=8, hidden_dims=(16,), residual=True))
    >>> classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    >>> res = zero_shot_classify(model, classes, classes, class_names=["a", "b", "c"])
    >>> res.labels
    ['a', 'b', 'c']
    >>> out = res.to_dict()["images"][0]
    >>> out["label"], out["abstained"], sorted(out["probabilities"])
    ('a', False, ['a', 'b', 'c'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import InputError
from asymvlm.registry import Param, Registry, in_range, non_negative

__all__ = ["ZeroShotResult", "zero_shot_classify", "fit_zero_shot_calibrator", "ABSTAIN_REGISTRY"]


# ----------------------------------------------------------------------------------------------
# zero-shot classification with abstention
# ----------------------------------------------------------------------------------------------
@dataclass
class ZeroShotResult:
    """Zero-shot predictions for N images over C classes.

    Attributes:
        predictions: (N,) class index, or -1 where the classifier abstained.
        labels: the predicted class names, ``"unknown"`` where it abstained.
        log_likelihood: (N,) ``log q_c(x)`` of the best class.
        uncertainty: (N,) ``1/kappa`` of the best class's text distribution.
        probabilities: (N, C) posterior ``softmax(exp(logit_scale) * log q_c(x))`` over classes.
        abstained: (N,) bool.
        best: (N,) the best class index before abstention.
        class_names: the C class names (columns of ``probabilities``).
        criterion: the abstention criterion used, and ``threshold`` its threshold (None: never abstains).
        p_correct: (N,) the calibrated probability that the predicted class is right, or None
            (no calibrator given).
    """

    predictions: Tensor
    labels: list[str]
    log_likelihood: Tensor
    uncertainty: Tensor
    probabilities: Tensor
    abstained: Tensor
    best: Tensor
    class_names: list[str] | None = None
    criterion: str | None = None
    threshold: float | None = None
    p_correct: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-ready): ``{"criterion", "threshold", "images": [{"label", "class_index",
        "best_label", "abstained", "log_likelihood", "uncertainty", "p_correct", "probabilities": {name: p}}]}``
        (``class_index`` None where the classifier abstained; ``p_correct`` None without a calibrator;
        non-finite numbers None). Shared with
        ``asymvlm-serve``.
        """
        names = self.class_names or [str(c) for c in range(self.probabilities.shape[-1])]
        images = []
        for n in range(len(self.labels)):
            best = int(self.best[n])
            images.append(
                {
                    "label": self.labels[n],
                    "class_index": None if bool(self.abstained[n]) else best,
                    "best_label": names[best],
                    "abstained": bool(self.abstained[n]),
                    "log_likelihood": _finite(float(self.log_likelihood[n])),
                    "uncertainty": _finite(float(self.uncertainty[n])),
                    "p_correct": None if self.p_correct is None else _finite(float(self.p_correct[n])),
                    "probabilities": {name: float(p) for name, p in zip(names, self.probabilities[n].tolist())},
                }
            )
        return {"criterion": self.criterion, "threshold": self.threshold, "images": images}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


# Abstention criteria: ``ABSTAIN_REGISTRY.build(name, threshold=t)`` returns a rule
# ``(best_ll (N,), uncertainty (N,), probabilities (N, C), p_correct (N,) or None) -> abstained (N,)
# bool``: abstain where the criterion's statistic crosses ``t`` in its direction (``extra["direction"]``);
# ``t=None`` never abstains.
ABSTAIN_REGISTRY = Registry("criterion")


def _not_nan(x: float) -> str | None:
    return "a number (not NaN)" if math.isnan(x) else None


def _abstain_factory(statistic: Callable[..., Tensor], direction: str) -> Callable[..., Any]:
    def factory(threshold: float | None = None) -> Callable[..., Tensor]:
        def rule(ll: Tensor, unc: Tensor, p: Tensor, p_correct: Tensor | None = None) -> Tensor:
            if threshold is None:
                return torch.zeros_like(ll, dtype=torch.bool)
            stat = statistic(ll, unc, p, p_correct)  # (N,)
            return stat < threshold if direction == "below" else stat > threshold

        return rule

    return factory


def _register_criterion(
    name: str,
    statistic: Callable[..., Tensor],
    direction: str,
    help: str,
    reference: str,
    threshold_help: str,
    check: Callable[[Any], str | None],
) -> None:
    threshold = Param("threshold", float, None, threshold_help + " None never abstains.", check=check)
    ABSTAIN_REGISTRY.register(
        name, params=[threshold], help=help, reference=reference, statistic=statistic, direction=direction
    )(_abstain_factory(statistic, direction))


_register_criterion(
    "likelihood",
    lambda ll, unc, p, pc=None: ll,
    "below",
    "Abstain when log q_c(x) of the best class is below the threshold (the image is unlikely under every class)",
    "Ju et al. 2025 (AsymVLM text distributions) https://arxiv.org/abs/2505.11029",
    "Log-likelihood (nats) of the best class below which to abstain.",
    _not_nan,
)
_register_criterion(
    "uncertainty",
    lambda ll, unc, p, pc=None: unc,
    "above",
    "Abstain when 1/kappa of the best class is above the threshold",
    "Ju et al. 2025 (uncertainty = 1/concentration) https://arxiv.org/abs/2505.11029",
    "Uncertainty 1/kappa of the best class above which to abstain.",
    non_negative,
)
_register_criterion(
    "probability",
    lambda ll, unc, p, pc=None: p.max(-1).values,
    "below",
    "Abstain when the posterior of the best class is below the threshold",
    "Chow 1970 https://doi.org/10.1109/TIT.1970.1054406; Hendrycks & Gimpel 2017 https://arxiv.org/abs/1610.02136",
    "Posterior probability of the best class below which to abstain.",
    in_range(0.0, 1.0),
)
_register_criterion(
    "entropy",
    lambda ll, unc, p, pc=None: _entropy(p),
    "above",
    "Abstain when the posterior entropy is above the threshold",
    "selective classification, Geifman & El-Yaniv 2017 https://arxiv.org/abs/1705.08500",
    "Posterior entropy (nats, at most log C) above which to abstain.",
    non_negative,
)


def _p_correct(ll: Tensor, unc: Tensor, p: Tensor, pc: Tensor | None = None) -> Tensor:
    if pc is None:
        from asymvlm.errors import ConfigError

        raise ConfigError(
            "the p_correct criterion needs a calibrated probability of being right: fit a calibrator on a "
            "validation split (asymvlm.confidence) and pass it"
        )
    return pc


_register_criterion(
    "p_correct",
    _p_correct,
    "below",
    "Abstain when the calibrated probability that the answer is right is below the threshold",
    "Platt 1999 (logistic calibration); Geifman & El-Yaniv 2017 https://arxiv.org/abs/1705.08500; asymvlm.confidence",
    "Calibrated P(right) below which to abstain.",
    in_range(0.0, 1.0),
)

@torch.no_grad()
def zero_shot_classify(
    model: Any,
    images: Tensor | Sequence[Any],
    classes: Sequence[str] | Sequence[Sequence[str]] | dict[str, Sequence[str]] | Tensor,
    *,
    class_names: Sequence[str] | None = None,
    criterion: str = "likelihood",
    threshold: float | None = None,
    unknown_label: str = "unknown",
    calibrator: Any = None,
    image_familiarity: Any = None,
) -> ZeroShotResult:
    """Classify images by the class text distribution under which they are most likely.

    Args:
        model: an :class:`~asymvlm.model.AsymVLM` (with an encoder for strings or raw images).
        images: unit image embeddings (N, d) or raw images.
        classes: one prompt per class (list of str), several prompts per class (list of lists
            or ``{name: [prompts]}``; their unit embeddings are averaged and renormalised, the
            CLIP prompt-ensembling convention), or class text embeddings (C, d).
        class_names: names for the classes (defaults: dict keys, the single prompts, or indices).
        criterion: abstention rule, an entry of :data:`ABSTAIN_REGISTRY` (``likelihood``,
            ``uncertainty``, ``probability``, ``entropy``; ``ABSTAIN_REGISTRY.describe()``).
        threshold: abstain when the criterion crosses it; None never abstains. Checked against
            the criterion's declared range (a probability in [0, 1], an entropy >= 0, ...).
        unknown_label: label of abstentions.
        calibrator: a :class:`~asymvlm.confidence.Calibrator` for these classes
            (:func:`fit_zero_shot_calibrator`): adds ``p_correct``, P(the predicted
            class is right), and enables ``criterion="p_correct"``.
        image_familiarity: the :class:`~asymvlm.confidence.Familiarity` of images the calibrator was
            fitted with (when its features include ``unfamiliarity``).

    Raises:
        ConfigError: an unknown criterion or a threshold of the wrong type or out of range.
    """
    abstain = ABSTAIN_REGISTRY.build(criterion, threshold=threshold)
    if isinstance(classes, dict):
        class_names = list(classes) if class_names is None else class_names
        classes = list(classes.values())
    if isinstance(classes, Tensor):
        text = classes
        default_names = [str(i) for i in range(text.shape[0])]
    else:
        if len(classes) == 0:
            raise InputError("no classes given")
        if all(isinstance(c, str) for c in classes):
            text = model.text_embeddings(list(classes))
            default_names = list(classes)
        else:
            if any(isinstance(c, str) or len(c) == 0 for c in classes):
                raise InputError("give either one prompt string per class or a non-empty list of prompts per class")
            text = torch.stack(
                [torch.nn.functional.normalize(model.text_embeddings(list(c)).mean(0), dim=-1) for c in classes]
            )
            default_names = [str(c[0]) for c in classes]
    names = list(class_names) if class_names is not None else default_names
    if len(names) != text.shape[0]:
        raise InputError(f"{len(names)} class names for {text.shape[0]} classes")
    q = model.encode_text(text)
    if not isinstance(images, Tensor):
        images = model.encode_image(images)
    ll = model.log_likelihood(q, images).T  # (N, C)
    probs = torch.softmax(math.exp(model.logit_scale) * ll, dim=-1)
    best_ll, best = ll.max(dim=-1)
    unc = (1.0 / q.concentration)[best]
    p_correct = None
    if calibrator is not None:
        from asymvlm.confidence import zero_shot_features

        u = None if image_familiarity is None else image_familiarity.score(images.float().cpu())
        p_correct = calibrator.predict(zero_shot_features(unc, probs, u)).to(probs.dtype)
    abstained = abstain(best_ll, unc, probs, p_correct)  # (N,) bool
    preds = torch.where(abstained, torch.full_like(best, -1), best)
    labels = [unknown_label if a else names[b] for a, b in zip(abstained.tolist(), best.tolist())]
    return ZeroShotResult(preds, labels, best_ll, unc, probs, abstained, best, names, criterion, threshold, p_correct)


def fit_zero_shot_calibrator(
    model: Any,
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str] | Tensor | Any,
    *,
    class_names: Sequence[str] | None = None,
    method: str = "logistic",
    image_familiarity: Any = None,
) -> Any:
    """A :class:`~asymvlm.confidence.Calibrator` of ``P(the predicted class is right | parts)`` fitted on
    labelled validation images for one set of classes; pass it to :func:`zero_shot_classify`
    (``calibrator=``). The parts: :func:`asymvlm.confidence.zero_shot_features`; ``image_familiarity``
    (a :class:`~asymvlm.confidence.Familiarity` of images) adds the images' unfamiliarity."""
    from asymvlm.confidence import Calibrator, zero_shot_features

    res = zero_shot_classify(model, images, classes, class_names=class_names)
    correct = res.best.cpu() == torch.as_tensor(labels).cpu()
    u = None if image_familiarity is None else image_familiarity.score(images.float().cpu())
    return Calibrator.fit(
        zero_shot_features(res.uncertainty, res.probabilities, u),
        correct,
        method=method,
        info={"label": "true class", "classes": list(res.class_names or []), "direction": "zero_shot"},
    )
