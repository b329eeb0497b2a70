"""asymvlm.serve: retrieval with uncertainty over HTTP (``pip install 'asymvlm[serve]'``).

* :mod:`asymvlm.serve.gallery` — a served image collection: embeddings, thumbnails, captions
  (``asymvlm-index build``), opened read-only;
* :mod:`asymvlm.serve.service` — the computations (text -> images, image -> captions, zero-shot,
  distributions) over batches of requests, without HTTP;
* :mod:`asymvlm.serve.batching` — dynamic batching of concurrent requests;
* :mod:`asymvlm.serve.app` — the FastAPI app (endpoints, limits, API key, metrics, the web page);
* :mod:`asymvlm.serve.cli` — ``asymvlm-serve`` and ``asymvlm-index``.

Importing ``asymvlm.serve`` imports neither FastAPI nor torch; its names load on first use.
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "Gallery": "asymvlm.serve.gallery",
    "build_gallery": "asymvlm.serve.gallery",
    "write_gallery": "asymvlm.serve.gallery",
    "load_image_collection": "asymvlm.serve.gallery",
    "RetrievalService": "asymvlm.serve.service",
    "Abstention": "asymvlm.serve.service",
    "TextQuery": "asymvlm.serve.service",
    "ImageQuery": "asymvlm.serve.service",
    "ClassifyQuery": "asymvlm.serve.service",
    "parse_abstention": "asymvlm.serve.service",
    "DynamicBatcher": "asymvlm.serve.batching",
    "ServeConfig": "asymvlm.serve.app",
    "create_app": "asymvlm.serve.app",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
