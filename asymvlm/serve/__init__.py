"""asymvlm.serve: retrieval with uncertainty over HTTP (``pip install 'asymvlm[serve]'``).

* :mod:`asymvlm.serve.gallery` — a served image collection: embeddings, thumbnails, captions,
  opened read-only; :mod:`asymvlm.serve.indexing` builds one (``asymvlm-index build``);
* :mod:`asymvlm.serve.service` — the computations (text -> images, image -> captions, zero-shot,
  distributions) over batches of requests, without HTTP, answering with the types of
  :mod:`asymvlm.serve.schemas`; :mod:`asymvlm.serve.abstention` (when an answer abstains, the
  criteria generated from :data:`asymvlm.zeroshot.ABSTAIN_REGISTRY`) and
  :mod:`asymvlm.serve.words` (uncertainty in words);
* :mod:`asymvlm.serve.batching` — dynamic batching of concurrent requests;
* :mod:`asymvlm.serve.app` — ``create_app``, wiring the routes (:mod:`~asymvlm.serve.routes`), the
  error shape (:mod:`~asymvlm.serve.handlers`), the guard (:mod:`~asymvlm.serve.guard`: API key,
  limits, headers), the metrics (:mod:`~asymvlm.serve.metrics`) and the uploads
  (:mod:`~asymvlm.serve.uploads`) under a :class:`~asymvlm.serve.config.ServeConfig`;
* :mod:`asymvlm.serve.cli` — ``asymvlm-index`` and the serving half of ``asymvlm-serve``.

Importing ``asymvlm.serve`` imports neither FastAPI nor torch; its names load on first use.
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "Gallery": "asymvlm.serve.gallery",
    "build_gallery": "asymvlm.serve.indexing",
    "write_gallery": "asymvlm.serve.indexing",
    "load_image_collection": "asymvlm.serve.indexing",
    "RetrievalService": "asymvlm.serve.service",
    "TextQuery": "asymvlm.serve.service",
    "ImageQuery": "asymvlm.serve.service",
    "ClassifyQuery": "asymvlm.serve.service",
    "Abstention": "asymvlm.serve.abstention",
    "parse_abstention": "asymvlm.serve.abstention",
    "DynamicBatcher": "asymvlm.serve.batching",
    "ServeConfig": "asymvlm.serve.config",
    "create_app": "asymvlm.serve.app",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
