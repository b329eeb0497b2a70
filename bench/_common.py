"""Helpers shared by the benchmarks: peak resident memory, best-of-N timing and a results recorder.

Every benchmark prints its own table and, with ``--json PATH``, writes the same rows through
:class:`Results` so that ``bench/run_all.py`` can collect them into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import psutil

__all__ = ["PeakRSS", "Results", "best_seconds", "format_ratio", "format_value", "timed", "release_freed_memory"]

RESULTS_TYPE = "asymvlm.bench_results"
RESULTS_VERSION = 1


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS at the start of a measurement is live data
    and a method does not look cheaper because an earlier one left the allocator's pools large."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measurements are then upper-bounded by reuse
        pass


def best_seconds(fn, repeat: int = 3) -> float:
    """Best-of-``repeat`` seconds of ``fn()`` after one untimed call, nothing else running beside it
    (:func:`timed` samples the memory in a thread every 2 ms, which disturbs millisecond kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timed(fn, repeat: int, warmup: bool = True):
    """Best-of-``repeat`` seconds of ``fn()``, its last output and the peak extra RSS (MiB).

    ``warmup=False`` skips the untimed first call (for calls of seconds, where it only costs time).
    """
    if warmup:
        fn()
    best, out, mem = float("inf"), None, 0.0
    for _ in range(repeat):
        out = None
        release_freed_memory()
        with PeakRSS() as p:
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        mem = max(mem, p.mib)
    return best, out, mem


def format_value(x: float | None, unit: str = "") -> str:
    """``1.23 ms``-style cell: 3 significant digits, scientific notation for tiny/huge numbers."""
    if x is None:
        return "—"
    if isinstance(x, str):
        return f"{x} {unit}".strip()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    ax = abs(x)
    if ax == 0:
        text = "0"
    elif ax < 1e-3 or ax >= 1e6:
        text = f"{x:.2e}"
    elif ax >= 100:
        text = f"{x:,.0f}"
    else:
        text = f"{x:.3g}"
    return f"{text} {unit}".strip()


def format_ratio(ratio: float | None, better: str = "faster", worse: str = "slower") -> str:
    """``ratio`` is ours' advantage (> 1: ours is better): ``2.50x faster`` or ``4.00x slower``."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return "—"
    r, word = (ratio, better) if ratio >= 1 else (1 / ratio, worse)
    text = f"{r:.2f}" if r < 100 else f"{r:.0f}" if r < 1e4 else f"{r:.1e}"
    return f"{text}x {word}"


class Results:
    """Rows of one benchmark run: ours next to the baseline measured in the same process.

    ``ratio`` is always oriented as *ours' advantage*: ``baseline / ours`` when lower is better
    (seconds, errors, memory), ``ours / baseline`` when higher is better (throughput), so > 1 means
    ours wins; the words ``better``/``worse`` say in what (``faster``/``slower``, ``smaller error``...).

    Example:
        >>> r = Results("demo", "A demo benchmark")
        >>> row = r.add("sum of 1M floats", 0.5, 2.0, "ms", higher_is_better=False, threads=2)
        >>> row["ratio"], format_ratio(row["ratio"])
        (4.0, '4.00x faster')
    """

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def add(
        self,
        case: str,
        ours: float | None,
        baseline: float | None,
        unit: str,
        *,
        higher_is_better: bool,
        ratio: float | None = None,
        better: str | None = None,
        worse: str | None = None,
        **extra,
    ) -> dict:
        """Record one row; ``extra`` are further columns (``peak_mib=...``); returns the row."""
        if ratio is None and ours is not None and baseline is not None:
            num, den = (ours, baseline) if higher_is_better else (baseline, ours)
            ratio = num / den if den else None
        row = {
            "case": case,
            "ours": _jsonable(ours),
            "baseline": _jsonable(baseline),
            "unit": unit,
            "ratio": _jsonable(ratio),
            "higher_is_better": higher_is_better,
            "better": better or "faster",
            "worse": worse or "slower",
            "extra": {k: _jsonable(v) for k, v in extra.items()},
        }
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict:
        return {
            "type": RESULTS_TYPE,
            "format_version": RESULTS_VERSION,
            "name": self.name,
            "title": self.title,
            "argv": sys.argv[1:],
            "seconds": time.time() - psutil.Process().create_time(),  # the whole run, imports included
            "rows": self.rows,
            "notes": self.notes,
        }

    def write(self, path: str | os.PathLike | None) -> None:
        """Write the JSON (atomically: temp file + rename); ``None`` does nothing."""
        if path is None:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)


def _jsonable(x):
    """Python scalars for JSON (numpy/torch scalars -> float/int; NaN/inf stay floats, which
    Python's json writes and reads as NaN/Infinity)."""
    if x is None or isinstance(x, (str, bool)):
        return x
    return x.item() if hasattr(x, "item") else x
