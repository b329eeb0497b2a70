"""bench/federated_sim.py --quick end to end without Flower's environment: the vectorised path ran,
its JSON rows are well formed, and the vectorised and sequential runs end at the same head."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_federated_sim_quick_without_flower(tmp_path):
    out = tmp_path / "fs.json"
    cmd = [sys.executable, str(REPO / "bench" / "federated_sim.py"), "--quick", "--skip_flower", "--threads", "1",
           "--json", str(out), "--md", str(tmp_path / "fs.md")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ours"] > 0 and r["baseline"] > 0 for r in rows)
    detail = json.loads(out.with_name("fs.detail.json").read_text())
    case = detail["cases"][0]
    assert case["runs"]["a"]["path"] == "vectorised" and case["runs"]["b"]["path"] == "sequential"
    assert case["max_abs_diff"]["a-b"] < 1e-4  # the head: float32 rounding over 2 rounds
    text = (tmp_path / "fs.md").read_text()
    assert "(a) asymvlm vectorised" in text and "FLOP floor" in text
