"""The package against this machine's physical limits, measured in the same run (issue 30).

First the floors, measured here and now: read bandwidth (a 2 GiB float32 reduction, the best of
torch and NumPy), float32 and bfloat16 GEMM (4096^3 ``torch.mm``, best of 3). Then each figure of
the package with "x of floor" (1.00x: at the limit):

* **retrieval**: one text query over N x d (default 1M x 512) float16 embeddings, memory-mapped
  from disk as ``ImageIndex.load`` serves them, with the retrieval distribution (the default) and
  without; the floor is reading the scanned copy once (N d 2 bytes / bandwidth). Then 256 queries
  in one call; the floor is the bf16 GEMM (2 Q N d flops / bf16 rate). Each beside the float32
  path (``scan_dtype="float32"``, the exact path before the bf16 scan), the int8 scan (one query)
  and FAISS's exact flat index where installed, with the ids checked equal;
* **the exact vMF normaliser** beside the approximation (Scott 2021) at d = 256, 512, 1024:
  forward + backward on 65,536 float32 concentrations and forward on 1M; the goal is <= 3x the
  approximation;
* **the exclude-mode InfoNCE** forward + backward at B = 256, 1024, 2048: at the positive pairs
  (now) against the whole (B, B) matrix (before);
* **head training** (the paper's 512-1024-1024-1024-512 head, symmetric InfoNCE, AdamW) on
  prebuilt batches: samples/s against the FLOP floor of the same step at the float32 and the
  bfloat16 GEMM rates (``bench/train_throughput.py`` has the training loop's own figures).

Goals (issue 30): one query within 1.5x of the bandwidth floor; batched within 2x of the GEMM
floor; training >= 50% of the float32 floor and >= 30% of the bf16 floor; the normaliser <= 3x the
approximation. Run alone: the machine has 2 cores, and anything else running moves every figure.

Run:  python bench/limits.py [--quick] [--n 1000000] [--d 512] [--json PATH]
      [--only floors,retrieval,special,loss,train]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import Results, best_seconds
from train_throughput import gemm_floor, head_train_flops, make_cache, run_loop

SECTIONS = ("floors", "retrieval", "special", "loss", "train")


# ----------------------------------------------------------------------------------------------
# floors
# ----------------------------------------------------------------------------------------------
def bandwidth(gib: float = 2.0) -> float:
    """Read bandwidth in bytes/s: a float32 reduction over ``gib`` GiB (best of torch and NumPy)."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()  # pages in
    t = min(best_seconds(lambda: x.sum(), 3), best_seconds(lambda: np.add.reduce(x.numpy()), 3))
    return x.numel() * 4 / t


def floors(results: Results, quick: bool) -> dict[str, float]:
    f = {
        "bandwidth": bandwidth(0.5 if quick else 2.0),
        "fp32": gemm_floor(torch.float32, 2048 if quick else 4096),
        "bf16": gemm_floor(torch.bfloat16, 2048 if quick else 4096),
    }
    results.add("floor: read bandwidth", f["bandwidth"] / 1e9, None, "GB/s", higher_is_better=True)
    results.add("floor: float32 GEMM", f["fp32"] / 1e9, None, "GFLOP/s", higher_is_better=True)
    results.add("floor: bfloat16 GEMM", f["bf16"] / 1e9, None, "GFLOP/s", higher_is_better=True)
    print(
        f"floors: {f['bandwidth'] / 1e9:.1f} GB/s read, {f['fp32'] / 1e9:.0f} GFLOP/s fp32, "
        f"{f['bf16'] / 1e9:.0f} GFLOP/s bf16",
        flush=True,
    )
    return f


def _floor_row(results: Results, case: str, seconds: float, floor_s: float, unit_scale=1e3, unit="ms", **extra):
    """A row whose baseline is the floor: ratio = floor / ours (1: at the limit)."""
    results.add(
        case, seconds * unit_scale, floor_s * unit_scale, unit, higher_is_better=False,
        better="of the floor's time", worse="the floor's time", x_of_floor=seconds / floor_s, **extra,
    )  # fmt: skip
    print(f"{case}: {seconds * unit_scale:.2f} {unit}, floor {floor_s * unit_scale:.2f} {unit}: "
          f"{seconds / floor_s:.2f}x of floor", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------
def _gallery(folder: Path, n: int, d: int) -> None:
    from asymvlm.retrieval import ImageIndex

    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(1000, d, generator=g), dim=1)
    parts = []
    for s in range(0, n, 1 << 16):  # clustered, as real embeddings are: queries have close neighbours
        m = min(1 << 16, n - s)
        x = centers[torch.randint(0, 1000, (m,), generator=g)] + 3.0 * torch.randn(m, d, generator=g) / math.sqrt(d)
        parts.append(torch.nn.functional.normalize(x, dim=1).half())
    ImageIndex(torch.cat(parts), validate=False).save(folder)


