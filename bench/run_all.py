"""Run every benchmark and write a markdown report of ours-vs-baseline ratios (bench/RESULTS.md).

Each benchmark runs as its own subprocess (``python bench/<name>.py --json ...``: memory
isolation, and a crash in one does not stop the others), its stdout and stderr streamed to the
terminal. The report has the date, the command, the machine, then one table per benchmark
(case | ours | baseline | ratio | extra columns) with its notes and the command that reproduces
it. A benchmark that fails is reported as FAILED with the end of its stderr, and makes this
script exit non-zero after the others ran.

Ratios are oriented as ours' advantage, measured side by side with the baseline in the same run:
``2.00x faster`` means the baseline took twice our time; ``2.00x slower`` the opposite.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:  # the scripts import _common as a sibling module
    sys.path.insert(0, str(BENCH_DIR))

from _common import format_ratio, format_value  # noqa: E402

__all__ = ["BENCHMARKS", "machine_info", "render_markdown", "main"]

# name -> script; run in this order (the short ones first, retrieval's 1M gallery and merge last)
BENCHMARKS: dict[str, Path] = {
    "special": BENCH_DIR / "special.py",
    "shapeworld": BENCH_DIR / "shapeworld.py",
    "aggregate": BENCH_DIR / "aggregate.py",
    "train_throughput": BENCH_DIR / "train_throughput.py",
    "retrieval": BENCH_DIR / "retrieval.py",
    "limits": BENCH_DIR / "limits.py",
    "merge": BENCH_DIR / "merge.py",
    "robustness": BENCH_DIR / "robustness.py",
}

STDERR_TAIL = 20  # lines of a failed benchmark's stderr kept in the report


def _load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def machine_info() -> dict[str, str]:
    """CPU, cores, threads, memory, OS, Python and library versions, GPU."""
    import numpy
    import psutil
    import scipy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = "none"
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical)",
        "torch threads": str(torch.get_num_threads()),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "versions": f"torch {torch.__version__}, numpy {numpy.__version__}, scipy {scipy.__version__}",
        "GPU": gpu,
    }


def _pump(stream, sink, keep: collections.deque | None = None) -> None:
    """Copy a child's stream line by line to ``sink`` (and keep the last lines)."""
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        if keep is not None:
            keep.append(line.rstrip("\n"))
    stream.close()


def run_one(name: str, script: Path, json_path: Path, quick: bool) -> dict:
    """Run one benchmark script; returns its results dict, or a FAILED record."""
    cmd = [sys.executable, str(script), "--json", str(json_path)] + (["--quick"] if quick else [])
    env = dict(os.environ)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(var, "1")  # benchmarks never need the network
    env["PYTHONUNBUFFERED"] = "1"  # stream their output as it comes
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    repro = "python " + shlex.join([str(shown)] + (["--quick"] if quick else []))
    print(f"\n=== {name}: {repro} ===", flush=True)
    start = time.perf_counter()
    tail: collections.deque = collections.deque(maxlen=STDERR_TAIL)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_thread = threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tail), daemon=True)
    err_thread.start()
    _pump(proc.stdout, sys.stdout)
    rc = proc.wait()
    err_thread.join()
    seconds = time.perf_counter() - start
    if rc == 0 and json_path.is_file():
        out = json.loads(json_path.read_text())
        out.update(status="ok", wall_seconds=seconds, reproduce=repro)
        return out
    if rc < 0:
        reason = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    else:
        reason = f"exit code {rc}" if rc != 0 else "exit code 0 but no JSON results written"
    print(f"=== {name} FAILED ({reason}) ===", flush=True)
    return {"name": name, "status": "FAILED", "reason": reason, "stderr_tail": list(tail), "wall_seconds": seconds}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _header(key: str) -> str:
    """``ours_peak_mib`` -> ``ours peak MiB``."""
    words = {"mib": "MiB", "gib": "GiB", "rss": "RSS"}
    return " ".join(words.get(w, w) for w in key.split("_"))


def _table(rows: list[dict]) -> list[str]:
    extra_cols: list[str] = []
    for r in rows:
        extra_cols += [k for k in r.get("extra", {}) if k not in extra_cols]
    extra_cols.sort(key=lambda c: c == "inputs")  # the (long) inputs column last
    head = ["case", "ours", "baseline", "ratio (ours vs baseline)"] + [_header(c) for c in extra_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 3 + ["---"] * len(extra_cols)) + "|"]
    for r in rows:
        extra = r.get("extra", {})
        cells = [
            r["case"],
            format_value(r["ours"], r["unit"]),
            format_value(r["baseline"], r["unit"]),
            format_ratio(r["ratio"], r.get("better", "faster"), r.get("worse", "slower")),
        ] + [format_value(extra[c]) if c in extra and extra[c] is not None else "" for c in extra_cols]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render_markdown(results: list[dict], machine: dict[str, str], command: str, when: dt.datetime, seconds: float):
    """The report: header, machine, one section per benchmark."""
    lines = [
        "# asymvlm benchmarks",
        "",
        f"Generated {when:%Y-%m-%d %H:%M} UTC by `{command}` in {seconds / 60:.1f} min.",
        "",
        "Every ratio compares ours with a baseline measured side by side in the same process and run, "
        "oriented as ours' advantage: `2.00x faster` means the baseline took twice as long "
        "(or had half the throughput), `2.00x slower` the opposite; for errors, `smaller error`/`larger error`. "
        "Timings on a shared machine are noisy: compare ratios, not absolute numbers across machines.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in machine.items()]
    for r in results:
        lines += ["", f"## {r['name']}" + (f": {r['title']}" if r.get("title") else ""), ""]
        if r["status"] != "ok":
            lines += [
                f"**FAILED** ({r['reason']}, after {r['wall_seconds']:.0f} s). Last lines of its stderr:",
                "",
                "```",
                *r["stderr_tail"],
                "```",
            ]
            continue
        lines += [f"Reproduce: `{r['reproduce']}` ({r['wall_seconds']:.0f} s in this run).", ""]
        lines += _table(r["rows"]) if r["rows"] else ["(no rows recorded)"]
        if r.get("notes"):
            lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=(
            "examples:\n"
            "  python bench/run_all.py                      # full runs, writes bench/RESULTS.md\n"
            "  python bench/run_all.py --quick --out /tmp/RESULTS.md\n"
            "  python bench/run_all.py --only special merge"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test; numbers not meaningful)")
    parser.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="markdown report (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    when = dt.datetime.now(dt.timezone.utc)
    command = shlex.join(["python", "bench/run_all.py"] + (sys.argv[1:] if argv is None else list(argv)))
    start, load_start = time.perf_counter(), _load()
    results = []
    with tempfile.TemporaryDirectory(prefix="asymvlm-bench-") as tmp:
        for name in names:
            results.append(run_one(name, BENCHMARKS[name], Path(tmp) / f"{name}.json", args.quick))
    seconds = time.perf_counter() - start
    machine = machine_info()
    machine["load average (1/5/15 min)"] = (
        f"{load_start} before the run, {_load()} after it (the benchmarks' own load included; "
        f"other processes competing for the {os.cpu_count()} cores make timings noisy)"
    )
    text = render_markdown(results, machine, command, when, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, out)
    failed = [r["name"] for r in results if r["status"] != "ok"]
    print(f"\nwrote {out} ({seconds / 60:.1f} min)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
