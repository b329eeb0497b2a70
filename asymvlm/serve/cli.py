"""``asymvlm-index`` (build a served gallery) and the serving half of ``asymvlm-serve``.

``asymvlm-serve``'s console entry point is :func:`asymvlm.training.serve.main`: its ``--demo``
knows where the demo writes its model (it never trains one: ``asymvlm-demo --serve`` does);
everything else (the parser, loading, running uvicorn) lives here, in the serving layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

from asymvlm.errors import ConfigError

__all__ = [
    "index_main",
    "build_serve_parser",
    "serve",
    "load_service",
    "app_from_environment",
    "slow_client_protocol",
    "uvicorn_options",
    "ENV_ARGS",
]

log = logging.getLogger("asymvlm.serve")
ENV_ARGS = "ASYMVLM_SERVE_ARGS"  # the parsed arguments, for uvicorn's worker processes (--workers > 1)

INDEX_EPILOG = """examples:
  asymvlm-index build --model runs/vmf/model --images imagefolder:/data/photos --out galleries/photos
  asymvlm-index build --model runs/vmf/model --images coco-karpathy:dataset_coco.json:/data/coco:test \\
      --out galleries/coco
  asymvlm-index build --model alice/asymvlm-vmf --images flickr30k:dataset_flickr30k.json:/data/flickr30k-images \\
      --out galleries/flickr --thumbnail_size 192
  asymvlm-index build --model demo-out/central-vmf/model --images shapeworld --num_images 1000 --out galleries/sw \\
      --thumbnail_format png
  asymvlm-index info galleries/coco

--images: imagefolder:<root> (a metadata.jsonl of captions, or just image files),
coco-karpathy:<json>:<root>[:split], coco2017:<json>:<dir>, flickr30k:<json>:<dir>[:split], shapeworld[:<version>]
"""

SERVE_EPILOG = """examples:
  asymvlm-serve --demo                                        # the demo's model and a ShapeWorld gallery
  asymvlm-demo --quick --serve --port 8000                    # train the demo's model if missing, then serve
  asymvlm-serve --model runs/vmf/model --index galleries/coco
  asymvlm-serve --model runs/vmf/model --index galleries/coco --api_key_file key.txt --host 0.0.0.0 --port 8080
  asymvlm-serve --model runs/vmf/model --index galleries/coco --abstain uncertainty:q90 --max_batch 128
  asymvlm-serve --model runs/vmf/model --index galleries/coco --abstain p_correct:0.7   # withhold below P(right) 0.7
  asymvlm-serve --model runs/vmf/model --index galleries/coco --workers 2

then:
  curl -s localhost:8000/v1/search/text -H 'content-type: application/json' -d '{"query": "a dog on a beach", "k": 5}'
  curl -s localhost:8000/v1/search/image/upload -F file=@photo.jpg -F k=5
  open http://localhost:8000/  (the web page)     http://localhost:8000/docs  (the API)

--abstain: auto (default: p_correct:0.5 when the service is calibrated, else none) | none |
p_correct:<calibrated P(the best image is right)> | uncertainty:<1/kappa> |
uncertainty:q<percentile of the gallery captions' uncertainties> | likelihood:<log q(x) of the best image>

Slow clients: a request head must arrive within --head_timeout_s (10 s) of the connection opening
or of the previous response (then the connection is closed), a body within --read_timeout_s (30 s,
then 408); idle keep-alive connections close after --timeout_keep_alive (5 s); at most
--limit_concurrency (1024) connections and requests at once (then 503). Headers over 16 KiB: 400.

A gallery must record the fingerprint of the model's encoder (asymvlm-index build does);
--allow_unverified_gallery serves one that records none, with a warning in the log.

/readyz: the port opens only once the model is loaded and warm, so /readyz answers 200 whenever it
answers (a refused connection means "not ready"); 503 only while shutting down.

