"""The HTTP face of :class:`~asymvlm.serve.service.RetrievalService`: a FastAPI app (``asymvlm-serve``).

Endpoints (JSON; the schema at ``/openapi.json``, rendered offline at ``/docs``):

=======  ===============================  ======================================================
GET      ``/``                            the web page (static HTML + JS, no build step, no CDN)
GET      ``/healthz``, ``/readyz``        liveness; readiness (200 once the model is warm, else 503; see below)
GET      ``/metrics``                     Prometheus text: requests, latency histogram, batch sizes
GET      ``/v1/info``                     model, gallery, limits, default abstention, calibration
POST     ``/v1/search/text``              text -> images, with uncertainty, P(right) and abstention
POST     ``/v1/search/image``             image embedding -> captions
POST     ``/v1/search/image/upload``      image file (multipart ``file``) -> captions
POST     ``/v1/classify``                 image embedding -> zero-shot class, with abstention
POST     ``/v1/classify/upload``          image file -> zero-shot class
POST     ``/v1/distribution``             text -> (mu, kappa)
GET      ``/v1/thumbnails/{image_id}``    an image's thumbnail
=======  ===============================  ======================================================

Requests of the same kind arriving together are answered by one model call
(:class:`~asymvlm.serve.batching.DynamicBatcher`); ``max_batch=1`` answers one request per forward.

Hardening: every request body and upload is bounded (413 beyond the limit, before the app reads
it); every field is validated with a 4xx that names it (``{"error": {"status", "field",
"message"}}``); with an API key, everything but ``/healthz`` and ``/readyz`` needs it (``Authorization:
Bearer <key>``, ``X-API-Key``, or HTTP Basic with the key as password — what the page's browser
prompt sends), compared in constant time; CORS is closed unless origins are configured; thumbnails
are looked up by id in memory, so no request reaches the filesystem.

Uploads: the header's width x height is checked before anything is decoded (413 beyond
``max_image_pixels``); a JPEG decodes at a reduced scale (``draft``) when it is larger than the
encoder needs; all uploads decoding at once share a budget of ``max_pixels_in_flight`` pixels
(:class:`PixelBudget`: a request waits for its share), so a burst of tiny files that decode to huge
images cannot take the server's memory. A body not received within ``read_timeout_s`` is a 408.
JSON nested too deeply (a form field or a body) is a 4xx naming the field. Nothing non-finite is
served: a NaN in the model's outputs is a 500 with one logged line
(:class:`~asymvlm.serve.service.NonFiniteResult`), and every answer is checked once more, as a
whole, before it leaves (:func:`check_finite_answer`). No answer names a server path
(:func:`~asymvlm.serve.service.public_spec`).

Readiness: under ``asymvlm-serve`` (uvicorn), the port opens only once the model is loaded and
warmed up, so ``/readyz`` answers 200 whenever it answers; a refused connection is "not ready".
It answers 503 while the app is shutting down, or served without its lifespan (in-process tests).
"""

import asyncio
import base64
import hmac
import html
import io
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote, unquote

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from asymvlm.errors import ConfigError, InputError
from asymvlm.serve.batching import DynamicBatcher, Overloaded
from asymvlm.serve.service import (
    SEARCH_CRITERIA,
    Abstention,
    ClassifyQuery,
    ImageQuery,
    NonFiniteResult,
    TextQuery,
)

__all__ = ["ServeConfig", "create_app", "ApiError", "PixelBudget", "check_finite_answer", "UPLOAD_SIDE"]

log = logging.getLogger("asymvlm.serve")

