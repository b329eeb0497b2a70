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

Hardening: every request body and upload is bounded (413 beyond the limit, before the app reads it);
every field is validated with a 4xx that names it (``{"error": {"status", "field", "message"}}``,
:mod:`asymvlm.serve.handlers`); with an API key, everything but ``/healthz`` and ``/readyz`` needs
it (``Authorization: Bearer <key>``, ``X-API-Key``, or HTTP Basic with the key as password — what
the page's browser prompt sends), compared in constant time; CORS is closed unless origins are
configured; thumbnails are looked up by id in memory, so no request reaches the filesystem.

Uploads: the header's width x height is checked before anything is decoded (413 beyond
``max_image_pixels``); a JPEG decodes at a reduced scale (``draft``) when it is larger than the
encoder needs; all uploads decoding at once share a budget of ``max_pixels_in_flight`` pixels
(:class:`~asymvlm.serve.uploads.PixelBudget`: a request waits for its share), so a burst of tiny
files that decode to huge images cannot take the server's memory. A body not received within
``read_timeout_s`` is a 408. JSON nested too deeply (a form field or a body) is a 4xx naming the
field. Nothing non-finite is served: a NaN in the model's outputs is a 500 with one logged line
(:class:`~asymvlm.serve.service.NonFiniteResult`), and every answer is checked once more, as a
whole, before it leaves (:func:`~asymvlm.serve.routes.check_finite_answer`). No answer names a
server path (:func:`~asymvlm.serve.service.public_spec`).

Readiness: under ``asymvlm-serve`` (uvicorn), the port opens only once the model is loaded and
warmed up, so ``/readyz`` answers 200 whenever it answers; a refused connection is "not ready".
It answers 503 while the app is shutting down, or served without its lifespan (in-process tests).

The app is wired here from its parts: the schemas (:mod:`asymvlm.serve.schemas`), the routes
(:mod:`asymvlm.serve.routes`), the error shape (:mod:`asymvlm.serve.handlers`), the guard
(:mod:`asymvlm.serve.guard`: key, limits, headers), the metrics (:mod:`asymvlm.serve.metrics`) and
the uploads (:mod:`asymvlm.serve.uploads`).
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI

from asymvlm.serve import guard
from asymvlm.serve.batching import DynamicBatcher
from asymvlm.serve.config import ServeConfig
from asymvlm.serve.handlers import EXCEPTION_HANDLERS
from asymvlm.serve.metrics import Metrics
from asymvlm.serve.routes import ROUTES, Served
from asymvlm.serve.service import ImageQuery, TextQuery
from asymvlm.serve.uploads import PixelBudget

__all__ = ["create_app"]

log = logging.getLogger("asymvlm.serve")


def create_app(service: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``service`` (a :class:`~asymvlm.serve.service.RetrievalService`).

    Example:
        >>> import tempfile, torch
        >>> from fastapi.testclient import TestClient
        >>> from asymvlm.heads import TextHead
        >>> from asymvlm.model import AsymVLM
        >>> from asymvlm.serve.indexing import write_gallery
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
    budget = PixelBudget(config.max_pixels_in_flight)  # shared by every upload handler
    batchers: dict[str, DynamicBatcher] = {}  # made at start-up, in the server's event loop
    metrics = Metrics(batchers, tuple(_WORK), len(service.gallery))
    served = Served(service, config, metrics, budget, batchers)
    app = FastAPI(
        title="asymvlm-serve",
        version=_version(),
        summary="Retrieval with uncertainty (AsymVLM): text -> images, image -> captions, zero-shot, distributions",
        docs_url=None,
        redoc_url=None,
        lifespan=lambda app: _lifespan(app, served),
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.ready = False
    app.state.served = served
    app.state.service, app.state.config = service, config
    app.state.pixel_budget, app.state.metrics = budget, metrics
    for method, path, endpoint, options in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], **options)
    guard.install(app, config, metrics)
    return app


# kind -> (the service's batch function, units of work of a request)
_WORK = {
    "search_text": (lambda service: service.search_text, lambda item: item.size),
    "search_image": (lambda service: service.search_image, lambda item: item.size),
    "classify": (lambda service: service.classify, lambda item: item.size),
    "distribution": (lambda service: service.distributions, len),
}


@asynccontextmanager
async def _lifespan(app: FastAPI, served: Served) -> AsyncIterator[None]:
    """Start-up: one model thread per app (a forward at a time, the event loop free meanwhile), a
    batcher per kind of request, one warm-up query of each kind; shutdown: the batchers closed."""
    config, service = served.config, served.service
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymvlm-model")
    for kind, (fn, cost) in _WORK.items():
        served.batchers[kind] = DynamicBatcher(
            fn(service), max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000, executor=executor,
            max_queue=config.max_queue, cost=cost, on_batch=served.metrics.on_batch(kind),
        )  # fmt: skip
    await asyncio.get_running_loop().run_in_executor(executor, _warm_up, service)
    app.state.ready = True
    log.info("ready: %d images, %d captions", len(service.gallery), len(service.gallery.captions))
    try:
        yield
    finally:
        app.state.ready = False
        for b in served.batchers.values():
            await b.close()
        served.batchers.clear()
        executor.shutdown(wait=False, cancel_futures=True)


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