P(right) is calibrated at start-up on the gallery's own captions (a gallery built by asymvlm-index
build records which images carry each caption; --calibration_captions caps how many are searched),
else taken from the model's own calibrator; without either, answers report their parts uncalibrated.
"""


# ----------------------------------------------------------------------------------------------
# asymvlm-index
# ----------------------------------------------------------------------------------------------
def _index_parser() -> argparse.ArgumentParser:
    from asymvlm.cli import make_parser

    p = make_parser("asymvlm-index", "asymvlm-index: build a gallery that asymvlm-serve searches.", INDEX_EPILOG)
    sub = p.add_subparsers(dest="command", required=True, parser_class=type(p))
    b = sub.add_parser("build", help="Embed an image collection into a gallery folder (atomically).",
                       formatter_class=p.formatter_class, epilog=INDEX_EPILOG, allow_abbrev=False)  # fmt: skip
    b.add_argument("--model", required=True, help="A saved AsymVLM (folder or Hub id) with its encoder.")
    b.add_argument("--images", required=True, help="The collection: a dataset spec (see below).")
    b.add_argument("--out", required=True, help="The gallery folder (built atomically; replaces an earlier gallery).")
    b.add_argument(
        "--num_images", type=int, default=None, help="Keep the first N images (ShapeWorld: generate N, 1000)."
    )
    b.add_argument("--seed", type=int, default=0, help="ShapeWorld's seed.")
    b.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="Storage of the embeddings.")
    b.add_argument("--thumbnail_size", type=int, default=256, help="Longest side of a thumbnail, in pixels.")
    b.add_argument("--thumbnail_format", choices=["jpeg", "png", "webp"], default="jpeg", help="Thumbnail encoding.")
    b.add_argument("--no_captions", action="store_true", help="No caption index (no image -> text search).")
    b.add_argument("--backend", choices=["exact", "faiss"], default="exact",
                   help="Top-k engine: exact chunked matmul, or FAISS (an exact flat index written too).")  # fmt: skip
    b.add_argument("--batch_size", type=int, default=64, help="Images per encoder forward.")
    b.add_argument("--device", default="cpu", help="Where the encoder runs (cpu, cuda, auto).")
    b.add_argument("--no_progress", action="store_true", help="No progress bars.")
    i = sub.add_parser("info", help="Print a gallery's gallery.json and sizes.", formatter_class=p.formatter_class)
    i.add_argument("path", help="A gallery folder.")
    return p


def index_main(argv: list[str] | None = None) -> int:
    """``asymvlm-index``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run("asymvlm-index", _index_main, argv)


def _index_main(argv: list[str]) -> int:
    args = _index_parser().parse_args(argv)
    from asymvlm.serve.gallery import Gallery

    if args.command == "info":
        g = Gallery.open(args.path)
        owners, truth = g.caption_owners is not None, g.caption_truth is not None
        print(
            json.dumps(
                {
                    **g.meta,
                    "images": len(g),
                    "captions": len(g.captions),
                    "caption_owners": owners,
                    "caption_truth": truth,
                },
                indent=2,
            )
        )
        return 0
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    from asymvlm.model import AsymVLM
    from asymvlm.serve.indexing import build_gallery, collection_truth, load_image_collection

    model = AsymVLM.from_pretrained(args.model, load_encoder=True, device=args.device)
    data = load_image_collection(args.images, num_images=args.num_images, seed=args.seed)
    truth, truth_label = collection_truth(args.images, num_images=args.num_images, seed=args.seed)
    g = build_gallery(
        model, data, args.out, source=args.images, dtype=args.dtype, thumbnail_size=args.thumbnail_size,
        thumbnail_format=args.thumbnail_format, captions=not args.no_captions, batch_size=args.batch_size,
        backend=args.backend, truth=truth, truth_label=truth_label,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"asymvlm-index: {len(g)} images, {len(g.captions)} captions -> {g.path}")
    return 0


