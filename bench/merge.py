"""Merging 8 task vectors shaped like the CLIP ViT-B/32 visual tower (~88M parameters each).

The task vectors (and a base) are generated deterministically and written as safetensors; each
method then runs in its own subprocess of this run (so peak RSS is the method's own), reading
the inputs from disk. One row per ``--methods`` entry, asymvlm against a reference:

* ``task_arithmetic``: asymvlm ``merge_files`` (streaming), no baseline;
* ``ties_global``: asymvlm TIES, global top-k (the paper's; exact radix-selected thresholds,
  streaming) vs the naive reference of the published algorithm: flatten all task vectors into a
  [K, P] matrix, per-task ``kthvalue``, sign of the sum, disjoint mean (its failure is reported if
  it runs out of memory);
* ``ties_per_tensor``: asymvlm TIES, per-tensor top-k (peft's convention) vs peft's ``ties`` per
  tensor (``peft.utils.merge_utils.ties`` over the K copies of each tensor);
* ``iso_c``, ``iso_cts`` (``common=0.8``), ``tsv_m``: asymvlm's spectral merges (``merge_files``,
  one key of all tasks resident) vs the authors' algorithms transcribed in ``merge_naive.py`` (all
  task vectors loaded, float32 SVDs key by key);
* ``fisher``: asymvlm ``merge_files(..., "fisher")`` on the task vectors wrapped by ``with_fisher`` (one
  key of every task vector and Fisher resident; floor 1e-6) vs the published formula with the
  authors' floor (``merge_naive.naive_fisher``: all task vectors and Fishers loaded). The Fishers are
  deterministic, ``(1e-3 N(0, 1))^2 + 1e-13``, with 1% of the coordinates below the floor in every
  task (there the floor decides the merge);
* ``lines``: asymvlm ``merge_files(..., "task_arithmetic", lines=0.5)`` (LiNeS, streamed) vs the
  authors' ``LiNeS_scaling`` after the sum (``merge_naive.naive_lines``: all loaded);
* ``knots``, ``core_space``: asymvlm ``merge_lora_adapters(..., inner="ties", output="svd")`` (rank
  ``sum r_t``: exact) on T rank-16 LoRA adapters of the tower's attention/MLP linears vs the authors'
  algorithms (``merge_lora.py``: KnOTS with the dense SVD of ``[dW_1, ..., dW_T]``; Core Space with
  its SVDs of the stacked factors), compared on the merged dense ``dW`` of every layer.

Prints wall time and peak RSS per method and the ratios asymvlm/naive side by side; checks that
global TIES equals the naive reference and per-tensor TIES equals peft's (max abs difference), and
that every other merge equals its reference within ``TOLERANCE[row]`` of the tensor's (layer's)
largest merged value (float32 SVDs of the same matrix differ in the last bits, amplified by the
matrix's conditioning; singular vectors' signs are arbitrary, but the products U V^T that the merges
are made of are unique when singular values are distinct). A mismatch makes the exit code 1.

In ``--quick`` mode the tower is shrunk (width 128, 2 layers, 4 tasks, LoRA rank 4) so the run
takes seconds.

Run:  python bench/merge.py [--tasks 8] [--methods iso_c tsv_m] [--workdir DIR] [--keep] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import Results, format_ratio
from merge_lora import lora_layer_shapes, lora_relative_difference, prepare_adapters
from safetensors.torch import load_file, save_file

# row -> (asymvlm's method, the reference it is checked against or None, the row's label)
ROWS: dict[str, tuple[str, str | None, str]] = {
    "task_arithmetic": ("task_arithmetic", None, "task arithmetic: asymvlm merge_files (streaming), no baseline"),
    "ties_global": (
        "ties_global",
        "naive_global",
        "TIES global top-k: asymvlm streaming vs naive [K, P] flatten (paper)",
    ),
    "ties_per_tensor": (
        "ties_per_tensor",
        "peft_ties",
        "TIES per-tensor top-k: asymvlm streaming vs peft merge_utils.ties",
    ),
    "iso_c": ("iso_c", "naive_iso_c", "Iso-C: asymvlm merge_files (one key resident) vs the authors' (all loaded)"),
    "iso_cts": (
        "iso_cts",
        "naive_iso_cts",
        "Iso-CTS common=0.8: asymvlm merge_files (one key resident) vs the authors' (all loaded)",
    ),
    "tsv_m": ("tsv_m", "naive_tsv_m", "TSV-M: asymvlm merge_files (one key resident) vs the authors' (all loaded)"),
    "fisher": (
        "fisher",
        "naive_fisher",
        "Fisher merging (floor 1e-6): asymvlm merge_files + with_fisher (streamed) vs the published formula "
        "(all loaded)",
    ),
    "lines": (
        "lines",
        "naive_lines",
        "LiNeS beta 0.5 after task arithmetic: asymvlm merge_files (streamed) vs the authors' LiNeS_scaling "
        "(all loaded)",
    ),
    "knots": (
        "knots",
        "naive_knots",
        "KnOTS-TIES on LoRA adapters: asymvlm (factored SVD) vs the authors' dense SVD of [dW_1..dW_T]",
    ),
    "core_space": (
        "core_space",
        "naive_core_space",
        "Core Space-TIES on LoRA adapters: asymvlm vs the authors' get_core_matrices + per-layer TIES",
    ),
}
SPECTRAL = ("iso_c", "iso_cts", "tsv_m")
LORA_ROWS = ("knots", "core_space")
FISHER_FLOOR, LINES_BETA = 1e-6, 0.5
ISO_CTS_COMMON = 0.8
# max |asymvlm - naive| / max |naive merged delta| per tensor: float32 SVDs (eps 6e-8) of the same matrix
# computed in a different order agree to ~eps * condition; the square matrices' polar factors have
# conditions in the thousands (s_max / s_min of a square Gaussian matrix ~ 4n)
SPECTRAL_RTOL = 1e-3
# fisher / lines: both compute in float64 and store base + delta in float32 (one ulp of the base
# ~ 2e-9, the merged deltas ~ 1e-3); LoRA rows: both float64, ours written as float32 factors of rank
# sum r_t (rounding ~ 1e-7 of the layer's largest entry)
TOLERANCE = {**dict.fromkeys(SPECTRAL, SPECTRAL_RTOL), "fisher": 1e-5, "lines": 1e-5, "knots": 1e-4, "core_space": 1e-4}


def vit_b32_visual_shapes(width: int = 768, layers: int = 12) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of open_clip's ViT-B/32 visual tower (or a narrower/shallower one)."""
    mlp, patches = 4 * width, 50
    shapes = {
        "conv1.weight": (width, 3, 32, 32),
        "class_embedding": (width,),
        "positional_embedding": (patches, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (width,),
                p + "ln_1.bias": (width,),
                p + "attn.in_proj_weight": (3 * width, width),
                p + "attn.in_proj_bias": (3 * width,),
                p + "attn.out_proj.weight": (width, width),
                p + "attn.out_proj.bias": (width,),
                p + "ln_2.weight": (width,),
                p + "ln_2.bias": (width,),
                p + "mlp.c_fc.weight": (mlp, width),
                p + "mlp.c_fc.bias": (mlp,),
                p + "mlp.c_proj.weight": (width, mlp),
                p + "mlp.c_proj.bias": (width,),
            }
        )
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, 512)})
    return shapes


