"""asymvlm-demo --quick: the whole pipeline end to end on a small toy CLIP (what CI runs)."""

import json
import math

import pytest


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path, monkeypatch, capsys, quick_toy_cache):
    from asymvlm.training.demo import main

    monkeypatch.setenv("ASYMVLM_CACHE", str(quick_toy_cache))  # the --quick toy CLIP, built once per session
    assert main(["--quick", "--clients", "4", "--output_dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    numbers = {
        "uncertainty_ambiguity_spearman": ("vmf", "ps"),
        "r1_uncertainty_pearson": ("vmf", "ps"),
        "t2i_r1": ("clip", "vmf", "ps"),
        "i2t_r1": ("clip", "vmf", "ps"),
        "federated_t2i_r1": ("centralized", "fedavg", "fedadam"),
        "merged_normalized_r1": ("task_arithmetic", "ties", "talos"),
    }
    for key, names in numbers.items():
        assert set(names) <= set(report[key]), key
        assert all(isinstance(report[key][n], float) and math.isfinite(report[key][n]) for n in names), key
    for fam in ("vmf", "ps"):
        levels = report["uncertainty_by_level"][fam]
        assert len(levels) == 5 and all(u > 0 for u in levels)
    assert report["seconds"] > 0
    assert (report["settings"]["clients"], report["settings"]["lora_mode"]) == (4, "residual")
    for png in ("r1_by_uncertainty.png", "uncertainty_by_level.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "4 clients" in out and "federated-fedadam" in out and "merged-ties" in out and "done in" in out
