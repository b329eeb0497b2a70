"""The endpoints of ``asymvlm-serve``: one function per route, and the checks they share.

Each route reads what it serves from ``request.app.state.served`` (a :class:`Served`: the service,
the limits, the batchers, the metrics, the upload budget, the page) and answers with the types of
:mod:`asymvlm.serve.schemas`, as the service built them. :data:`ROUTES` lists them in the order
:func:`~asymvlm.serve.app.create_app` registers them (the order of ``/openapi.json``).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote

import torch
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from asymvlm.errors import ConfigError
from asymvlm.serve.abstention import CLASSIFY_CRITERIA, P_CORRECT, Abstention
from asymvlm.serve.batching import DynamicBatcher
from asymvlm.serve.config import ServeConfig
from asymvlm.serve.handlers import NESTED, ApiError
from asymvlm.serve.schemas import (
    AbstainRule,
    ClassifyRequest,
    ClassifyResponse,
    DistributionRequest,
    DistributionResponse,
    ImageSearchRequest,
    ImageSearchResponse,
    TextAnswer,
    TextSearchRequest,
    TextSearchResponse,
)
from asymvlm.serve.service import ClassifyQuery, ImageQuery, NonFiniteResult, TextQuery
from asymvlm.serve.uploads import PixelBudget, form_float, form_int, no_unknown, read_upload, upload_schema
from asymvlm.zeroshot import ABSTAIN_REGISTRY

__all__ = ["Served", "ROUTES", "check_finite_answer", "static_asset", "THUMBNAILS", "STATIC"]

THUMBNAILS = "/v1/thumbnails/"  # + the percent-encoded image id
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def static_asset(name: str) -> bytes:
    """A file of the page (``asymvlm/serve/static``), read once when an app is made."""
    return resources.files("asymvlm.serve").joinpath("static", name).read_bytes()


@dataclass
class Served:
    """What the routes of one app serve: its service and limits, and its batchers (made at start-up,
    in the server's event loop; empty before and after)."""

    service: Any
    config: ServeConfig
    metrics: Any
    budget: PixelBudget
    batchers: dict[str, DynamicBatcher] = field(default_factory=dict)
    page: bytes = field(default_factory=lambda: static_asset("index.html"))
    static: dict[str, bytes] = field(default_factory=lambda: {name: static_asset(name) for name in STATIC})


def _served(request: Request) -> Served:
    return request.app.state.served


def check_finite_answer(answer: Any, where: str = "answer") -> None:
    """Raise :class:`~asymvlm.serve.service.NonFiniteResult` naming the first non-finite number in an
    answer (schema types, dicts and lists, nested): the last check before anything is served.

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
    elif isinstance(answer, BaseModel):
        for k in type(answer).model_fields:
            check_finite_answer(getattr(answer, k), f"{where}.{k}")
    elif isinstance(answer, dict):
        for k, v in answer.items():
            check_finite_answer(v, f"{where}.{k}")
    elif isinstance(answer, (list, tuple)):
        for i, v in enumerate(answer):
            check_finite_answer(v, f"{where}.{i}")


async def _submit(served: Served, kind: str, item: Any) -> Any:
    """The one way from a request to the service's answer (which is checked finite here)."""
    if kind not in served.batchers:
        raise ApiError(503, None, "the service is starting or stopping", {"Retry-After": "1"})
    answer = await served.batchers[kind].submit(item)
    check_finite_answer(answer, kind)
    return answer


# ----------------------------------------------------------------------------------------------
# checks shared by the endpoints
# ----------------------------------------------------------------------------------------------
def _check_k(config: ServeConfig, k: int, n: int, what: str) -> None:
    if k < 1:
        raise ApiError(422, "k", f"k: must be >= 1, got {k}")
    if k > config.max_k:
        raise ApiError(422, "k", f"k: must be <= {config.max_k} (the configured maximum), got {k}")
    if k > n:
        raise ApiError(422, "k", f"k: must be <= {n} (the {what}), got {k}")


def _check_text(config: ServeConfig, t: str, where: str) -> None:
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


def _check_texts(served: Served, texts: list[str], name: str) -> list[str]:
    config = served.config
    if not texts:
        raise ApiError(422, name, f"{name}: give at least one text")
    if len(texts) > config.max_queries:
        raise ApiError(422, name, f"{name}: at most {config.max_queries} texts per request, got {len(texts)}")
    for i, t in enumerate(texts):
        _check_text(config, t, name if name in ("query", "text") else f"{name}.{i}")
    if served.service.model.encoder is None:
        raise ApiError(422, name, f"{name}: this model has no text encoder; send embeddings")
    return texts


def _check_vectors(served: Served, vectors: list[list[float]], name: str) -> torch.Tensor:
    if not vectors:
        raise ApiError(422, name, f"{name}: give at least one embedding")
    if len(vectors) > served.config.max_queries:
        raise ApiError(422, name, f"{name}: at most {served.config.max_queries} embeddings per request")
    d = served.service.model.dim
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


def _caption_index_size(served: Served) -> int:
    if served.service.caption_index is None:
        raise ApiError(404, None, "this gallery has no caption index (built from a collection without captions)")
    return len(served.service.caption_index)


def _abstention(served: Served, rule: AbstainRule | None, fields_set: set[str]) -> Abstention | None:
    service = served.service
    if "abstain" not in fields_set:
        return None  # the server's default
    if rule is None or rule.criterion is None:
        return Abstention()
    if rule.threshold is None:
        raise ApiError(422, "abstain.threshold", "abstain.threshold: required with a criterion")
    if rule.criterion == P_CORRECT and not service.calibrated:
        raise ApiError(
            422, "abstain.criterion", "abstain.criterion: p_correct needs a calibrated service, and this one "
            f"is not ({service.calibration.get('reason')})",
        )  # fmt: skip
    try:  # the criterion's declared threshold range (uncertainty: >= 0)
        return Abstention(rule.criterion, rule.threshold)
    except ConfigError as err:
        raise ApiError(422, "abstain.threshold", f"abstain.threshold: {err}") from err


def _check_classes(served: Served, classes: list[str], criterion: str, threshold: float | None) -> tuple[str, ...]:
    if len(classes) > served.config.max_classes:
        raise ApiError(422, "classes", f"classes: at most {served.config.max_classes}, got {len(classes)}")
    for i, c in enumerate(classes):
        _check_text(served.config, c, f"classes.{i}")
    if served.service.model.encoder is None:
        raise ApiError(422, "classes", "classes: this model has no text encoder")
    if len(set(classes)) != len(classes):
        raise ApiError(422, "classes", "classes: the class prompts must be distinct")
    if threshold is not None:
        try:
            ABSTAIN_REGISTRY.resolve(criterion, {"threshold": threshold})
        except ConfigError as err:
            raise ApiError(422, "threshold", f"threshold: {err}") from err
    return tuple(classes)


def _with_thumbnails(served: Served, answers: list[TextAnswer]) -> list[TextAnswer]:
    """The answers with each hit's thumbnail URL, when the gallery has thumbnails (new objects)."""
    if not served.service.gallery.has_thumbnails:
        return answers
    return [
        a.model_copy(
            update={"hits": [h.model_copy(update={"thumbnail": THUMBNAILS + quote(h.id, safe="")}) for h in a.hits]}
        )
        for a in answers
    ]


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


# ----------------------------------------------------------------------------------------------
# the routes
# ----------------------------------------------------------------------------------------------
async def index_page(request: Request) -> Response:
    return Response(_served(request).page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


async def static_file(name: str, request: Request) -> Response:
    static = _served(request).static
    if name not in static:  # a fixed set read at start-up: no request reaches the filesystem
        raise ApiError(404, "name", "no such file")
    return Response(static[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(_docs_page(request.app.openapi()))


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz(request: Request) -> JSONResponse:
    ready = bool(request.app.state.ready)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    body, ctype = _served(request).metrics.render()
    return Response(body, media_type=ctype)


async def info(request: Request) -> dict[str, Any]:
    served = _served(request)
    config = served.config
    limits = {k: v for k, v in asdict(config).items() if k not in ("api_key", "cors_origins")}
    return {**served.service.info(), "limits": limits, "auth": config.api_key is not None}


async def search_text(body: TextSearchRequest, request: Request) -> TextSearchResponse:
    served = _served(request)
    texts = _check_texts(served, *body.given())
    _check_k(served.config, body.k, len(served.service.gallery), "gallery size")
    item = TextQuery(texts, body.k, _abstention(served, body.abstain, body.model_fields_set))
    return TextSearchResponse(results=_with_thumbnails(served, await _submit(served, "search_text", item)))


async def search_image(body: ImageSearchRequest, request: Request) -> ImageSearchResponse:
    served = _served(request)
    n = _caption_index_size(served)
    x = _check_vectors(served, *body.given())
    _check_k(served.config, body.k, n, "caption index size")
    return ImageSearchResponse(results=await _submit(served, "search_image", ImageQuery(x, body.k)))


async def search_image_upload(request: Request) -> ImageSearchResponse:
    served = _served(request)
    n = _caption_index_size(served)
    image, fields = await read_upload(request, served.config, served.budget)
    no_unknown(fields, {"k"})
    k = form_int(fields, "k", 10)
    _check_k(served.config, k, n, "caption index size")
    return ImageSearchResponse(results=await _submit(served, "search_image", ImageQuery([image], k)))


async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    served = _served(request)
    x = _check_vectors(served, *body.given())
    classes = _check_classes(served, body.classes, body.criterion, body.threshold)
    return await _submit(served, "classify", ClassifyQuery(x, classes, body.criterion, body.threshold))


async def classify_upload(request: Request) -> ClassifyResponse:
    served = _served(request)
    image, fields = await read_upload(request, served.config, served.budget)
    no_unknown(fields, {"classes", "criterion", "threshold"})
    try:
        classes = json.loads(fields.get("classes", ""))
    except RecursionError as err:
        raise ApiError(422, "classes", f"classes: {NESTED}") from err
    except ValueError as err:
        raise ApiError(422, "classes", "classes: a JSON list of strings is required") from err
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ApiError(422, "classes", "classes: a non-empty JSON list of strings is required")
    criterion = fields.get("criterion", "probability")
    if criterion not in CLASSIFY_CRITERIA:
        raise ApiError(422, "criterion", f"criterion: one of {list(CLASSIFY_CRITERIA)}, got {criterion[:40]!r}")
    threshold = form_float(fields, "threshold")
    classes_t = _check_classes(served, classes, criterion, threshold)
    return await _submit(served, "classify", ClassifyQuery([image], classes_t, criterion, threshold))


async def distribution(body: DistributionRequest, request: Request) -> DistributionResponse:
    served = _served(request)
    texts = _check_texts(served, *body.given())
    return DistributionResponse(results=await _submit(served, "distribution", texts))


async def thumbnail(image_id: str, request: Request) -> Response:
    served = _served(request)
    gallery = served.service.gallery
    if not gallery.has_thumbnails:
        raise ApiError(404, "image_id", "this gallery has no thumbnails")
    raw = request.scope.get("raw_path")
    if raw and THUMBNAILS.encode() in raw:  # the id as sent, percent-decoded once (as it was encoded)
        image_id = unquote(raw.split(THUMBNAILS.encode(), 1)[1].decode("latin-1"), errors="replace")
    row = gallery.row_of(image_id)  # an in-memory lookup: nothing here becomes a path
    if row is None:
        raise ApiError(404, "image_id", f"no image with id {image_id[:80]!r}")
    cache = "private, max-age=3600" if served.config.api_key else "public, max-age=3600"
    return Response(gallery.thumbnail(row), media_type=gallery.thumbnail_media_type, headers={"Cache-Control": cache})


# (method, path, endpoint, FastAPI route options), in the order of the API's schema
ROUTES: tuple[tuple[str, str, Any, dict[str, Any]], ...] = (
    ("GET", "/", index_page, {"include_in_schema": False}),
    ("GET", "/static/{name}", static_file, {"include_in_schema": False}),
    ("GET", "/docs", docs, {"include_in_schema": False}),
    ("GET", "/healthz", healthz, {"summary": "Liveness: the process answers"}),
    (
        "GET", "/readyz", readyz,
        {"summary": "Readiness: the model and the gallery are loaded and warm (else 503)"},
    ),
    (
        "GET", "/metrics", metrics_endpoint,
        {"summary": "Prometheus metrics: requests, latency histogram, batch sizes, queue depth"},
    ),
    (
        "GET", "/v1/info", info,
        {"summary": "The model, the gallery, the limits, the default abstention and how P(right) is calibrated"},
    ),
    (
        "POST", "/v1/search/text", search_text,
        {
            "response_model_exclude_unset": True,
            "summary": "Text -> images, with each query's uncertainty, how likely the answer is right, and abstention",
        },
    ),
    (
        "POST", "/v1/search/image", search_image,
        {
            "response_model_exclude_unset": True,
            "summary": "Image embedding(s) -> the captions under which they are most likely",
        },
    ),
    (
        "POST", "/v1/search/image/upload", search_image_upload,
        {
            "response_model_exclude_unset": True,
            "summary": "An image file (multipart field file; form field k) -> captions",
            "openapi_extra": upload_schema({"k": {"type": "integer", "default": 10}}),
        },
    ),
    ("POST", "/v1/classify", classify, {"summary": "Zero-shot classification of image embedding(s), with abstention"}),
    (
        "POST", "/v1/classify/upload", classify_upload,
        {
            "summary": "Zero-shot classification of an image file (multipart: file, classes as JSON, criterion, "
            "threshold)",
            "openapi_extra": upload_schema(
                {
                    "classes": {"type": "string", "description": "JSON list of class prompts"},
                    "criterion": {"type": "string", "enum": list(CLASSIFY_CRITERIA), "default": "probability"},
                    "threshold": {"type": "number"},
                }
            ),
        },
    ),
    ("POST", "/v1/distribution", distribution, {"summary": "Text(s) -> their distribution on the sphere (mu, kappa)"}),
    (
        "GET", "/v1/thumbnails/{image_id:path}", thumbnail,
        {
            "summary": "The thumbnail of an image, by its id",
            "responses": {200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}},
            "response_class": Response,
        },
    ),
)  # fmt: skip
