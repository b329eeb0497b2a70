"""bench/personalization.py --quick end to end: the JSON's structure, and every summary recomputed
from the per-client values (the JSON's and the ones the script printed)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
LINE = re.compile(r"^per-client R@1 seed (\d+) (.+?): ([0-9. ]+)$")


@pytest.mark.slow  # the toy CLIPs of quick_toy_cache are built once per session (as for the other benches)
def test_personalization_bench_quick(tmp_path, quick_toy_cache):
    out = tmp_path / "pfl.json"
    env = {**os.environ, "ASYMVLM_CACHE": str(quick_toy_cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH / "personalization.py"), "--quick", "--json", str(out),
           "--work_dir", str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=600, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["type"] == "asymvlm.bench_personalization" and result["quick"] is True
    assert set(result["versions"]) >= {"python", "torch", "numpy"}
    fed = result["federations"]["shapeworld"]
    methods = ["FedAvg", "ditto"]
    assert fed["seeds"] == [0] and list(fed["summary"]) == methods
    printed = {(int(m[1]), m[2]): [float(x) for x in m[3].split()] for m in map(LINE.match, proc.stdout.splitlines())
               if m}  # fmt: skip
    assert set(printed) == {(0, m) for m in methods}
    for name, model in zip(methods, ["global", "personal"]):
        row = fed["runs"]["0"][name]
        assert row["model"] == model and row["rounds"] == result["settings"]["rounds"]
        per = row["per_client"]
        assert sorted(per, key=int) == [str(c) for c in range(result["settings"]["clients"])]
        r1 = np.array([per[c]["R@1"] for c in sorted(per, key=int)])
        assert ((0 <= r1) & (r1 <= 1)).all()
        # the logged summary is the per-client values' mean / worst 10% (lowest ceil(K/10)) / std
        s = row["summary"]["R@1"]
        assert math.isclose(s["mean"], r1.mean(), abs_tol=1e-9)
        assert math.isclose(s["worst10"], np.sort(r1)[: math.ceil(0.1 * len(r1))].mean(), abs_tol=1e-12)
        assert math.isclose(s["std"], r1.std(), abs_tol=1e-9)
        auroc = [per[c]["error_auroc"] for c in per if math.isfinite(per[c].get("error_auroc", math.nan))]
        assert math.isclose(row["summary"]["error_auroc"]["mean"], np.mean(auroc), abs_tol=1e-9)
        # what it printed per client is what it summarised
        assert np.allclose(printed[(0, name)], r1, atol=5e-5)
        assert math.isclose(np.mean(printed[(0, name)]), s["mean"], abs_tol=5e-5)
        # the seed summary of one seed is that seed's figure, spread 0
        assert math.isclose(fed["summary"][name]["R@1 mean"]["mean"], s["mean"], abs_tol=1e-12)
        assert fed["summary"][name]["R@1 worst10"]["spread"] == 0.0
        # every client took part in every round: uploads = per-round bytes x rounds, and nonzero
        assert row["upload_bytes"] > 0 and row["upload_bytes"] % result["settings"]["rounds"] == 0
    goal = fed["goal"]
    assert goal["best_global"] == "FedAvg" and goal["best_personalised"] == "ditto"
    lift = fed["summary"]["ditto"]["R@1 worst10"]["mean"] - fed["summary"]["FedAvg"]["R@1 worst10"]["mean"]
    assert math.isclose(goal["worst10_lift"], lift, abs_tol=1e-12)
    assert goal["met"] == (lift >= 0.10 and goal["mean_change"] >= 0)
    assert "| FedAvg | global |" in proc.stdout and "Goal on R@1 (worst-10% client R@1" in proc.stdout
    cap = fed["goal_caption"]  # the same check on caption R@1 (a repeated caption right about each of its images)
    for name, row in fed["runs"]["0"].items():
        c = np.array([row["per_client"][k]["caption_R@1"] for k in sorted(row["per_client"], key=int)])
        assert (c >= np.array([row["per_client"][k]["R@1"] for k in sorted(row["per_client"], key=int)])).all()
        assert math.isclose(fed["summary"][name]["caption R@1 mean"]["mean"], c.mean(), abs_tol=1e-9)
    assert cap["metric"] == "caption R@1" and cap["met"] == (cap["worst10_lift"] >= 0.10 and cap["mean_change"] >= 0)