def _queries(q: int, d: int, seed: int):
    from asymvlm.distributions import VonMisesFisher

    g = torch.Generator().manual_seed(seed)
    loc = torch.nn.functional.normalize(torch.randn(q, d, generator=g), dim=1)
    return VonMisesFisher(loc, torch.full((q,), 50.0))


def retrieval(results: Results, f: dict[str, float], n: int, d: int, quick: bool) -> None:
    from asymvlm.retrieval import ImageIndex

    with tempfile.TemporaryDirectory(prefix="asymvlm-limits-") as tmp:
        _gallery(Path(tmp), n, d)
        scan = ImageIndex.load(tmp, chunk_size=65536)
        t = time.perf_counter()
        scan.prepare()
        prep = time.perf_counter() - t
        plain = ImageIndex.load(tmp, chunk_size=65536, scan_dtype="float32")
        small = ImageIndex.load(tmp, chunk_size=65536, scan_dtype="int8")
        t = time.perf_counter()
        small.prepare()
        results.note(f"retrieval: the int8 copy took {time.perf_counter() - t:.2f} s (once, at load)")
        results.note(f"retrieval: the bf16 copy of the {n:,} x {d} float16 gallery took {prep:.2f} s (once, at load)")
        read_floor = n * d * 2 / f["bandwidth"]
        one = _queries(1, d, 1)
        paths = {"bf16 scan": (scan, 5), "float32 path": (plain, 3), "int8 scan": (small, 5)}
        _search_rows(results, f"one query, {n:,} x {d}", one, read_floor, paths)
        batch = _queries(64 if quick else 256, d, 2)
        nq = batch.batch_shape[0]
        gemm_floor = 2 * nq * n * d / f["bf16"]
        paths = {"bf16 scan": (scan, 2), "float32 path": (plain, 1)}
        a, b = _search_rows(results, f"{nq} queries, {n:,} x {d}", batch, gemm_floor, paths)
        dz, de = (a.log_partition - b.log_partition).abs().max(), (a.entropy - b.entropy).abs().max()
        results.note(
            f"retrieval: the bf16 scan's distribution against the float32 path's ({nq} queries, kappa 50): "
            f"max |log Z| difference {float(dz):.1e}, entropy {float(de):.1e} nats, "
            f"hit probability {float((a.posterior - b.posterior).abs().max()):.1e}"
        )
        _faiss_rows(results, scan, one, batch, read_floor, gemm_floor)


def _search_rows(results: Results, label: str, queries, floor: float, paths: dict) -> tuple:
    """One row per path (name -> (index, repeats)) with and without the retrieval distribution, each
    against ``floor``, the scans' ids checked against the float32 path's; returns the bf16 scan's
    and the float32 path's results with the distribution."""
    with_distribution = None
    for posterior in (True, False):
        tag = "with the retrieval distribution" if posterior else "top-k only"
        ref = paths["float32 path"][0].search(queries, k=10, posterior=posterior)
        for name, (index, repeats) in paths.items():
            got = index.search(queries, k=10, posterior=posterior)
            t = best_seconds(lambda i=index, p=posterior: i.search(queries, k=10, posterior=p), repeats)
            same = {} if name == "float32 path" else {"same_ids": bool(torch.equal(got.indices, ref.indices))}
            _floor_row(results, f"{label}, {name}, {tag}", t, floor, **same)
            if posterior and name == "bf16 scan":
                with_distribution = (got, ref)
    return with_distribution


def _faiss_rows(results, scan, one, batch, read_floor, gemm_floor) -> None:
    try:
        import faiss  # noqa: F401
    except ImportError:
        results.note("retrieval: FAISS not installed (pip install 'asymvlm[faiss]'): no FAISS rows")
        return
    from asymvlm.retrieval import ImageIndex

    fx = ImageIndex(scan.embeddings, backend="faiss", validate=False, chunk_size=65536)
    fx.search(one, k=10, posterior=False)  # builds the flat float32 index (2x the bytes)
    for q, floor, label in ((one, read_floor, "one query"), (batch, gemm_floor, f"{batch.batch_shape[0]} queries")):
        same = bool(
            torch.equal(fx.search(q, k=10, posterior=False).indices, scan.search(q, k=10, posterior=False).indices)
        )
        t = best_seconds(lambda q=q: fx.search(q, k=10, posterior=False), 2)
        _floor_row(results, f"{label}, FAISS IndexFlatIP (float32), top-k only", t, floor, same_ids=same)


# ----------------------------------------------------------------------------------------------
# the exact normaliser
# ----------------------------------------------------------------------------------------------
def special(results: Results, quick: bool) -> None:
    from asymvlm.special import vmf_log_normalizer, vmf_log_normalizer_approx

    g = torch.Generator().manual_seed(0)
    for d in (256, 512, 1024):
        for n, backward in ((65536, True), (100_000 if quick else 1_000_000, False)):
            kappa = torch.rand(n, generator=g) * 1000.0 + 1e-3

            def run(fn, kappa=kappa, backward=backward, d=d):
                k = kappa.clone().requires_grad_(backward)
                out = fn(d, k)
                if backward:
                    out.sum().backward()

            t_exact = best_seconds(lambda: run(vmf_log_normalizer), 5)
            t_approx = best_seconds(lambda: run(vmf_log_normalizer_approx), 5)
            case = (
                f"vMF log-normaliser d={d}, {n:,} float32 kappas, {'fwd+bwd' if backward else 'fwd'}: exact vs approx"
            )
            results.add(
                case, t_exact * 1e3, t_approx * 1e3, "ms", higher_is_better=False, x_of_approx=t_exact / t_approx
            )
            print(f"{case}: {t_exact * 1e3:.2f} vs {t_approx * 1e3:.2f} ms ({t_exact / t_approx:.2f}x)", flush=True)


