"""Merging 8 task vectors shaped like the CLIP ViT-B/32 visual tower (~88M parameters each).

The task vectors (and a base) are generated deterministically and written as safetensors; each
method then runs in its own subprocess of this run (so peak RSS is the method's own), reading
the inputs from disk:

* asymvlm task arithmetic (``merge_files``, streaming);
* asymvlm TIES, global top-k (the paper's; exact radix-selected thresholds, streaming);
* asymvlm TIES, per-tensor top-k (peft's convention);
* peft's ``ties`` per tensor (``peft.utils.merge_utils.ties`` over the K copies of each tensor);
* the naive reference of the published algorithm: flatten all task vectors into a [K, P] matrix,
  per-task ``kthvalue``, sign of the sum, disjoint mean (its failure is reported if it runs out of
  memory).

Prints wall time and peak RSS per method, and checks that global TIES equals the naive reference
and per-tensor TIES equals peft's.

In ``--quick`` mode the tower is shrunk (width 128, 2 layers, 4 tasks) so the run takes seconds.

Run:  python bench/merge.py [--tasks 8] [--workdir DIR] [--keep] [--quick] [--json PATH]
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
from _common import Results
from safetensors.torch import load_file, save_file


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


def run_method(method: str, work: Path, tasks: int, density: float, width: int = 768, layers: int = 12) -> dict:
    vecs = [work / f"tv{t}" for t in range(tasks)]
    out = work / f"out-{method}.safetensors"
    start = time.perf_counter()
    if method in ("task_arithmetic", "ties_global", "ties_per_tensor"):
        from asymvlm.merging.methods import merge_files

        name = "task_arithmetic" if method == "task_arithmetic" else "ties"
        opts = (
            {}
            if name == "task_arithmetic"
            else {"density": density, "scope": "global" if method == "ties_global" else "per_tensor"}
        )
        if method == "ties_per_tensor":  # peft's conventions
            opts.update(sign_weighted=False, normalize="count", zero_sign="positive")
        merge_files(work / "base.safetensors", vecs, out, name, lam=1.0, **opts)
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
        shapes = vit_b32_visual_shapes(width, layers)
        keys = list(shapes)
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
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"method": method, "seconds": seconds, "peak_mib": peak_mib}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--width", type=int, default=768, help="tower width (ViT-B/32: 768)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (ViT-B/32: 12)")
    parser.add_argument("--quick", action="store_true", help="4 task vectors of a width-128, 2-layer tower")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one method in this process
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.width, args.layers = 4, 128, 2
    if args.run:
        r = run_method(args.run, Path(args.workdir), args.tasks, args.density, args.width, args.layers)
        print(json.dumps(r))
        return 0
    rec = Results("merge", "Merging task vectors of a CLIP ViT-B/32-shaped visual tower (TIES, task arithmetic)")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="asymvlm-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n = sum(int(torch.Size(s).numel()) for s in vit_b32_visual_shapes(args.width, args.layers).values())
    print(
        f"{args.tasks} task vectors x {n / 1e6:.1f}M float32 parameters ({n * 4 / 2**20:.0f} MiB each), "
        f"density {args.density}; inputs in {work}"
    )
    if not (work / f"tv{args.tasks - 1}" / "task_vector.safetensors").is_file():
        t = time.perf_counter()
        prepare(work, args.tasks, args.width, args.layers)
        print(f"  generated inputs in {time.perf_counter() - t:.1f} s")
    code = (
        "import time, sys; t = time.perf_counter(); import torch; t1 = time.perf_counter(); "
        "import asymvlm.merging.methods, asymvlm.merging.task_vectors, asymvlm.merging.api; t2 = time.perf_counter(); "
        "print(t1 - t, t2 - t1, [m for m in ('transformers', 'peft') if m in sys.modules])"
    )
    imp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 2)
    import_line = (
        f"import: torch {float(imp[0]):.2f} s, then the merging core {float(imp[1]):.2f} s "
        f"(total {float(imp[0]) + float(imp[1]):.2f} s); heavy modules imported: {imp[2].strip()}"
    )
    print("  " + import_line)
    rec.note(import_line)
    results = {}
    for method in ("task_arithmetic", "ties_global", "ties_per_tensor", "peft_ties", "naive_global"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--run",
                method,
                "--workdir",
                str(work),
                "--tasks",
                str(args.tasks),
                "--density",
                str(args.density),
                "--width",
                str(args.width),
                "--layers",
                str(args.layers),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1]
            print(f"  {method:<18} FAILED: {reason}")
            rec.note(f"{method} FAILED: {reason}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[method] = r
        print(f"  {method:<18} {r['seconds']:8.2f} s   peak RSS {r['peak_mib'] / 1024:6.2f} GiB")
    if "peft_ties" in results and "ties_per_tensor" in results:
        ratio = results["ties_per_tensor"]["seconds"] / results["peft_ties"]["seconds"]
        print(f"  per-tensor TIES / peft ties time: {ratio:.2f}x")
    inputs = f"{args.tasks} x {n / 1e6:.1f}M params, density {args.density}"
    if "task_arithmetic" in results:
        r = results["task_arithmetic"]
        rec.add(
            "task arithmetic: asymvlm merge_files (streaming), no baseline",
            r["seconds"],
            None,
            "s",
            higher_is_better=False,
            ours_peak_rss_gib=r["peak_mib"] / 1024,
            inputs=inputs,
        )
    for mine, ref, label in (
        ("ties_global", "naive_global", "TIES global top-k: asymvlm streaming vs naive [K, P] flatten (paper)"),
        ("ties_per_tensor", "peft_ties", "TIES per-tensor top-k: asymvlm streaming vs peft merge_utils.ties"),
    ):
        if mine not in results:
            continue
        diff = None
        if ref in results:
            b = load_file(work / f"out-{ref}.safetensors")
            m = load_file(work / f"out-{mine}.safetensors")
            diff = max(float((m[k] - b[k]).abs().max()) for k in b)
            print(f"  max |{mine} - {ref}| = {diff:.2e}")
        rec.add(
            label,
            results[mine]["seconds"],
            results[ref]["seconds"] if ref in results else None,
            "s",
            higher_is_better=False,
            ours_peak_rss_gib=results[mine]["peak_mib"] / 1024,
            baseline_peak_rss_gib=results[ref]["peak_mib"] / 1024 if ref in results else "FAILED",
            max_abs_diff=diff,
            inputs=inputs,
        )
    rec.note("Each method in its own subprocess; peak RSS is that process's maximum (torch import included).")
    rec.write(args.json)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
