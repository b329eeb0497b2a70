"""asymvlm-serve under load: requests/s and p50/p99 latency with 1, 8 and 64 concurrent clients,
dynamic batching vs one request per forward, side by side; memory with a 1M-image gallery.

Two ``asymvlm-serve`` processes on loopback answer the same text -> image queries (k = 10,
distinct captions of the gallery, cycled) from the same model and gallery:

* ``batched`` — the defaults: concurrent requests share one encoder + head forward and one chunked
  top-k over the gallery (``--max_batch 64 --max_wait_ms 2``);
* ``naive`` — the baseline: the same server answering one request per forward
  (``--max_batch 1 --max_wait_ms 0``); with ``--baseline float32-scan`` instead the batched server
  reading the gallery as float32 chunks (``--scan_dtype float32``, the exact path before issue 30's
  certified bf16 scan), so the scan's gain is measured side by side.

Each level of concurrency runs both servers in turn (naive first, then batched), each bounded by a
request count and a time limit; only one server is under load at a time. Galleries: the demo's
1,000 ShapeWorld scenes (``asymvlm-serve --demo``'s model: the toy CLIP v3, d = 256), and 100k and
1M rows of random unit float16 embeddings standing in for a real collection of that size (same
model and queries; the work per query is the same as for real images). Memory: the server's
resident set (private, and file-backed pages of the memory-mapped gallery) after start-up and after
the load.

The load generator is hand-written on purpose: one asyncio thread holding keep-alive HTTP/1.1
connections spends a few microseconds per request, where httpx or aiohttp spend about a
millisecond — on 2 cores the client would otherwise take the CPU the server is measured on.

Run:  python bench/serve.py [--requests 2000] [--seconds 15] [--sizes 1000,100000,1000000] [--json PATH]
      (alone; builds the demo's model and gallery on first use, writes the synthetic galleries to a
      temporary folder; about 6 minutes)

Upload bombs (``--upload_bomb N``, alone, under a minute; issue 26): a tiny model and gallery (the
packaged tiny open_clip, random weights), then N concurrent uploads of a 1.8 kB G4 TIFF that decodes
to 39.7 Mpx (7300 x 5440, 1 bit per pixel), in ``--bursts`` bursts, against a server with the
defaults (``max_image_pixels`` 16 Mpx, refused from its header) and one with the previous limit
(``--max_image_pixels 40000000``; its decodes bounded by ``max_pixels_in_flight``); reports each
server's peak resident memory (VmHWM) and the answers' status codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import Results, format_value

REPO = Path(__file__).resolve().parents[1]
LEVELS = (1, 8, 64)
NAIVE = ["--max_batch", "1", "--max_wait_ms", "0"]
BASELINES = {  # --baseline: what the batched server is measured against
    "naive": NAIVE,  # one request per forward
    "float32-scan": ["--scan_dtype", "float32"],  # batched, the gallery scanned in float32 chunks (before issue 30)
}


# ----------------------------------------------------------------------------------------------
# the load generator
# ----------------------------------------------------------------------------------------------
async def _client(port: int, bodies: list[bytes], start: int, state: dict, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = start
    try:
        while state["left"] > 0 and time.perf_counter() < state["deadline"]:
            state["left"] -= 1
            body = bodies[i % len(bodies)]
            i += 1
            head = (
                b"POST /v1/search/text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            t = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            header = await reader.readuntil(b"\r\n\r\n")
            lines = header.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = next(
                int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length"
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
            if status != 200:
                state["errors"] += 1
    finally:
        writer.close()


async def _load(port: int, bodies: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    state = {"left": requests, "deadline": time.perf_counter() + seconds, "errors": 0}
    latencies: list[float] = []
    t = time.perf_counter()
    await asyncio.gather(*(_client(port, bodies, 997 * c, state, latencies) for c in range(clients)))
    elapsed = time.perf_counter() - t
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50": q(0.50),
        "p99": q(0.99),
        "errors": state["errors"],
    }


def load(port: int, bodies: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    asyncio.run(_load(port, bodies, clients, min(requests, 4 * clients), 30))  # warm-up: connections, caches
    return asyncio.run(_load(port, bodies, clients, requests, seconds))


# ----------------------------------------------------------------------------------------------
# servers and galleries
# ----------------------------------------------------------------------------------------------
def memory(pid: int) -> dict[str, float]:
    """The server's resident memory in MiB: private (anonymous) and file-backed (the mapped gallery)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def batch_sizes(url: str) -> float | None:
    """Mean queries per model call of the text searches (from the server's /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if fam.name == "asymvlm_batch_size":
            s = {
                x.name: x.value
                for x in fam.samples
                if x.labels.get("kind") == "search_text" and "_bucket" not in x.name
            }
            if s.get("asymvlm_batch_size_count"):
                return s["asymvlm_batch_size_sum"] / s["asymvlm_batch_size_count"]
    return None


def synthetic_gallery(path: Path, n: int, demo_gallery: Path) -> Path:
    """``n`` random unit float16 embeddings with the demo gallery's encoder and captions."""
    from asymvlm.serve.gallery import Gallery
    from asymvlm.serve.indexing import write_gallery

    demo = Gallery.open(demo_gallery)
    g = torch.Generator().manual_seed(n)
    chunks = []
    for s in range(0, n, 65536):
        x = torch.randn(min(65536, n - s), demo.dim, generator=g)
        chunks.append(torch.nn.functional.normalize(x, dim=-1).half())
    write_gallery(
        path,
        torch.cat(chunks),
        captions=demo.captions,
        caption_embeddings=demo.caption_embeddings,
        encoder=demo.meta["encoder"],
        source=f"random unit vectors ({n:,})",
    )
    return path


