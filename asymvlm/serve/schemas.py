"""The API's request and response types (pydantic: the OpenAPI schema at ``/openapi.json``).

Requests are strict (unknown fields, a string for a number, NaN: a 422 naming the field). Responses
are what :class:`~asymvlm.serve.service.RetrievalService` returns — the one shape of every answer,
built once by the service and served as it is. The abstention criteria are generated from
:data:`asymvlm.zeroshot.ABSTAIN_REGISTRY` (:mod:`asymvlm.serve.abstention`).
"""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from asymvlm.serve.abstention import CLASSIFY_CRITERIA, SEARCH_CRITERIA
from asymvlm.serve.words import VERDICTS

__all__ = [
    "AbstainRule",
    "TextSearchRequest",
    "Hit",
    "Abstained",
    "Confidence",
    "TextAnswer",
    "TextSearchResponse",
    "ImageSearchRequest",
    "ImageAnswer",
    "ImageSearchResponse",
    "ClassifyRequest",
    "ClassifiedImage",
    "ClassifyResponse",
    "DistributionRequest",
    "Distribution",
    "DistributionResponse",
]

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Number = float  # strict float accepts JSON integers too
Vector = Annotated[list[Number], Field(min_length=1)]


class _OneOrMany(BaseModel):
    """A request giving one item (field ``ONE``) or several (field ``MANY``), never both."""

    ONE: ClassVar[str]
    MANY: ClassVar[str]

    @model_validator(mode="after")
    def _one_of(self):
        if (getattr(self, self.ONE) is None) == (getattr(self, self.MANY) is None):
            raise ValueError(f"give exactly one of {self.ONE} and {self.MANY}")
        return self

    def given(self) -> tuple[list[Any], str]:
        """The items as a list, and the name of the field they came in."""
        one = getattr(self, self.ONE)
        return ([one], self.ONE) if one is not None else (getattr(self, self.MANY), self.MANY)


class AbstainRule(BaseModel):
    """When a text query abstains (overrides the server's default; ``criterion: null`` never abstains)."""

    model_config = _STRICT
    criterion: Literal[tuple(SEARCH_CRITERIA)] | None = Field(  # type: ignore[valid-type]
        description="; ".join(f"{k}: {v}" for k, v in SEARCH_CRITERIA.items())
    )
    threshold: Number | None = Field(default=None, description="The criterion's threshold.")


class TextSearchRequest(_OneOrMany):
    """Text -> images. Give ``query`` (one text) or ``queries`` (several)."""

    model_config = _STRICT
    ONE, MANY = "query", "queries"
    query: str | None = Field(default=None, description="One text query.", examples=["a red circle"])
    queries: list[str] | None = Field(default=None, description="Several text queries.")
    k: int = Field(default=10, description="Images per query (1 to the configured maximum and the gallery size).")
    abstain: AbstainRule | None = Field(default=None, description="Abstention rule (default: the server's).")


class Hit(BaseModel):
    id: str = Field(description="The image id (or the caption, image -> text).")
    row: int = Field(description="Its row in the gallery (or caption index).")
    score: float | None = Field(description="log q(x): the log-likelihood of the image under the text's distribution.")
    cosine: float | None = Field(description="Cosine between the text's mean direction and the image embedding.")
    probability: float | None = Field(
        default=None,
        description="The hit's probability under the retrieval distribution p(i | t) ∝ q_t(x_i) over the whole "
        "gallery (text -> image), or p(t | x) over the caption index (image -> text).",
    )
    thumbnail: str | None = Field(default=None, description="URL of the image's thumbnail (text -> image).")
    uncertainty: float | None = Field(default=None, description="1/kappa of the retrieved caption (image -> text).")
    uncertainty_percentile: float | None = Field(default=None, description="Its percentile among the captions.")
    specificity: str | None = Field(default=None, description="specific / moderate / vague.")


class Abstained(BaseModel):
    criterion: str | None
    threshold: float | None
    quantile: float | None = None
    statistic: float | None = Field(description="The value compared with the threshold.")