THUMBNAILS = "/v1/thumbnails/"  # + the percent-encoded image id
UPLOAD_PATHS = ("/v1/search/image/upload", "/v1/classify/upload")
OPEN_PATHS = ("/healthz", "/readyz")  # never need the API key
PAGE_PATHS = ("/", "/static/app.js", "/static/style.css")
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
ZERO_SHOT_CRITERIA = ("likelihood", "uncertainty", "probability", "entropy")
# Uploads larger than this on their shorter side are decoded (JPEG's draft) or reduced (an integer
# box filter) towards it before the encoder sees them: encoders resize to 224-512 pixels a side.
UPLOAD_SIDE = 512
NESTED = "JSON nested too deeply (send a flat JSON value)"
ASCII_INT = re.compile(r"[0-9]{1,9}")  # a form integer: ASCII digits only (int() also takes "3_0", "٣")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and behaviour of the service (``asymvlm-serve --help`` lists them as flags)."""

    max_k: int = field(default=100, metadata={"help": "Largest k a request may ask for (also capped by the gallery)."})
    max_queries: int = field(default=32, metadata={"help": "Most texts or images in one request."})
    max_query_chars: int = field(default=1000, metadata={"help": "Longest text query, in characters."})
    max_classes: int = field(default=256, metadata={"help": "Most classes in one zero-shot request."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest JSON request body, in bytes."})
    max_upload_bytes: int = field(
        default=8 << 20, metadata={"help": "Largest image upload (multipart body), in bytes."}
    )
    max_image_pixels: int = field(
        default=16_000_000,
        metadata={"help": "Largest upload as decoded (width x height; a large JPEG decodes at a reduced scale)."},
    )
    max_pixels_in_flight: int = field(
        default=64_000_000,
        metadata={"help": "Most pixels decoded at once over all uploads (a request waits for its share)."},
    )
    read_timeout_s: float = field(
        default=30.0, metadata={"help": "Seconds a client may take to send its request body (then 408)."}
    )
    max_batch: int = field(default=64, metadata={"help": "Most queries per model call (1: one request per forward)."})
    max_wait_ms: float = field(
        default=2.0, metadata={"help": "How long a request may wait for others to batch with (only under concurrency)."}
    )
    max_queue: int = field(default=4096, metadata={"help": "Most queued queries; beyond it 503 (back-pressure)."})
    api_key: str | None = field(default=None, metadata={"help": "Require this key on every endpoint but health."})
    cors_origins: tuple[str, ...] = field(default=(), metadata={"help": "Origins allowed by CORS (none: closed)."})

    def __post_init__(self) -> None:
        for name in ("max_k", "max_queries", "max_query_chars", "max_classes", "max_body_bytes", "max_upload_bytes",
                     "max_image_pixels", "max_pixels_in_flight", "max_batch", "max_queue"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 1000):
            raise ConfigError(f"max_wait_ms must be in [0, 1000], got {self.max_wait_ms!r}")
        if self.max_pixels_in_flight < self.max_image_pixels:
            raise ConfigError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight}) must be >= max_image_pixels "
                f"({self.max_image_pixels}): one upload must fit"
            )
        t = self.read_timeout_s
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 3600):
            raise ConfigError(f"read_timeout_s must be in (0, 3600] seconds, got {t!r}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError("the API key must have at least 16 characters (a shorter one is guessable)")


class ApiError(Exception):
    """A client error with the field it concerns: answered as ``{"error": {status, field, message}}``."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "field": field, "message": message}}, status_code=status, headers=headers
    )


class PixelBudget:
    """At most ``capacity`` pixels decoded at once, shared by every upload handler of an app.

    ``async with budget.hold(n):`` waits until ``n`` pixels fit beside those held (first come, first
    served among those that fit), holds them for the block, then gives them back. ``in_use`` is
    what is held now, ``peak`` the most ever held.

    Example:
        >>> async def two():
        ...     budget = PixelBudget(10)
        ...     async with budget.hold(6):
        ...         inside = budget.in_use
        ...     return inside, budget.in_use, budget.peak
        >>> asyncio.run(two())
        (6, 0, 6)
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.in_use = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None
        self._loop: Any = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:  # an app may run in several loops (tests)
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    @asynccontextmanager
    async def hold(self, pixels: int):
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels are over the budget of {self.capacity}")
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.in_use + pixels <= self.capacity)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with cond:
                self.in_use -= pixels
                cond.notify_all()


def check_finite_answer(answer: Any, where: str = "answer") -> None:
    """Raise :class:`~asymvlm.serve.service.NonFiniteResult` naming the first non-finite number in an
    answer (nested dicts and lists): the last check before anything is served.

    Example:
        >>> check_finite_answer({"hits": [{"score": 1.0}]})
        >>> check_finite_answer({"hits": [{"score": float("nan")}]})
        Traceback (most recent call last):
        ...
        asymvlm.serve.service.NonFiniteResult: a non-finite number at answer.hits.0.score: not served
    """
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise NonFiniteResult(f"a non-finite number at {where}: not served")
    elif isinstance(answer, dict):
        for k, v in answer.items():
            check_finite_answer(v, f"{where}.{k}")
    elif isinstance(answer, (list, tuple)):
        for i, v in enumerate(answer):
            check_finite_answer(v, f"{where}.{i}")


