"""The scripts in examples/ run end to end (small sizes; their full-size results are in README.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_core_demo_runs(capsys):
    assert load("core_demo").main(["--steps", "20", "--batch", "128"]) == 0
    out = capsys.readouterr().out
    assert "approx" in out and "done in" in out


@pytest.mark.slow
def test_talos_merging_example_runs(tmp_path, monkeypatch, capsys, quick_toy_cache):
    monkeypatch.setenv("ASYMVLM_CACHE", str(quick_toy_cache))
    argv = ["--train-images", "200", "--eval-images", "60", "--base-steps", "5", "--steps", "5",
            "--hidden", "32", "--calib-batches", "1", "--rounds", "2", "--lam-grid", "0.5,1.0",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert load("talos_merging").main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["seconds"] > 0
    assert "mean norm." in capsys.readouterr().out