def run_gallery(name: str, model: Path, gallery: Path, bodies: list[bytes], args, results: Results, work: Path) -> dict:
    """Both servers on one gallery at every level of concurrency; returns the batched server's memory."""
    from asymvlm.testing import LoopbackServer

    common = ["--model", str(model), "--index", str(gallery), "--no_access_log"]
    size = json.loads((gallery / "gallery.json").read_text())["size"]
    with (
        LoopbackServer(common + BASELINES[args.baseline], work / f"{name}-naive") as naive,
        LoopbackServer(common, work / f"{name}-batched") as batched,
    ):
        idle = memory(batched.proc.pid)
        rows = {}
        for clients in args.levels:
            base = load(naive.port, bodies, clients, args.requests, args.seconds)
            ours = load(batched.port, bodies, clients, args.requests, args.seconds)
            rows[clients] = (ours, base)
            for label, o, b, unit, higher in (
                ("requests/s", ours["rps"], base["rps"], "req/s", True),
                ("p50 latency", 1e3 * ours["p50"], 1e3 * base["p50"], "ms", False),
                ("p99 latency", 1e3 * ours["p99"], 1e3 * base["p99"], "ms", False),
            ):
                results.add(
                    f"{name} ({size:,} images), {clients} clients: {label}",
                    o,
                    b,
                    unit,
                    higher_is_better=higher,
                    requests=f"{ours['requests']} / {base['requests']}",
                    errors=ours["errors"] + base["errors"],
                )
            print(
                f"{name:>16} c={clients:<3} batched {ours['rps']:8.1f} req/s p50 {1e3 * ours['p50']:8.1f} ms "
                f"p99 {1e3 * ours['p99']:8.1f} ms | {args.baseline} {base['rps']:8.1f} req/s "
                f"p50 {1e3 * base['p50']:8.1f} ms "
                f"p99 {1e3 * base['p99']:8.1f} ms | x{ours['rps'] / base['rps']:.2f}",
                flush=True,
            )
        loaded = memory(batched.proc.pid)
        mean_batch = batch_sizes(batched.url)
        top = max(args.levels)
        ours, base = rows[top]
        met = ours["rps"] >= 5 * base["rps"] and ours["p99"] < base["p99"]
        results.note(
            f"{name}: at {top} clients batched/{args.baseline} throughput {ours['rps'] / base['rps']:.2f}x, p99 "
            f"{1e3 * ours['p99']:.0f} vs {1e3 * base['p99']:.0f} ms — goal (>= 5x, p99 below the baseline's) "
            f"{'met' if met else 'NOT met'}; mean queries per forward (batched, all levels) "
            f"{mean_batch:.1f}; server RSS {idle.get('VmRSS', 0):.0f} MiB idle, {loaded.get('VmRSS', 0):.0f} MiB "
            f"after the load (private {loaded.get('RssAnon', 0):.0f}, file-backed: libraries and the mapped gallery "
            f"{loaded.get('RssFile', 0):.0f})"
        )
        return {
            **loaded,
            "size": size,
            "gallery_mib": (gallery / "images" / "index.safetensors").stat().st_size / 2**20,
        }