def prepare(work: Path, tasks: int, width: int = 768, layers: int = 12) -> None:
    shapes = vit_b32_visual_shapes(width, layers)
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, work / "base.safetensors")
    for t in range(tasks):
        d = work / f"tv{t}"
        d.mkdir(exist_ok=True)
        save_file({k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}, d / "task_vector.safetensors")
        (d / "task_vector.json").write_text(
            json.dumps({"type": "asymvlm.task_vector", "format_version": 1, "base_fingerprint": "bench"})
        )


def prepare_fishers(work: Path, tasks: int, width: int = 768, layers: int = 12) -> None:
    """``work/tv{t}/fisher.safetensors``: a deterministic positive diagonal Fisher per task vector,
    ``(1e-3 N(0, 1))^2 + 1e-13``, except on 1% of the coordinates (the same in every task) where it
    is ``(t + 1) 1e-13``: every task's Fisher is below ``floor * mean`` (~1e-12) there, so the floor
    decides the merge (equal weights instead of 1 : 2 : ...) on them."""
    shapes = vit_b32_visual_shapes(width, layers)
    g, gm = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    low = {k: torch.rand(s, generator=gm) < 0.01 for k, s in shapes.items()}
    for t in range(tasks):
        fisher = {
            k: torch.where(low[k], (t + 1) * 1e-13, (torch.randn(s, generator=g) * 1e-3).square() + 1e-13)
            for k, s in shapes.items()
        }
        save_file(fisher, work / f"tv{t}" / "fisher.safetensors")