class Confidence(BaseModel):
    """The parts of an answer's uncertainty and the probability that its best image is right
    (asymvlm.confidence.AnswerConfidence.to_dict)."""

    p_correct: float | None = Field(
        description="Calibrated probability that the best image is right (null: the service is uncalibrated)."
    )
    calibrated: bool = Field(description="Whether p_correct was computed (see /v1/info's calibration).")
    ambiguity: float | None = Field(description="Ambiguity of the text: 1/kappa.")
    ambiguity_percentile: float | None = Field(description="Its percentile among the gallery's captions.")
    retrieval_entropy: float | None = Field(
        description="Entropy (nats) of the retrieval distribution p(i | t) over the whole gallery."
    )
    effective_candidates: float | None = Field(
        description="exp(retrieval_entropy): the effective number of images competing for the query."
    )
    top_probability: float | None = Field(description="The best image's probability under that distribution.")
    unfamiliarity: float | None = Field(
        description="How far the text lies from the model's training texts (null: the model has no density)."
    )
    unfamiliarity_percentile: float | None = Field(
        description="Its percentile among held-out training texts (null: the model has no density)."
    )


class TextAnswer(BaseModel):
    query: str | None = None
    concentration: float | None = Field(description="kappa of the text's distribution.")
    uncertainty: float | None = Field(description="1/kappa.")
    uncertainty_percentile: float | None = Field(description="Percentile of 1/kappa among the gallery's captions.")
    specificity: str | None = Field(description="specific (below the 1/3 quantile), moderate, or vague (above 2/3).")
    confidence: Confidence | None = Field(
        default=None, description="How likely the answer is right, and the parts of its uncertainty."
    )
    verdict: Literal[VERDICTS[1:]] | None = Field(  # type: ignore[valid-type]
        default=None, description="likely right (p_correct >= 0.5), uncertain (below), null when uncalibrated."
    )
    reasons: list[str] | None = Field(
        default=None,
        description="One-line reasons from the parts: a vague query (above the 2/3 quantile of the captions), "
        "two or more images competing, an unfamiliar text (beyond the 95th percentile of training texts).",
    )
    abstained: bool = Field(description="Whether the service abstains for this query (hits are still listed).")
    abstention: Abstained
    hits: list[Hit]


class TextSearchResponse(BaseModel):
    results: list[TextAnswer]


class ImageSearchRequest(_OneOrMany):
    """Image embedding(s) -> captions. Give ``embedding`` (one unit vector) or ``embeddings``."""

    model_config = _STRICT
    ONE, MANY = "embedding", "embeddings"
    embedding: Vector | None = None
    embeddings: list[Vector] | None = None
    k: int = Field(default=10, description="Captions per image.")


class ImageAnswer(BaseModel):
    hits: list[Hit]


class ImageSearchResponse(BaseModel):
    results: list[ImageAnswer]


class ClassifyRequest(_OneOrMany):
    """Zero-shot classification of image embedding(s) into ``classes``, with abstention."""

    model_config = _STRICT
    ONE, MANY = "embedding", "embeddings"
    embedding: Vector | None = None
    embeddings: list[Vector] | None = None
    classes: list[str] = Field(min_length=1, description="One prompt per class.", examples=[["a circle", "a square"]])
    criterion: Literal[tuple(CLASSIFY_CRITERIA)] = Field(  # type: ignore[valid-type]
        default="probability", description="Abstention criterion (asymvlm.zeroshot.ABSTAIN_REGISTRY)."
    )
    threshold: Number | None = Field(default=None, description="Abstain when the criterion crosses it; null never.")


class ClassifiedImage(BaseModel):
    label: str
    class_index: int | None
    best_label: str
    abstained: bool
    log_likelihood: float | None
    uncertainty: float | None
    p_correct: float | None = Field(default=None, description="Calibrated P(right); null without a calibrator.")
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    criterion: str | None
    threshold: float | None
    images: list[ClassifiedImage]


class DistributionRequest(_OneOrMany):
    """Text(s) -> their distributions on the sphere. Give ``text`` or ``texts``."""

    model_config = _STRICT
    ONE, MANY = "text", "texts"
    text: str | None = None
    texts: list[str] | None = None


class Distribution(BaseModel):
    text: str
    family: str
    dim: int
    mu: list[float]
    kappa: float
    uncertainty: float | None
    uncertainty_percentile: float | None
    specificity: str | None


class DistributionResponse(BaseModel):
    results: list[Distribution]
