"""Head-training steps idle and beside busy processes: how the threading defaults hold up on a shared machine.

On a 2-core machine shared with other CPU-bound jobs, torch's default (one OpenMP thread per
core, threads spin-waiting between the many small ops of a head step) can slow a step far more
than the lost core explains. This measures, for the demo's head steps (a 3 x 1024 vMF head on
d = 256 embeddings, AdamW, batch 64 as in a federated local step and batch 512 as in central
training), the median step time:

* idle, beside one and beside two busy processes (each a pure-Python spin loop, started and
  killed by this script);
* for the thread settings: torch's default (``default``), the same with
  ``OMP_WAIT_POLICY=PASSIVE`` (``passive``: waiting threads sleep at once), with
  ``GOMP_SPINCOUNT`` 10^4 or 10^5 (``spin 1e4``/``spin 1e5``: libgomp spins that long, then
  sleeps; its default is 3 x 10^5), one thread (``1 thread``), and ``asymvlm``: what the
  package sets when it is imported before torch (GOMP_SPINCOUNT=1000, chosen from these figures).

Each configuration runs in a fresh process (OpenMP reads its environment once), ``--repeats``
times interleaved with the others; the median is reported with its max/min spread. Prints ms per
step and two ratios: slowdown against the same setting idle, and against torch's default idle
(the baseline of the side-by-side comparison).

Run:  python bench/contention.py [--steps 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Results  # noqa: E402

WORKER = r"""
import json, os, sys, time
mode, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "asymvlm":
    import asymvlm  # noqa: F401  (applies the package's threading defaults)
import torch
if mode == "1 thread":
    torch.set_num_threads(1)
workload = sys.argv[4]
torch.manual_seed(0)
if workload == "head":
    from asymvlm import AsymVLMLoss, TextHead
    head = TextHead(256, "vmf", hidden_dims=[1024, 1024, 1024])
    loss_fn = AsymVLMLoss()
    params = list(head.parameters()) + list(loss_fn.parameters())
    x = torch.nn.functional.normalize(torch.randn(batch, 256), dim=-1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(batch, 256), dim=-1)
    def step():
        return loss_fn(head(x), y)
else:  # one step of the v3 toy CLIP's build: a ViT and a text transformer, contrastive loss
    import open_clip
    from asymvlm.encoders import register_open_clip_configs
    from asymvlm.worlds.toyclip import MODEL_NAMES
    register_open_clip_configs()
    model = open_clip.create_model(MODEL_NAMES[3])
    params = list(model.parameters())
    pixels, tokens = torch.randn(batch, 3, 48, 48), torch.randint(0, 64, (batch, 24))
    def step():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
        return (img @ txt.T).logsumexp(1).mean()
opt = torch.optim.AdamW(params, lr=1e-3)
times = []
for i in range(steps + 5):
    t = time.perf_counter()
    loss = step()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= 5:
        times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"ms": 1000 * times[len(times) // 2], "threads": torch.get_num_threads(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}))
"""

MODES = ("default", "passive", "spin 1e4", "spin 1e5", "1 thread", "asymvlm")


def _env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.pop("GOMP_SPINCOUNT", None)
    if mode == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if mode.startswith("spin "):  # libgomp (torch's OpenMP on Linux): spin this many times, then sleep
        env["GOMP_SPINCOUNT"] = str(int(float(mode.split()[1])))
    return env


def _measure(mode: str, batch: int, steps: int, workload: str = "head") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(batch), str(steps), workload],
        env=_env(mode),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3, help="Interleaved repeats; the median is reported.")
    p.add_argument("--modes", nargs="+", default=list(MODES), help=f"Settings to compare, of {MODES} or 'spin N'.")
    p.add_argument(
        "--workload", default="head", choices=("head", "toyclip"),
        help="head: a head step (batch = texts); toyclip: a v3 toy CLIP build step (batch = pairs).",
    )  # fmt: skip
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if "default" not in args.modes:
        p.error("--modes must include 'default' (the baseline)")
    bad = [m for m in args.modes if m not in MODES and not (m.startswith("spin ") and m[5:].replace("e", "").isdigit())]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES} or 'spin N'")
    modes = tuple(args.modes)
    rows = []
    for busy in args.busy:
        procs = _spinners(busy)
        try:
            time.sleep(0.5 if busy else 0)
            for batch in args.batches:
                samples: dict[str, list[dict]] = {m: [] for m in modes}
                for rep in range(args.repeats):  # modes interleaved, rotated per repeat: drift hits all alike
                    for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
                        samples[mode].append(_measure(mode, batch, args.steps, args.workload))
                for mode in modes:
                    runs = sorted(samples[mode], key=lambda r: r["ms"])
                    r = {**runs[len(runs) // 2], "spread": runs[-1]["ms"] / runs[0]["ms"]}
                    rows.append({"busy": busy, "batch": batch, "mode": mode, **r})
                    print(
                        f"busy {busy} batch {batch:4d} {mode:9s} {r['ms']:8.1f} ms  (threads {r['threads']}, "
                        f"max/min over {args.repeats} runs {r['spread']:.2f})",
                        flush=True,
                    )
        finally:
            for pr in procs:  # killed by PID, always
                pr.kill()
                pr.wait()
    idle = {(r["batch"], r["mode"]): r["ms"] for r in rows if r["busy"] == 0}
    results = Results("contention", "Head steps idle and beside busy processes (ms per step)")
    default = {(r["busy"], r["batch"]): r["ms"] for r in rows if r["mode"] == "default"}
    print("\nbusy  batch  setting     ms/step  vs same idle  vs torch default idle  vs torch default, same load")
    for r in rows:
        same = r["ms"] / idle[(r["batch"], r["mode"])] if (r["batch"], r["mode"]) in idle else float("nan")
        base = r["ms"] / idle[(r["batch"], "default")] if (r["batch"], "default") in idle else float("nan")
        side = default[(r["busy"], r["batch"])] / r["ms"]
        print(
            f"{r['busy']:4d}  {r['batch']:5d}  {r['mode']:9s} {r['ms']:8.1f}  {same:11.2f}x  {base:20.2f}x  "
            f"{side:18.2f}x faster"
        )
        results.add(
            f"busy {r['busy']}, batch {r['batch']}, {r['mode']} (slowdown vs idle {same:.2f}x)",
            r["ms"],
            default[(r["busy"], r["batch"])],
            "ms",
            higher_is_better=False,
            threads=r["threads"],
        )
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