def _run_added(method: str, work: Path, vecs: list[Path], out: Path, density: float, layers: int) -> bool:
    """The fisher / lines / knots / core_space rows and their references; False if ``method`` is none."""
    files = [v / "task_vector.safetensors" for v in vecs]
    adapters = [work / f"lora{t}" for t in range(len(vecs))]
    if method == "fisher":
        from asymvlm.merging.fisher import with_fisher
        from asymvlm.merging.methods import merge_files
        from asymvlm.merging.task_vectors import LazyTaskVector

        wrapped = [with_fisher(LazyTaskVector(v), LazyTaskVector(v / "fisher.safetensors")) for v in vecs]
        merge_files(work / "base.safetensors", wrapped, out, "fisher", lam=1.0, floor=FISHER_FLOOR)
    elif method == "lines":
        from asymvlm.merging.methods import merge_files

        merge_files(work / "base.safetensors", vecs, out, "task_arithmetic", lam=1.0, lines=LINES_BETA)
    elif method in ("naive_fisher", "naive_lines"):
        from merge_naive import run_naive

        if method == "naive_lines":
            run_naive("lines", work / "base.safetensors", files, out, beta=LINES_BETA, num_blocks=layers)
            return True
        fishers = [v / "fisher.safetensors" for v in vecs]
        run_naive("fisher", work / "base.safetensors", files, out, fisher_files=fishers, floor=FISHER_FLOOR)
    elif method in LORA_ROWS:
        from asymvlm.merging.lora import merge_lora_adapters

        merge_lora_adapters(adapters, work / f"out-{method}", method, inner="ties", density=density, output="svd")
    elif method.startswith("naive_") and method[len("naive_") :] in LORA_ROWS:
        from merge_lora import run_naive_lora

        run_naive_lora(method[len("naive_") :], adapters, out, density)
    else:
        return False
    return True


def run_method(method: str, work: Path, tasks: int, density: float, width: int = 768, layers: int = 12) -> dict:
    vecs = [work / f"tv{t}" for t in range(tasks)]
    out = work / f"out-{method}.safetensors"
    start = time.perf_counter()
    if _run_added(method, work, vecs, out, density, layers):
        pass
    elif method in ("task_arithmetic", "ties_global", "ties_per_tensor", *SPECTRAL):
        from asymvlm.merging.methods import merge_files

        name = "ties" if method.startswith("ties_") else method
        opts: dict = {}
        if name == "ties":
            opts = {"density": density, "scope": "global" if method == "ties_global" else "per_tensor"}
        if method == "ties_per_tensor":  # peft's conventions
            opts.update(sign_weighted=False, normalize="count", zero_sign="positive")
        if method == "iso_cts":
            opts["common"] = ISO_CTS_COMMON
        merge_files(work / "base.safetensors", vecs, out, name, lam=1.0, **opts)
    elif method.startswith("naive_") and method[len("naive_") :] in SPECTRAL:
        from merge_naive import run_naive

        files = [v / "task_vector.safetensors" for v in vecs]
        run_naive(method[len("naive_") :], work / "base.safetensors", files, out)
    elif method == "peft_ties":
        from peft.utils.merge_utils import ties
        from safetensors import safe_open

        from asymvlm.merging.task_vectors import LazyTaskVector

        base = LazyTaskVector(work / "base.safetensors")
        merged = {}
        handles = [safe_open(str(v / "task_vector.safetensors"), framework="pt") for v in vecs]
        w = torch.ones(tasks)
        for k in base:
            merged[k] = base[k] + ties([h.get_tensor(k) for h in handles], w, density=density)
        save_file(merged, out)
    elif method == "naive_global":
        naive_global_ties(work, vecs, out, density, list(vit_b32_visual_shapes(width, layers)))
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"method": method, "seconds": seconds, "peak_mib": peak_mib}


def naive_global_ties(work: Path, vecs: list[Path], out: Path, density: float, keys: list[str]) -> None:
    """The published TIES, as its code runs it: all task vectors flattened into one [K, P] matrix."""
    flat = torch.stack(
        [torch.cat([load_file(v / "task_vector.safetensors")[k].reshape(-1) for k in keys]) for v in vecs]
    )  # (K, P)
    d = flat.shape[1]
    kk = d - int(d * density)
    kth = flat.abs().kthvalue(kk, dim=1, keepdim=True).values
    flat = flat * (flat.abs() >= kth)
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, flat > 0, flat < 0)
    sel = flat * keep
    merged_flat = sel.sum(0) / (sel != 0).sum(0).float().clamp(min=1)
    base = load_file(work / "base.safetensors")
    merged, pos = {}, 0
    for k in keys:
        n = base[k].numel()
        merged[k] = base[k] + merged_flat[pos : pos + n].reshape(base[k].shape)
        pos += n
    save_file(merged, out)