# ----------------------------------------------------------------------------------------------
# asymvlm-serve
# ----------------------------------------------------------------------------------------------
def build_serve_parser() -> argparse.ArgumentParser:
    from asymvlm.cli import make_parser
    from asymvlm.serve.config import ServeConfig

    p = make_parser(
        "asymvlm-serve",
        "asymvlm-serve: retrieval with uncertainty over HTTP (JSON API and a web page).",
        SERVE_EPILOG,
    )
    p.add_argument("--model", default=None, help="A saved AsymVLM (folder or Hub id).")
    p.add_argument("--index", default=None, help="A gallery folder built by asymvlm-index build.")
    p.add_argument(
        "--demo", action="store_true",
        help="Serve the demo's model (asymvlm-demo writes it; asymvlm-demo --serve trains it if missing, then "
        "serves) and a ShapeWorld gallery (built if missing).",
    )  # fmt: skip
    p.add_argument("--demo_dir", default="demo-out", help="Where the demo's outputs are (asymvlm-demo --output_dir).")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (loopback by default).")
    p.add_argument("--port", type=int, default=8000, help="TCP port.")
    p.add_argument(
        "--workers", type=int, default=1, help="Server processes (each loads the model; the gallery is shared)."
    )
    p.add_argument("--api_key_file", default=None, help="A file holding the API key (>= 16 characters).")
    p.add_argument("--cors_origin", action="append", default=[], help="An origin allowed by CORS (repeatable).")
    p.add_argument(
        "--ssl_certfile", default=None, help="TLS: the server's certificate chain (PEM); with --ssl_keyfile."
    )
    p.add_argument("--ssl_keyfile", default=None, help="TLS: the server's private key (PEM).")
    p.add_argument("--abstain", default="auto", help="Default abstention of text queries (see below).")
    p.add_argument(
        "--calibration_captions", type=int, default=2000,
        help="Calibrate P(right) at start-up on at most this many of the gallery's captions (0: do not fit; "
        "the model's own calibrator, if any, is used).",
    )  # fmt: skip
    p.add_argument("--backend", choices=["auto", "exact", "faiss"], default="auto",
                   help="Top-k engine over the gallery (auto: the one the gallery was built for).")  # fmt: skip
    p.add_argument(
        "--scan_dtype", choices=["auto", "bfloat16", "int8", "float32"], default="auto",
        help="How the exact engine reads the gallery: a bf16 copy made at start-up, scanned with a certified "
        "bound and re-scored exactly (auto on a CPU); a per-row int8 copy (half the bytes: faster one query "
        "at a time, slower in batches); or float32 chunks (the exact single pass).",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="Where the model runs (cpu, cuda, auto).")
    p.add_argument(
        "--allow_unverified_gallery", action="store_true",
        help="Serve a gallery that records no encoder fingerprint (logged as unverified) instead of refusing it.",
    )  # fmt: skip
    p.add_argument("--timeout_keep_alive", type=int, default=5, help="Close idle keep-alive connections after it (s).")
    p.add_argument(
        "--head_timeout_s", type=float, default=10.0,
        help="Close a connection whose request head has not arrived within it (s; slow clients).",
    )  # fmt: skip
    p.add_argument(
        "--limit_concurrency", type=int, default=1024, help="Most connections and requests at once (then 503)."
    )
    p.add_argument("--log_file", default=None, help="Also append the access log to this file.")
    p.add_argument("--no_access_log", action="store_true", help="No per-request log lines.")
    for f in dataclasses.fields(ServeConfig):
        if f.name in ("api_key", "cors_origins"):
            continue
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    return p