# ----------------------------------------------------------------------------------------------
# request and response models (pydantic: the OpenAPI schema)
# ----------------------------------------------------------------------------------------------
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
    criterion: Literal["uncertainty", "likelihood", "p_correct"] | None = Field(
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
    verdict: Literal["likely right", "uncertain"] | None = Field(
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
    criterion: Literal["likelihood", "uncertainty", "probability", "entropy"] = Field(
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


# ----------------------------------------------------------------------------------------------
# the ASGI guard: body limits, API key, metrics, security headers (one pure-ASGI layer, no
# per-request task switching as in BaseHTTPMiddleware)
# ----------------------------------------------------------------------------------------------
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
]


class _Guard:
    def __init__(self, app: Any, config: ServeConfig, metrics: Any):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.key = None if config.api_key is None else config.api_key.encode()

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given: list[bytes] = []
        if b"x-api-key" in headers:
            given.append(headers[b"x-api-key"])
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            given.append(value.strip())
        elif scheme.lower() == b"basic":
            try:
                given.append(base64.b64decode(value.strip(), validate=True).partition(b":")[2])
            except ValueError:
                pass
        ok = False
        for g in given:  # every candidate compared in constant time
            ok |= hmac.compare_digest(g, self.key)
        return ok

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        status_seen = {"code": 500}

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.key is not None and path not in OPEN_PATHS and not self._authorized(headers):
                challenge = 'Basic realm="asymvlm", charset="UTF-8"' if path in PAGE_PATHS else 'Bearer realm="asymvlm"'
                await _error(401, "authorization", "missing or wrong API key", {"WWW-Authenticate": challenge})(
                    scope, receive, send_wrapped
                )
                return
            limit = self.config.max_upload_bytes + 65536 if path in UPLOAD_PATHS else self.config.max_body_bytes
            declared = headers.get(b"content-length")
            if declared is not None:
                try:
                    n = int(declared)
                except ValueError:
                    n = -1
                if n < 0:
                    await _error(400, "content-length", "invalid Content-Length header")(scope, receive, send_wrapped)
                    return
                if n > limit:
                    await _too_large(limit)(scope, receive, send_wrapped)
                    return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = bytearray()
                more = True
                deadline = time.monotonic() + self.config.read_timeout_s
                while more:
                    try:  # a slow client (a body trickled in) holds a connection until the deadline only
                        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        await _too_slow(self.config.read_timeout_s)(scope, receive, send_wrapped)
                        return
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        await _too_large(limit)(scope, receive, send_wrapped)
                        return
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_wrapped)
            else:
                await self.app(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or ("static" if path in PAGE_PATHS else "unmatched")
            self.metrics.observe_request(
                name, scope.get("method", ""), status_seen["code"], time.perf_counter() - start
            )


def _too_slow(seconds: float) -> JSONResponse:
    message = f"the request body was not received within {seconds:g} s (read_timeout_s)"
    return _error(408, "body", message, {"Connection": "close"})


def _too_large(limit: int) -> JSONResponse:
    return _error(413, "body", f"the request body is over the limit of {limit} bytes")


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
class _Metrics:
    """Prometheus metrics of one app (its own registry: several apps in one process stay apart)."""

    def __init__(self, batchers: dict[str, DynamicBatcher], kinds: tuple[str, ...], gallery_size: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series (a timestamp per label set): smaller scrapes

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "asymvlm_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "asymvlm_request_duration_seconds", "Request latency by route", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )  # fmt: skip
        self.batch = Histogram(
            "asymvlm_batch_size", "Queries per model call, by kind", ["kind"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )  # fmt: skip
        self.wait = Histogram(
            "asymvlm_batch_wait_seconds", "How long the first request of a batch waited, by kind", ["kind"],
            registry=self.registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )  # fmt: skip
        queue = Gauge(
            "asymvlm_queue_depth", "Queries waiting for a model call, by kind", ["kind"], registry=self.registry
        )
        for kind in kinds:  # the batchers of the running app (none before start-up)
            queue.labels(kind).set_function(lambda kind=kind: batchers[kind].queued if kind in batchers else 0)
        Gauge("asymvlm_gallery_images", "Images in the served gallery", registry=self.registry).set(gallery_size)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def on_batch(self, kind: str):
        def observe(units: int, waited: float) -> None:
            self.batch.labels(kind).observe(units)
            self.wait.labels(kind).observe(waited)

        return observe

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ----------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------
def _static(name: str) -> bytes:
    return resources.files("asymvlm.serve").joinpath("static", name).read_bytes()


def _docs_page(schema: dict[str, Any]) -> str:
    """The OpenAPI schema rendered as plain HTML, server-side (Swagger UI would need a CDN)."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>asymvlm-serve API</title>",
        "<link rel='stylesheet' href='/static/style.css'></head><body class='docs'>",
        f"<h1>{html.escape(schema['info']['title'])} {html.escape(schema['info']['version'])}</h1>",
        "<p>The machine-readable schema: <a href='/openapi.json'>/openapi.json</a>.</p>",
    ]
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            parts.append(f"<section><h2><code>{method.upper()} {html.escape(path)}</code></h2>")
            parts.append(f"<p>{html.escape(op.get('summary', ''))}</p>")
            if op.get("description"):
                parts.append(f"<p>{html.escape(op['description'])}</p>")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                parts.append(f"<h3>request ({html.escape(media)})</h3>")
                parts.append(f"<pre>{html.escape(json.dumps(content.get('schema', {}), indent=2))}</pre>")
            for code, resp in op.get("responses", {}).items():
                parts.append(f"<h3>{html.escape(code)}: {html.escape(resp.get('description', ''))}</h3>")
            parts.append("</section>")
    parts.append(
        "<section><h2>Schemas</h2><pre>"
        + html.escape(json.dumps(schema.get("components", {}).get("schemas", {}), indent=2))
        + "</pre></section></body></html>"
    )
    return "".join(parts)


def create_app(service: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``service`` (a :class:`~asymvlm.serve.service.RetrievalService`).

    Example:
        >>> import tempfile, torch
        >>> from fastapi.testclient import TestClient
        >>> from asymvlm.heads import TextHead
        >>> from asymvlm.model import AsymVLM
        >>> from asymvlm.serve.gallery import write_gallery
        >>> from asymvlm.serve.service import RetrievalService
        >>> images = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
        >>> gallery = write_gallery(tempfile.mkdtemp() + "/g", images)
        >>> service = RetrievalService(AsymVLM(TextHead(dim=8, hidden_dims=(16,))), gallery)
        >>> with TestClient(create_app(service)) as client:
        ...     ok = client.get("/healthz").json()
        ...     hits = client.post("/v1/search/text", json={"queries": [], "k": 3})
        >>> ok, hits.status_code, hits.json()["error"]["field"]
        ({'status': 'ok'}, 422, 'queries')
    """
    config = config or ServeConfig()
    gallery = service.gallery
    wait_s = config.max_wait_ms / 1000
    size = lambda item: item.size  # noqa: E731
    work = {  # kind -> (the service's batch function, units of work of a request)
        "search_text": (service.search_text, size),
        "search_image": (service.search_image, size),
        "classify": (service.classify, size),
        "distribution": (service.distributions, len),
    }
    batchers: dict[str, DynamicBatcher] = {}  # made at start-up, in the server's event loop
    metrics = _Metrics(batchers, tuple(work), len(gallery))
    static = {name: _static(name) for name in STATIC}
    page = _static("index.html")
    budget = PixelBudget(config.max_pixels_in_flight)  # shared by every upload handler

    async def lifespan(app: FastAPI):
        # one model thread per app: a forward at a time, the event loop free meanwhile
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymvlm-model")
        for kind, (fn, cost) in work.items():
            batchers[kind] = DynamicBatcher(
                fn, max_batch=config.max_batch, max_wait_s=wait_s, executor=executor, max_queue=config.max_queue,
                cost=cost, on_batch=metrics.on_batch(kind),
            )  # fmt: skip
        await asyncio.get_running_loop().run_in_executor(executor, _warm_up, service)
        app.state.ready = True
        log.info("ready: %d images, %d captions", len(gallery), len(gallery.captions))
        try:
            yield
        finally:
            app.state.ready = False
            for b in batchers.values():
                await b.close()
            batchers.clear()
            executor.shutdown(wait=False, cancel_futures=True)

    async def submit(kind: str, item: Any) -> Any:
        """The one way from a request to the service's answer (which is checked finite here)."""
        if kind not in batchers:
            raise ApiError(503, None, "the service is starting or stopping", {"Retry-After": "1"})
        answer = await batchers[kind].submit(item)
        check_finite_answer(answer, kind)
        return answer

    app = FastAPI(
        title="asymvlm-serve",
        version=_version(),
        summary="Retrieval with uncertainty (AsymVLM): text -> images, image -> captions, zero-shot, distributions",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ready = False
    app.state.service = service
    app.state.config = config
    app.state.pixel_budget = budget

    # -- errors: one shape, naming the field -----------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields, messages = [], []
        for e in errors[:5]:
            loc = list(e.get("loc", ()))
            if loc and loc[0] in ("body", "query", "path", "header"):  # where, not which field
                loc = loc[1:]
            if e.get("type") == "json_invalid":
                fields.append("body")
                messages.append(f"body: invalid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})")
                continue
            if not loc and isinstance(e.get("input"), (bytes, bytearray)):
                fields.append("body")
                messages.append("body: send a JSON object with Content-Type: application/json")
                continue
            name = ".".join(str(x) for x in loc) or "body"
            fields.append(name)
            messages.append(f"{name}: {e.get('msg', 'invalid')}")
        return _error(422, fields[0] if fields else "body", "; ".join(messages) or "invalid request")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.field, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):  # FastAPI's body parsing
            return _error(400, "body", f"body: {NESTED}")
        return _error(exc.status_code, None, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(NonFiniteResult)
    async def _non_finite(request: Request, exc: NonFiniteResult) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(500, None, f"{exc} (the model is broken; see the server log)")

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, None, f"overloaded, retry later: {exc}", {"Retry-After": "1"})

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return _error(422, None, str(exc))

    # -- checks shared by the endpoints ----------------------------------------------------------
    def check_k(k: int, n: int, what: str) -> None:
        if k < 1:
            raise ApiError(422, "k", f"k: must be >= 1, got {k}")
        if k > config.max_k:
            raise ApiError(422, "k", f"k: must be <= {config.max_k} (the configured maximum), got {k}")
        if k > n:
            raise ApiError(422, "k", f"k: must be <= {n} (the {what}), got {k}")

    def check_text(t: str, where: str) -> None:
        if not t.strip():
            raise ApiError(422, where, f"{where}: the text is empty")
        if len(t) > config.max_query_chars:
            raise ApiError(422, where, f"{where}: {len(t)} characters, over the limit of {config.max_query_chars}")
        if "\x00" in t:
            raise ApiError(422, where, f"{where}: the text holds a NUL character")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate from a JSON \ud800 escape
            raise ApiError(422, where, f"{where}: not valid Unicode text ({err.reason})") from err

    def check_texts(texts: list[str], name: str) -> list[str]:
        if not texts:
            raise ApiError(422, name, f"{name}: give at least one text")
        if len(texts) > config.max_queries:
            raise ApiError(422, name, f"{name}: at most {config.max_queries} texts per request, got {len(texts)}")
        for i, t in enumerate(texts):
            check_text(t, name if name in ("query", "text") else f"{name}.{i}")
        if service.model.encoder is None:
            raise ApiError(422, name, f"{name}: this model has no text encoder; send embeddings")
        return texts

    def check_vectors(vectors: list[list[float]], name: str) -> torch.Tensor:
        if not vectors:
            raise ApiError(422, name, f"{name}: give at least one embedding")
        if len(vectors) > config.max_queries:
            raise ApiError(422, name, f"{name}: at most {config.max_queries} embeddings per request")
        d = service.model.dim
        for i, v in enumerate(vectors):
            where = name if name == "embedding" else f"{name}.{i}"
            if len(v) != d:
                raise ApiError(422, where, f"{where}: dimension {len(v)}, the model's is {d}")
        x = torch.tensor(vectors, dtype=torch.float64)
        norms = x.norm(dim=1)
        bad = (norms - 1).abs() > 1e-3
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            where = name if name == "embedding" else f"{name}.{i}"
            raise ApiError(422, where, f"{where}: not a unit vector (norm {float(norms[i]):.6g}); normalise it")
        return (x / norms.unsqueeze(1)).float()

    async def read_upload(request: Request) -> tuple[Any, dict[str, str]]:
        """The uploaded image (multipart field ``file``) and the other form fields."""
        if service.model.encoder is None:
            raise ApiError(422, "file", "file: this model has no image encoder; send embeddings")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "file", "send the image as multipart/form-data with a field named file")
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=config.max_upload_bytes)
        except StarletteHTTPException as err:
            raise ApiError(err.status_code if err.status_code < 500 else 400, "file", str(err.detail)) from err
        except Exception as err:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise ApiError(400, "file", f"malformed multipart body: {type(err).__name__}") from err
        upload = form.get("file")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "file", "file: missing (a multipart file field named file)")
        data = await upload.read()
        await form.close()
        if not data:
            raise ApiError(422, "file", "file: empty upload")
        from starlette.concurrency import run_in_threadpool

        image, pixels = await run_in_threadpool(_open_image, data, config.max_image_pixels)  # the header only
        async with budget.hold(pixels):  # decoded pixels in flight, over all uploads
            return await run_in_threadpool(_decode_image, image), fields

    def form_int(fields: dict[str, str], name: str, default: int) -> int:
        raw = fields.get(name)
        if raw is None:
            return default
        if not ASCII_INT.fullmatch(raw.strip(" \t")):
            raise ApiError(422, name, f"{name}: not an integer (ASCII digits, at most 9): {raw[:40]!r}")
        return int(raw.strip(" \t"))

    def form_float(fields: dict[str, str], name: str) -> float | None:
        raw = fields.get(name)
        if raw is None or raw.strip() == "":
            return None
        try:
            value = float(raw)
        except ValueError as err:
            raise ApiError(422, name, f"{name}: not a number: {raw[:40]!r}") from err
        if not math.isfinite(value):
            raise ApiError(422, name, f"{name}: must be finite")
        return value

    def add_thumbnails(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if gallery.has_thumbnails:
            for a in answers:
                for h in a["hits"]:
                    h["thumbnail"] = THUMBNAILS + quote(h["id"], safe="")
        return answers

    def caption_index_size() -> int:
        if service.caption_index is None:
            raise ApiError(404, None, "this gallery has no caption index (built from a collection without captions)")
        return len(service.caption_index)

    def abstention(rule: AbstainRule | None, fields_set: set[str]) -> Abstention | None:
        if "abstain" not in fields_set:
            return None  # the server's default
        if rule is None or rule.criterion is None:
            return Abstention()
        if rule.threshold is None:
            raise ApiError(422, "abstain.threshold", "abstain.threshold: required with a criterion")
        if rule.criterion == "p_correct" and not service.calibrated:
            raise ApiError(
                422, "abstain.criterion", "abstain.criterion: p_correct needs a calibrated service, and this one "
                f"is not ({service.calibration.get('reason')})",
            )  # fmt: skip
        try:  # the criterion's declared threshold range (uncertainty: >= 0)
            return Abstention(rule.criterion, rule.threshold)
        except ConfigError as err:
            raise ApiError(422, "abstain.threshold", f"abstain.threshold: {err}") from err

    def check_classes(classes: list[str], criterion: str, threshold: float | None) -> tuple[str, ...]:
        if len(classes) > config.max_classes:
            raise ApiError(422, "classes", f"classes: at most {config.max_classes}, got {len(classes)}")
        for i, c in enumerate(classes):
            check_text(c, f"classes.{i}")
        if service.model.encoder is None:
            raise ApiError(422, "classes", "classes: this model has no text encoder")
        if len(set(classes)) != len(classes):
            raise ApiError(422, "classes", "classes: the class prompts must be distinct")
        if threshold is not None:
            from asymvlm.zeroshot import ABSTAIN_REGISTRY

            try:
                ABSTAIN_REGISTRY.resolve(criterion, {"threshold": threshold})
            except ConfigError as err:
                raise ApiError(422, "threshold", f"threshold: {err}") from err
        return tuple(classes)

    # -- endpoints -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:  # a fixed set read at start-up: no request reaches the filesystem
            raise ApiError(404, "name", "no such file")
        return Response(static[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model and the gallery are loaded and warm (else 503)")
    async def readyz() -> JSONResponse:
        ready = bool(app.state.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics: requests, latency histogram, batch sizes, queue depth")
    async def metrics_endpoint() -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get(
        "/v1/info",
        summary="The model, the gallery, the limits, the default abstention and how P(right) is calibrated",
    )
    async def info() -> dict[str, Any]:
        limits = {k: v for k, v in asdict(config).items() if k not in ("api_key", "cors_origins")}
        return {**service.info(), "limits": limits, "auth": config.api_key is not None}

    @app.post(
        "/v1/search/text",
        response_model_exclude_unset=True,
        summary="Text -> images, with each query's uncertainty, how likely the answer is right, and abstention",
    )
    async def search_text(body: TextSearchRequest) -> TextSearchResponse:
        texts = check_texts(*body.given())
        check_k(body.k, len(gallery), "gallery size")
        item = TextQuery(texts, body.k, abstention(body.abstain, body.model_fields_set))
        return {"results": add_thumbnails(await submit("search_text", item))}

    @app.post(
        "/v1/search/image",
        response_model_exclude_unset=True,
        summary="Image embedding(s) -> the captions under which they are most likely",
    )
    async def search_image(body: ImageSearchRequest) -> ImageSearchResponse:
        n = caption_index_size()
        x = check_vectors(*body.given())
        check_k(body.k, n, "caption index size")
        return {"results": await submit("search_image", ImageQuery(x, body.k))}

    @app.post(
        "/v1/search/image/upload",
        response_model_exclude_unset=True,
        summary="An image file (multipart field file; form field k) -> captions",
        openapi_extra=_upload_schema({"k": {"type": "integer", "default": 10}}),
    )
    async def search_image_upload(request: Request) -> ImageSearchResponse:
        n = caption_index_size()
        image, fields = await read_upload(request)
        _no_unknown(fields, {"k"})
        k = form_int(fields, "k", 10)
        check_k(k, n, "caption index size")
        return {"results": await submit("search_image", ImageQuery([image], k))}

    @app.post("/v1/classify", summary="Zero-shot classification of image embedding(s), with abstention")
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        x = check_vectors(*body.given())
        classes = check_classes(body.classes, body.criterion, body.threshold)
        return await submit("classify", ClassifyQuery(x, classes, body.criterion, body.threshold))

    @app.post(
        "/v1/classify/upload",
        summary="Zero-shot classification of an image file (multipart: file, classes as JSON, criterion, threshold)",
        openapi_extra=_upload_schema(
            {
                "classes": {"type": "string", "description": "JSON list of class prompts"},
                "criterion": {"type": "string", "enum": list(ZERO_SHOT_CRITERIA), "default": "probability"},
                "threshold": {"type": "number"},
            }
        ),
    )
    async def classify_upload(request: Request) -> ClassifyResponse:
        image, fields = await read_upload(request)
        _no_unknown(fields, {"classes", "criterion", "threshold"})
        try:
            classes = json.loads(fields.get("classes", ""))
        except RecursionError as err:
            raise ApiError(422, "classes", f"classes: {NESTED}") from err
        except ValueError as err:
            raise ApiError(422, "classes", "classes: a JSON list of strings is required") from err
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ApiError(422, "classes", "classes: a non-empty JSON list of strings is required")
        criterion = fields.get("criterion", "probability")
        if criterion not in ZERO_SHOT_CRITERIA:
            raise ApiError(422, "criterion", f"criterion: one of {list(ZERO_SHOT_CRITERIA)}, got {criterion[:40]!r}")
        threshold = form_float(fields, "threshold")
        classes_t = check_classes(classes, criterion, threshold)
        return await submit("classify", ClassifyQuery([image], classes_t, criterion, threshold))

    @app.post("/v1/distribution", summary="Text(s) -> their distribution on the sphere (mu, kappa)")
    async def distribution(body: DistributionRequest) -> DistributionResponse:
        texts = check_texts(*body.given())
        return {"results": await submit("distribution", texts)}

    @app.get(
        "/v1/thumbnails/{image_id:path}",
        summary="The thumbnail of an image, by its id",
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}},
        response_class=Response,
    )
    async def thumbnail(image_id: str, request: Request) -> Response:
        if not gallery.has_thumbnails:
            raise ApiError(404, "image_id", "this gallery has no thumbnails")
        raw = request.scope.get("raw_path")
        if raw and THUMBNAILS.encode() in raw:  # the id as sent, percent-decoded once (as it was encoded)
            image_id = unquote(raw.split(THUMBNAILS.encode(), 1)[1].decode("latin-1"), errors="replace")
        row = gallery.row_of(image_id)  # an in-memory lookup: nothing here becomes a path
        if row is None:
            raise ApiError(404, "image_id", f"no image with id {image_id[:80]!r}")
        cache = "private, max-age=3600" if config.api_key else "public, max-age=3600"
        return Response(
            gallery.thumbnail(row), media_type=gallery.thumbnail_media_type, headers={"Cache-Control": cache}
        )

    guarded = _Guard(app, config, metrics)  # the outermost layer (inside CORS, if any)
    app.state.metrics = metrics
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        outer = CORSMiddleware(
            guarded,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    else:
        outer = guarded
    app.build_middleware_stack = _wrap_stack(app.build_middleware_stack, outer, guarded)
    return app


def _wrap_stack(build: Any, outer: Any, guarded: Any) -> Any:
    """Put the guard (and CORS) outside FastAPI's own stack (its exception middleware included),
    so limits and the API key apply before any routing or parsing."""

    def build_with_guard() -> Any:
        guarded.app = build()
        return outer

    return build_with_guard


def _no_unknown(fields: dict[str, str], known: set[str]) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ApiError(422, unknown[0], f"{unknown[0]}: unknown form field (known: file, {', '.join(sorted(known))})")


def _upload_schema(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                }
            },
        }
    }


def _open_image(data: bytes, max_pixels: int) -> tuple[Any, int]:
    """``(the opened image, the pixels it will decode to)`` from its header alone — nothing is decoded
    yet; a 413/415 naming the field ``file``. A JPEG larger than the encoder needs is set to decode
    at a reduced scale (``draft``: 1/2, 1/4 or 1/8, its shorter side kept >= :data:`UPLOAD_SIDE`)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if im.format == "JPEG" and min(w, h) > UPLOAD_SIDE:
                scale = UPLOAD_SIDE / min(w, h)
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            dw, dh = im.size  # what will be decoded
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ApiError(413, "file", f"file: too many pixels for this server ({err})") from err
    except UnidentifiedImageError as err:
        raise ApiError(415, "file", f"file: not an image this server can read ({type(err).__name__})") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # a corrupt header
        raise ApiError(415, "file", f"file: corrupt or truncated image ({type(err).__name__})") from err
    if dw * dh > max_pixels:
        raise ApiError(
            413, "file", f"file: {w} x {h} pixels decode to {dw * dh}, over the limit of {max_pixels} pixels "
            "(max_image_pixels); send a smaller image",
        )  # fmt: skip
    return im, max(1, dw * dh)


def _decode_image(im: Any) -> Any:
    """Decode an image opened by :func:`_open_image`: RGB, reduced by an integer factor (a box filter)
    when its shorter side is over twice :data:`UPLOAD_SIDE`; a 415 naming ``file`` if corrupt."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            factor = min(im.size) // UPLOAD_SIDE
            if factor >= 2:
                if im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
                    im = im.convert("L" if im.mode == "1" else "RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
                im = im.reduce(factor)
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as err:
        raise ApiError(415, "file", f"file: corrupt or truncated image ({type(err).__name__})") from err


def _warm_up(service: Any) -> None:
    """One query of each kind, so the first user does not pay for lazy initialisation."""
    d = service.model.dim
    x = torch.nn.functional.normalize(torch.ones(1, d), dim=-1)
    if service.model.encoder is not None:
        service.search_text([TextQuery(["warm up"], 1)])
    else:
        service.search_text([TextQuery(x, 1)])
    if service.caption_index is not None:
        service.search_image([ImageQuery(x, 1)])


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("asymvlm")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "0"