def _import_line() -> str:
    code = (
        "import time, sys; t = time.perf_counter(); import torch; t1 = time.perf_counter(); "
        "import asymvlm.merging.methods, asymvlm.merging.task_vectors, asymvlm.merging.api; t2 = time.perf_counter(); "
        "print(t1 - t, t2 - t1, [m for m in ('transformers', 'peft') if m in sys.modules])"
    )
    imp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 2)
    return (
        f"import: torch {float(imp[0]):.2f} s, then the merging core {float(imp[1]):.2f} s "
        f"(total {float(imp[0]) + float(imp[1]):.2f} s); heavy modules imported: {imp[2].strip()}"
    )


def _run_subprocess(method: str, work: Path, args) -> tuple[dict | None, str | None]:
    """One method in its own process: (its result, None) or (None, the reason it failed)."""
    cmd = [sys.executable, __file__, "--run", method, "--workdir", str(work)]
    for flag in ("tasks", "density", "width", "layers"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return None, "killed (out of memory?)" if proc.returncode < 0 else (lines[-1] if lines else "no output")
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def relative_difference(work: Path, mine: str, ref: str) -> tuple[float, str]:
    """max over tensors of max|mine - ref| / max|ref - base| (the merged task vector's largest
    entry), and the tensor where it is largest."""
    base = load_file(work / "base.safetensors")
    b = load_file(work / f"out-{ref}.safetensors")
    m = load_file(work / f"out-{mine}.safetensors")
    worst, where = 0.0, ""
    for k in b:
        scale = float((b[k].double() - base[k].double()).abs().max())
        rel = float((m[k].double() - b[k].double()).abs().max()) / max(scale, 1e-30)
        if rel >= worst:
            worst, where = rel, k
    return worst, where


def _prepare_inputs(work: Path, args, rows: list[str]) -> tuple[str, str]:
    """Generate the inputs the chosen rows need (unless already in ``work``); returns the inputs'
    descriptions ``(task vectors, LoRA adapters)``."""
    n = sum(int(torch.Size(s).numel()) for s in vit_b32_visual_shapes(args.width, args.layers).values())
    lora = lora_layer_shapes(args.width, args.layers)
    dense = f"{args.tasks} x {n / 1e6:.1f}M params, density {args.density}"
    adapters = f"{args.tasks} LoRA adapters, rank {args.rank}, {len(lora)} layers, density {args.density}"
    t = time.perf_counter()
    if any(r not in LORA_ROWS for r in rows):
        print(
            f"{args.tasks} task vectors x {n / 1e6:.1f}M float32 parameters ({n * 4 / 2**20:.0f} MiB each), "
            f"density {args.density}; inputs in {work}"
        )
        if not (work / f"tv{args.tasks - 1}" / "task_vector.safetensors").is_file():
            prepare(work, args.tasks, args.width, args.layers)
        if "fisher" in rows and not (work / f"tv{args.tasks - 1}" / "fisher.safetensors").is_file():
            prepare_fishers(work, args.tasks, args.width, args.layers)
    if any(r in LORA_ROWS for r in rows):
        mn = sum(m * args.rank + args.rank * n_ for m, n_ in lora.values())
        print(f"{adapters} ({mn / 1e6:.2f}M float32 factor entries each, {len(lora) // 4} blocks); inputs in {work}")
        if not (work / f"lora{args.tasks - 1}" / "adapter_model.safetensors").is_file():
            prepare_adapters(work, args.tasks, args.width, args.layers, args.rank)
    print(f"  inputs ready in {time.perf_counter() - t:.1f} s")
    return dense, adapters


def _print_table(lines: list[str], rows: list[str]) -> None:
    print("  merges checked against a reference (max rel diff <= tol):")
    for row in rows:
        if row in TOLERANCE and ROWS[row][1]:
            print(f"    {row}: {ROWS[row][2]}")
    print(
        f"  {'row':<16} {'ours s':>8} {'naive s':>8} {'time':>8} {'ours GiB':>8} {'naive':>8} {'memory':>8}",
        " rel diff     tol",
    )
    print("\n".join(lines))
    print("  (time and memory columns: asymvlm / naive; < 1 means asymvlm is faster / smaller)")


def _record(
    rec: Results, results: dict, rows: list[str], work: Path, inputs: tuple[str, str]
) -> tuple[list[str], bool]:
    """Add one Results row per chosen row; returns the printed comparison lines and whether every
    merge with a tolerance (:data:`TOLERANCE`) matched its reference."""
    lines, ok = [], True
    for row in rows:
        mine, ref, label = ROWS[row]
        if mine not in results:
            continue
        r, b = results[mine], results.get(ref) if ref else None
        extra: dict = {"ours_peak_rss_gib": r["peak_mib"] / 1024}
        if ref is not None:
            extra["baseline_peak_rss_gib"] = b["peak_mib"] / 1024 if b else "FAILED"
        if b is not None and row in TOLERANCE:
            if row in LORA_ROWS:
                rel, where = lora_relative_difference(work / f"out-{mine}", work / f"out-{ref}.safetensors")
            else:
                rel, where = relative_difference(work, mine, ref)
            good = rel <= TOLERANCE[row]
            ok &= good
            extra.update(max_rel_diff=rel, rel_tolerance=TOLERANCE[row])
            extra["peak_rss_ours_over_baseline"] = r["peak_mib"] / b["peak_mib"]
            lines.append(
                f"  {row:<16} {r['seconds']:8.2f} {b['seconds']:8.2f} {r['seconds'] / b['seconds']:7.2f}x "
                f"{r['peak_mib'] / 1024:8.2f} {b['peak_mib'] / 1024:8.2f} {r['peak_mib'] / b['peak_mib']:7.2f}x "
                f"{rel:9.1e} {TOLERANCE[row]:7.0e} ({'ok' if good else 'MISMATCH'}, {where})"
            )
        elif b is not None:
            o = load_file(work / f"out-{ref}.safetensors")
            m = load_file(work / f"out-{mine}.safetensors")
            extra["max_abs_diff"] = max(float((m[k] - o[k]).abs().max()) for k in o)
            print(f"  max |{mine} - {ref}| = {extra['max_abs_diff']:.2e}")
        what = inputs[1] if row in LORA_ROWS else inputs[0]
        rec.add(label, r["seconds"], b["seconds"] if b else None, "s", higher_is_better=False, **extra, inputs=what)
    return lines, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(ROWS),
        default=list(ROWS),
        metavar="ROW",
        help=f"rows to run (default: all): {', '.join(ROWS)}",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--width", type=int, default=768, help="tower width (ViT-B/32: 768)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (ViT-B/32: 12)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the knots/core_space adapters")
    parser.add_argument("--quick", action="store_true", help="4 task vectors of a width-128, 2-layer tower (rank 4)")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one method in this process
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.width, args.layers, args.rank = 4, 128, 2, 4
    if args.run:
        r = run_method(args.run, Path(args.workdir), args.tasks, args.density, args.width, args.layers)
        print(json.dumps(r))
        return 0
    rec = Results(
        "merge",
        "Merging task vectors of a CLIP ViT-B/32-shaped visual tower (TIES, task arithmetic, Iso-C/CTS, TSV-M, "
        "Fisher, LiNeS) and LoRA adapters of its linears (KnOTS, Core Space)",
    )
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="asymvlm-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if r in args.methods]
    inputs = _prepare_inputs(work, args, rows)
    import_line = _import_line()
    print("  " + import_line)
    rec.note(import_line)
    results = {}
    for method in dict.fromkeys(m for r in rows for m in ROWS[r][:2] if m is not None):
        r, reason = _run_subprocess(method, work, args)
        if r is None:
            print(f"  {method:<18} FAILED: {reason}")
            rec.note(f"{method} FAILED: {reason}")
            continue
        results[method] = r
        print(f"  {method:<18} {r['seconds']:8.2f} s   peak RSS {r['peak_mib'] / 1024:6.2f} GiB")
    if "peft_ties" in results and "ties_per_tensor" in results:
        ratio = results["ties_per_tensor"]["seconds"] / results["peft_ties"]["seconds"]
        print(f"  per-tensor TIES / peft ties time: {ratio:.2f}x ({format_ratio(1 / ratio)})")
    lines, ok = _record(rec, results, rows, work, inputs)
    if lines:
        _print_table(lines, rows)
    rec.note("Each method in its own subprocess; peak RSS is that process's maximum (torch import included).")
    rec.note(
        "Checked rows: max |asymvlm - naive| / max |naive merged delta| per tensor (LoRA rows: per layer, on the "
        f"merged dense dW); tolerances {TOLERANCE}."
    )
    if not ok:
        rec.note("MISMATCH: a merge differs from its reference beyond the tolerance")
    rec.write(args.json)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