def _read_api_key(path: str) -> str:
    p = Path(path)
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the key
        key = p.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise ConfigError(f"the API key file {p} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not key:
        raise ConfigError(f"the API key file {p} is empty")
    if any(not 33 <= ord(c) <= 126 for c in key):  # what an HTTP header carries as it is
        raise ConfigError(
            f"the API key in {p} must be one line of printable ASCII characters (no spaces or control characters)"
        )
    if len(key) < 16:
        raise ConfigError(f"the API key in {p} must have at least 16 characters (a shorter one is guessable)")
    mode = p.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("the API key file %s is readable by other users (chmod 600 it)", p)
    return key


def serve_config(args: argparse.Namespace) -> Any:
    from asymvlm.serve.config import ServeConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    values["api_key"] = _read_api_key(args.api_key_file) if args.api_key_file else None
    values["cors_origins"] = tuple(args.cors_origin)
    return ServeConfig(**values)


def load_service(args: argparse.Namespace) -> Any:
    """The :class:`~asymvlm.serve.service.RetrievalService` the arguments name."""
    from asymvlm.model import AsymVLM
    from asymvlm.serve.gallery import Gallery
    from asymvlm.serve.service import RetrievalService

    if not args.model or not args.index:
        raise ConfigError("give --model and --index (or --demo)")
    model = AsymVLM.from_pretrained(args.model, device=None if args.device == "cpu" else args.device)
    gallery = Gallery.open(
        args.index, backend=None if args.backend == "auto" else args.backend,
        scan_dtype=getattr(args, "scan_dtype", "auto"),
    )  # fmt: skip
    if gallery.index.backend == "exact":
        gallery.index.prepare()  # the scan copy now, not in the first request
    return RetrievalService(
        model, gallery, abstain=args.abstain, calibration_captions=getattr(args, "calibration_captions", 2000),
        allow_unverified_gallery=getattr(args, "allow_unverified_gallery", False),
    )  # fmt: skip


def app_from_environment() -> Any:
    """The app of a uvicorn worker process (``--workers > 1``): arguments from :data:`ENV_ARGS`."""
    from asymvlm.serve.app import create_app

    args = argparse.Namespace(**json.loads(os.environ[ENV_ARGS]))
    return create_app(load_service(args), serve_config(args))


def slow_client_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for the request head (:mod:`asymvlm.serve.protocol`)."""
    from asymvlm.serve.protocol import slow_client_protocol as make

    return make(head_timeout_s)


def uvicorn_options(args: argparse.Namespace, *, workers: int = 1) -> dict[str, Any]:
    """What ``asymvlm-serve`` passes to ``uvicorn.run`` against slow or too many clients (worker
    processes import the protocol by name; it reads ``--head_timeout_s`` from :data:`ENV_ARGS`)."""
    for name in ("timeout_keep_alive", "head_timeout_s", "limit_concurrency"):
        value = getattr(args, name)
        if not value > 0:
            raise ConfigError(f"--{name} must be > 0, got {value}")
    return dict(
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=16 * 1024,  # the longest request head (h11's default, said here)
        http=slow_client_protocol(args.head_timeout_s)
        if workers == 1
        else "asymvlm.serve.protocol:SlowClientH11Protocol",
    )


def _log_config(args: argparse.Namespace) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    if args.log_file:
        config["handlers"]["access_file"] = {
            "class": "logging.FileHandler",
            "filename": str(Path(args.log_file).resolve()),
            "formatter": "access",
        }
        config["loggers"]["uvicorn.access"]["handlers"].append("access_file")
    return config


def serve(args: argparse.Namespace) -> int:
    """Load, check and run the service with uvicorn (blocks until interrupted)."""
    import uvicorn

    from asymvlm.serve.app import create_app

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    config = serve_config(args)  # checks the limits and reads the key before anything heavy
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ConfigError("TLS needs both --ssl_certfile and --ssl_keyfile")
    for name in ("ssl_certfile", "ssl_keyfile"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_file():
            raise ConfigError(f"--{name}: no file at {getattr(args, name)}")
    common = dict(
        host=args.host, port=args.port, log_config=_log_config(args), access_log=not args.no_access_log,
        server_header=False, proxy_headers=False, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        **uvicorn_options(args, workers=args.workers),
    )  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        if config.api_key is None:
            log.warning("listening on %s without an API key: anyone who reaches this port can query it", args.host)
        elif args.ssl_certfile is None:
            log.warning("listening on %s without TLS: the API key crosses the network in clear text", args.host)
    if args.workers == 1:
        app = create_app(load_service(args), config)
        scheme = "https" if args.ssl_certfile else "http"
        print(f"asymvlm-serve: {scheme}://{args.host}:{args.port}/ (API: /docs)", file=sys.stderr, flush=True)
        uvicorn.run(app, **common)
        return 0
    load_service(args)  # fail here, once, with one line, rather than in every worker
    os.environ[ENV_ARGS] = json.dumps(vars(args))
    print(f"asymvlm-serve: http://{args.host}:{args.port}/ ({args.workers} workers)", file=sys.stderr, flush=True)
    uvicorn.run("asymvlm.serve.cli:app_from_environment", factory=True, workers=args.workers, **common)
    return 0