# ----------------------------------------------------------------------------------------------
# head training
# ----------------------------------------------------------------------------------------------
def train(results: Results, f: dict[str, float], quick: bool) -> None:
    """``asymvlm.training.loop.train`` itself (AdamW, its default fused kernel; bf16: the head's MLP
    under autocast, the loss in float32) on a synthetic cache, samples/s from its log."""
    from asymvlm.heads import HeadConfig

    head = HeadConfig(dim=512)  # the paper's 512-1024-1024-1024-512 head
    with tempfile.TemporaryDirectory(prefix="asymvlm-limits-train-") as tmp:
        work = Path(tmp)
        make_cache(work / "cache", 4000 if quick else 20000, 512)
        for batch in (256,) if quick else (256, 1024, 2048):
            for precision, rate in (("no", "fp32"), ("bf16", "bf16")):
                steps = 3 if quick else 12
                speed, _ = run_loop(work, f"run-{batch}-{precision}", steps, batch, mixed_precision=precision)
                floor = f[rate] / head_train_flops(head, batch)  # samples/s at the GEMM rate
                name = "float32" if precision == "no" else "bf16"
                case = f"head training (asymvlm-train loop), B={batch}, {name}, against the {rate} floor"
                results.add(case, speed, floor, "samples/s", higher_is_better=True, better="of the floor",
                            worse="of the floor", fraction_of_floor=speed / floor)  # fmt: skip
                print(f"{case}: {speed:,.0f} samples/s, floor {floor:,.0f}: {speed / floor:.2f} of it", flush=True)


def _whole_matrix_exclude(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The exclude-mode InfoNCE as it was before issue 30: softplus over every (T, I) entry (baseline)."""
    halves = []
    for zz, pp in ((z, pos), (z.T, pos.T)):
        neg = torch.logsumexp(zz.masked_fill(pp, torch.finfo(zz.dtype).min), dim=1, keepdim=True)
        neg = torch.where((~pp).any(dim=1, keepdim=True), neg, torch.full_like(neg, -math.inf))
        per = (torch.nn.functional.softplus(neg - zz) * pp).sum(1) / pp.sum(1).clamp_min(1)
        halves.append(per[pp.any(dim=1)].mean())
    return 0.5 * (halves[0] + halves[1])


def loss(results: Results, quick: bool) -> None:
    """The exclude-mode InfoNCE's forward + backward: at the positives only (now) vs the whole matrix."""
    from asymvlm.losses import symmetric_infonce

    g = torch.Generator().manual_seed(0)
    for batch in (256, 1024) if quick else (256, 1024, 2048):
        z = torch.randn(batch, batch, generator=g).requires_grad_()
        ids = torch.randint(0, batch * 4 // 5, (batch,), generator=g)  # some images with several captions
        pos = ids.unsqueeze(1) == ids.unsqueeze(0)

        def run(fn, z=z, pos=pos):
            z.grad = None
            fn(z, pos).backward()

        ours, base = (
            best_seconds(lambda: run(symmetric_infonce), 5),
            best_seconds(lambda: run(_whole_matrix_exclude), 5),
        )
        case = f"exclude-mode InfoNCE fwd+bwd, B={batch}, float32: at the positives vs the whole matrix"
        results.add(case, ours * 1e3, base * 1e3, "ms", higher_is_better=False)
        print(f"{case}: {ours * 1e3:.2f} vs {base * 1e3:.2f} ms ({base / ours:.2f}x)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Small sizes (tests): 100k x 64 gallery, fewer repeats.")
    p.add_argument("--n", type=int, default=None, help="Gallery rows (default 1,000,000; quick 100,000).")
    p.add_argument("--d", type=int, default=None, help="Embedding dimension (default 512; quick 64).")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"Comma-separated sections of {SECTIONS}.")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    only = args.only.split(",")
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    n = args.n or (100_000 if args.quick else 1_000_000)
    d = args.d or (64 if args.quick else 512)
    results = Results("limits", "The package against this machine's floors (bandwidth, float32 and bf16 GEMM)")
    f = floors(results, args.quick)
    if "retrieval" in only:
        retrieval(results, f, n, d, args.quick)
    if "special" in only:
        special(results, args.quick)
    if "loss" in only:
        loss(results, args.quick)
    if "train" in only:
        train(results, f, args.quick)
    results.note(f"torch threads {torch.get_num_threads()}; floors measured in this run, before the rows.")
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