# ----------------------------------------------------------------------------------------------
# upload bombs: tiny files that decode to huge images
# ----------------------------------------------------------------------------------------------
def g4_tiff(width: int = 7300, height: int = 5440) -> bytes:
    """A bilevel TIFF (CCITT group 4) of one colour: a few kB that decode to ``width x height`` pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height), 1).save(buf, format="TIFF", compression="group4")
    return buf.getvalue()


def tiny_served_model(work: Path) -> tuple[Path, Path]:
    """``(model folder, gallery folder)``: the packaged tiny open_clip (seeded random weights, saved as a
    local folder) under a random head, and a gallery of 8 random images."""
    import numpy as np
    import open_clip
    from PIL import Image

    from asymvlm.encoders import PACKAGE_MODEL_CONFIGS, load_encoder, register_open_clip_configs, save_open_clip_dir
    from asymvlm.heads import TextHead
    from asymvlm.model import AsymVLM
    from asymvlm.serve.indexing import build_gallery

    register_open_clip_configs()
    torch.manual_seed(0)
    cfg = json.loads((PACKAGE_MODEL_CONFIGS / "asymvlm-tiny-vit.json").read_text())
    save_open_clip_dir(open_clip.create_model("asymvlm-tiny-vit"), cfg, work / "encoder")
    encoder = load_encoder(f"open_clip:local-dir:{work / 'encoder'}", device="cpu")
    model = AsymVLM(TextHead(dim=encoder.dim, hidden_dims=(16,)), encoder)
    model_dir = model.save_pretrained(work / "model")
    rng = np.random.default_rng(0)
    data = [
        {"image": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "captions": [f"image {i}"]}
        for i in range(8)
    ]
    gallery = build_gallery(model, data, work / "gallery", progress=False)
    return model_dir, gallery.path


def upload_bomb(args, results: Results) -> None:
    """``--upload_bomb N``: N concurrent tiny-but-huge uploads per burst; peak RSS of the server."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from asymvlm.testing import LoopbackServer

    bomb = g4_tiff()
    work = Path(tempfile.mkdtemp(prefix="asymvlm-serve-bomb-"))
    try:
        model, gallery = tiny_served_model(work)
        common = ["--model", str(model), "--index", str(gallery), "--no_access_log"]
        servers = {"defaults": [], "previous pixel limit (40 Mpx)": ["--max_image_pixels", "40000000"]}
        for name, extra in servers.items():
            with LoopbackServer(common + extra, work / name.split()[0]) as server:
                idle = memory(server.proc.pid)
                codes: dict[int, int] = {}

                def post(_: int) -> int:
                    files = {"file": ("bomb.tif", bomb, "image/tiff")}
                    url = server.url + "/v1/search/image/upload"
                    return httpx.post(url, files=files, data={"k": "1"}, timeout=120).status_code

                t = time.perf_counter()
                with ThreadPoolExecutor(args.upload_bomb) as pool:
                    for _ in range(args.bursts):
                        for code in pool.map(post, range(args.upload_bomb)):
                            codes[code] = codes.get(code, 0) + 1
                seconds = time.perf_counter() - t
                status = Path(f"/proc/{server.proc.pid}/status").read_text()
                peak = next(int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmHWM:"))
                after = memory(server.proc.pid)
            results.add(
                f"upload bomb, {name}: peak RSS over {args.bursts} bursts of {args.upload_bomb}", peak,
                idle.get("VmRSS", 0), "MiB", higher_is_better=False, better="smaller", worse="larger",
                codes=json.dumps(codes), after=round(after.get("VmRSS", 0)), seconds=round(seconds, 1),
            )  # fmt: skip
            print(
                f"{name:>30}: idle {idle.get('VmRSS', 0):.0f} MiB, peak {peak:.0f} MiB, after "
                f"{after.get('VmRSS', 0):.0f} MiB; answers {codes} in {seconds:.1f} s",
                flush=True,
            )
        results.note(
            f"Upload bombs: a {len(bomb):,}-byte G4 TIFF decoding to 7300 x 5440 = 39.7 Mpx, {args.upload_bomb} "
            f"concurrent uploads x {args.bursts} bursts; 'baseline' is the server's RSS before the bursts."
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="Most requests per run (each server, each level).")
    p.add_argument("--seconds", type=float, default=15.0, help="Most seconds per run.")
    p.add_argument("--sizes", default="1000,100000,1000000", help="Gallery sizes (1000 = the demo's ShapeWorld).")
    p.add_argument("--levels", default="1,8,64", help="Concurrent clients.")
    p.add_argument(
        "--baseline", choices=sorted(BASELINES), default="naive",
        help="The server the batched one is compared with: naive (one request per forward) or float32-scan "
        "(batched, the gallery scanned as float32 chunks: the exact path before the bf16 scan).",
    )  # fmt: skip
    p.add_argument("--demo_dir", default=str(REPO / "demo-out"), help="The demo's outputs (built if missing).")
    p.add_argument("--quick", action="store_true", help="The demo's smoke model when it has to be trained (tests).")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--upload_bomb", type=int, default=0,
        help="Only the upload-bomb section: this many concurrent tiny-but-huge uploads per burst.",
    )  # fmt: skip
    p.add_argument("--bursts", type=int, default=3, help="Bursts of --upload_bomb uploads.")
    args = p.parse_args(argv)
    if args.upload_bomb:
        results = Results("serve-upload-bomb", "asymvlm-serve under tiny uploads that decode to huge images")
        upload_bomb(args, results)
        results.write(args.json)
        return 0
    args.levels = [int(x) for x in args.levels.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    from asymvlm.serve.gallery import Gallery
    from asymvlm.training.demo import prepare_demo

    model, demo_gallery = prepare_demo(args.demo_dir, quick=args.quick, progress=False)
    captions = Gallery.open(demo_gallery).captions
    bodies = [json.dumps({"query": c, "k": 10}).encode() for c in captions]
    title = {"naive": "dynamic batching vs one request per forward", "float32-scan": "bf16 scan vs float32 chunks"}
    results = Results("serve", f"asymvlm-serve under load: {title[args.baseline]}")
    work = Path(tempfile.mkdtemp(prefix="asymvlm-serve-bench-"))
    try:
        mem = {}
        for n in sizes:
            if n == 1000:
                mem[n] = run_gallery("shapeworld-1k", model, demo_gallery, bodies, args, results, work)
                continue
            t = time.perf_counter()
            label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
            gallery = synthetic_gallery(work / f"gallery-{n}", n, demo_gallery)
            print(f"wrote a {n:,}-row gallery in {time.perf_counter() - t:.0f} s", flush=True)
            mem[n] = run_gallery(f"synthetic-{label}", model, gallery, bodies, args, results, work)
            shutil.rmtree(gallery)
        small, large = min(mem), max(mem)
        if large > small:  # what a gallery costs in private memory: the largest against the smallest
            results.add(
                f"server private memory (RssAnon) after the load: {large:,} vs {small:,} images", mem[large]["RssAnon"],
                mem[small]["RssAnon"], "MiB", higher_is_better=False, better="smaller", worse="larger",
                gallery_mib=mem[large]["gallery_mib"], rss_file=mem[large]["RssFile"],
            )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.note(
        f"Text -> image, k = 10, {len(bodies)} distinct captions cycled; each run at most {args.requests} requests "
        f"and {args.seconds:.0f} s after a warm-up; the load generator runs in this process (one asyncio thread), "
        "the servers in their own, on the same 2 cores."
    )
    print()
    for row in results.rows:
        ours, base = format_value(row["ours"], row["unit"]), format_value(row["baseline"], row["unit"])
        print(f"{row['case']:<70} {ours:>14} {base:>14}")
    for n in results.notes:
        print("note:", n)
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
