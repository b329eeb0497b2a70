"""An answer's uncertainty in words: ``specific`` / ``moderate`` / ``vague``, a verdict from its
``p_correct``, and one-line reasons from the parts of its uncertainty.

``1/kappa`` has no absolute scale (it depends on the model and the dimension), so the service places
each query among the gallery's own captions: the percentile of its uncertainty among theirs, and a
word — ``specific`` (below the 1/3 quantile), ``moderate``, or ``vague`` (above the 2/3 quantile).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["REASONS", "reasons_of", "verdict_of", "specificity_word"]

WORDS = ((1 / 3, "specific"), (2 / 3, "moderate"), (1.0, "vague"))
VERDICTS = (0.5, "likely right", "uncertain")  # p_correct >= 0.5: the first word, else the second


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
