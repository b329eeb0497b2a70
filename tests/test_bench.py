"""bench/run_all.py and the results recorder of bench/_common.py (no timing thresholds, ever)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RATIO = re.compile(r"\| [0-9][0-9.e+]*x (faster|slower|smaller error|larger error|smaller drift|larger drift) \|")


@pytest.fixture
def bench(monkeypatch):
    """(run_all, _common) loaded from bench/ with bench/ on sys.path for this test only."""
    monkeypatch.syspath_prepend(str(BENCH))
    mods = {}
    for name in ("_common", "run_all"):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods["run_all"], mods["_common"]


def test_results_ratio_orientation_and_json(bench, tmp_path):
    _, common = bench
    r = common.Results("demo", "Demo")
    fast = r.add("time", 1.0, 4.0, "s", higher_is_better=False, peak_mib=3.5)
    slow = r.add("throughput", 10.0, 40.0, "q/s", higher_is_better=True)
    err = r.add("error", 1e-15, 1e-3, "", higher_is_better=False, better="smaller error", worse="larger error")
    alone = r.add("no baseline", 2.0, None, "s", higher_is_better=False)
    assert fast["ratio"] == 4.0 and slow["ratio"] == 0.25 and alone["ratio"] is None
    assert common.format_ratio(fast["ratio"]) == "4.00x faster"
    assert common.format_ratio(slow["ratio"]) == "4.00x slower"
    assert common.format_ratio(err["ratio"], err["better"], err["worse"]) == "1.0e+12x smaller error"
    assert common.format_ratio(None) == "—"
    r.note("a note")
    r.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["type"] == "asymvlm.bench_results" and data["name"] == "demo"
    assert [row["case"] for row in data["rows"]] == ["time", "throughput", "error", "no baseline"]
    assert data["rows"][0]["extra"] == {"peak_mib": 3.5} and data["notes"] == ["a note"]


def _fake(path: Path, body: str) -> Path:
    header = f"import sys\nsys.path.insert(0, {str(BENCH)!r})\n"
    path.write_text(header + textwrap.dedent(body))
    return path


def test_run_all_report_and_failure(bench, tmp_path, monkeypatch, capsys):
    run_all, _ = bench
    ok = _fake(
        tmp_path / "ok.py",
        """
        import argparse
        from _common import Results
        p = argparse.ArgumentParser()
        p.add_argument("--json")
        p.add_argument("--quick", action="store_true")
        a = p.parse_args()
        print("fake benchmark output", "quick" if a.quick else "full")
        r = Results("fake_ok", "A fake benchmark")
        r.add("case one", 0.5, 1.5, "s", higher_is_better=False, peak_mib=12.0)
        r.add("case two", 100.0, 50.0, "q/s", higher_is_better=True)
        r.note("measured on nothing")
        r.write(a.json)
        """,
    )
    bad = _fake(tmp_path / "bad.py", "print('starting')\nsys.stderr.write('boom: something broke\\n')\nsys.exit(3)\n")
    monkeypatch.setattr(run_all, "BENCHMARKS", {"fake_ok": ok, "fake_bad": bad})
    out = tmp_path / "RESULTS.md"
    assert run_all.main(["--quick", "--out", str(out)]) == 1  # a failure: non-zero, after the others ran
    text = out.read_text()
    printed = capsys.readouterr()
    assert "fake benchmark output quick" in printed.out and "boom" in printed.err  # streamed
    assert "## Machine" in text and "torch threads" in text and "GPU" in text
    assert "## fake_ok: A fake benchmark" in text
    assert "| case one | 0.5 s | 1.5 s | 3.00x faster | 12 |" in text
    assert "| case two | 100 q/s | 50 q/s | 2.00x faster |" in text
    assert "- measured on nothing" in text and f"`python {ok} --quick`" in text
    bad_section = text.split("## fake_bad")[1]
    assert "**FAILED** (exit code 3" in bad_section and "boom: something broke" in bad_section

    assert run_all.main(["--only", "fake_ok", "--out", str(out)]) == 0
    text = out.read_text()
    assert "FAILED" not in text and "fake_bad" not in text and "--only fake_ok" in text


@pytest.mark.slow
def test_run_all_quick_end_to_end(bench, tmp_path):
    """Every benchmark in quick mode, as `make bench` runs them (in subprocesses)."""
    run_all, _ = bench
    out = tmp_path / "RESULTS.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "FAILED" not in text
    assert "## Machine" in text and "- **CPU**:" in text and "- **RAM**:" in text
    sections = re.split(r"^## ", text, flags=re.M)
    by_name = {s.split(":", 1)[0].split("\n", 1)[0]: s for s in sections[1:]}
    assert set(run_all.BENCHMARKS) <= set(by_name)
    for name in run_all.BENCHMARKS:
        body = by_name[name]
        assert f"`python bench/{name}.py --quick`" in body
        assert RATIO.search(body), f"no numeric ratio in the {name} section:\n{body}"


@pytest.mark.slow
def test_serve_bench_end_to_end(tmp_path, quick_toy_cache):
    """bench/serve.py on tiny sizes: both servers answer every level, rows and the memory row come out."""
    out = tmp_path / "serve.json"
    env = {**os.environ, "ASYMVLM_CACHE": str(quick_toy_cache)}
    cmd = [sys.executable, str(BENCH / "serve.py"), "--quick", "--demo_dir", str(tmp_path / "demo"), "--sizes",
           "1000,2000", "--levels", "1,4", "--requests", "12", "--seconds", "5", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    cases = [r["case"] for r in rows]
    for gallery in ("shapeworld-1k (1,000 images)", "synthetic-2k (2,000 images)"):
        for level in (1, 4):
            for what in ("requests/s", "p50 latency", "p99 latency"):
                assert f"{gallery}, {level} clients: {what}" in cases
    assert all(r["ours"] > 0 and r["baseline"] > 0 and r["extra"].get("errors", 0) == 0 for r in rows)
    assert cases[-1].startswith("server private memory (RssAnon) after the load: 2,000 vs 1,000 images")


@pytest.mark.slow
def test_abstention_bench_end_to_end(tmp_path, quick_toy_cache):
    """bench/abstention.py on the --quick demo: every rule side by side, the withheld and kept answers
    add up, p_correct's rule keeps the likelier answers, foreign sentences are never right."""
    out = tmp_path / "abstention.json"
    env = {**os.environ, "ASYMVLM_CACHE": str(quick_toy_cache)}
    cmd = [sys.executable, str(BENCH / "abstention.py"), "--quick", "--demo_dir", str(tmp_path / "demo"),
           "--scenes", "10", "--output", str(out), "--no_progress"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=900)
    r = json.loads(out.read_text())
    assert r["queries"] == 10 * 6 * 4 + 8
    none = r["rules"]["none"]
    assert none["kept"] == 1.0 and none["right_withheld"] is None
    assert r["rules"]["none"]["groups"]["foreign"]["right"] == 0.0
    for rule, m in r["rules"].items():
        if m["right_kept"] is not None and m["right_withheld"] is not None:  # kept + withheld = all
            total = m["kept"] * m["right_kept"] + (1 - m["kept"]) * m["right_withheld"]
            assert total == pytest.approx(none["right_all"], abs=1e-9), rule
    assert r["calibration"]["label"].startswith("consistent")
    assert sum(b["count"] for b in r["reliability"]) == r["queries"]
