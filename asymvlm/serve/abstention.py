"""When a served answer abstains: the criteria of :data:`asymvlm.zeroshot.ABSTAIN_REGISTRY` as the
API offers them, and the rule of a text query (:class:`Abstention`, :func:`parse_abstention`).

A text search abstains on ``uncertainty`` when ``1/kappa`` is above the threshold (the query is too
vague to retrieve a particular image), on ``likelihood`` when the best image's ``log q(x)`` is below
it (nothing in the gallery fits), on ``p_correct`` when the calibrated probability that the best
image is right is below it. A zero-shot classification abstains on the registry's criteria over its
classes (``likelihood``, ``uncertainty``, ``probability``, ``entropy``).

Every list of criteria the service, its schemas and its page show is generated here, from the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.zeroshot import ABSTAIN_REGISTRY

__all__ = [
    "Abstention",
    "parse_abstention",
    "SEARCH_CRITERIA",
    "CLASSIFY_CRITERIA",
    "P_CORRECT",
    "AUTO_ABSTAIN",
]

P_CORRECT = "p_correct"  # the criterion that needs a calibrator (asymvlm.confidence)
# What each registry criterion means for a text search: the best image, where the registry speaks of
# the best class. A search has no posterior over classes, so the criteria over one (probability,
# entropy) are not offered. In the order the API lists them.
SEARCH_CRITERIA = {
    "uncertainty": "abstain when the query's uncertainty 1/kappa is above the threshold (too vague)",
    "likelihood": "abstain when the best image's log-likelihood log q(x) is below the threshold (nothing fits)",
    P_CORRECT: "abstain when the calibrated probability that the best image is right is below the threshold",
}
# The zero-shot endpoint's: every registry criterion but p_correct (the service holds no zero-shot calibrator).
CLASSIFY_CRITERIA = tuple(name for name in ABSTAIN_REGISTRY if name != P_CORRECT)
AUTO_ABSTAIN = (P_CORRECT, 0.5)  # "auto" on a calibrated service (none on an uncalibrated one)

_unknown = sorted(set(SEARCH_CRITERIA) - set(ABSTAIN_REGISTRY))
if _unknown:  # the registry decides; a search criterion it does not know is a bug here
    raise ImportError(f"search criteria {_unknown} are not in asymvlm.zeroshot.ABSTAIN_REGISTRY")


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
