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
        "federated_t2i_r1": ("centralized", "fedavg-iid", "fedavg", "fedadam"),
        "federated_t2i_r1_most_specific": ("centralized", "fedavg-iid", "fedavg", "fedadam"),
        "merged_normalized_r1": ("task_arithmetic", "ties", "dare_ties", "talos"),
        "t2i_r1_most_specific": ("clip", "vmf", "ps"),
    }
    for key, names in numbers.items():
        assert set(names) <= set(report[key]), key
        assert all(isinstance(report[key][n], float) and math.isfinite(report[key][n]) for n in names), key
    for fam in ("vmf", "ps"):
        levels = report["uncertainty_by_level"][fam]
        assert len(levels) == 6 and all(u > 0 for u in levels)  # world v3: six caption levels
    assert report["seconds"] > 0 and report["world_version"] == 3
    assert report["settings"]["clients"] == 4
    # provenance (issue 26): what the figures depend on besides the code
    prov = report["provenance"]
    assert prov["packages"]["torch"] and prov["packages"]["numpy"] and prov["packages"]["asymvlm"]
    assert isinstance(prov["encoder"]["fingerprint"], str) and len(prov["encoder"]["fingerprint"]) >= 12
    assert prov["encoder"]["toy_clip"]["recipe"]["steps"] == report["settings"]["toy_steps"]
    assert prov["seeds"]["run"] == 0 and prov["seeds"]["test"] == 12345
    assert prov["machine"]["torch_threads"] >= 1 and prov["machine"]["python"] and prov["date"]
    assert str(quick_toy_cache) not in json.dumps(prov)  # no local path
    # the federated table: every row carries its grid with validation scores and the chosen options
    rows = {r["name"]: r for r in report["federated_table"]}
    assert set(rows) == {"centralized", "fedavg-iid", "fedavg", "fedadam"}
    for r in rows.values():
        assert r["grid"] and all(math.isfinite(g["val"]) for g in r["grid"])
        assert r["chosen"] in [g["options"] for g in r["grid"]]
    assert rows["fedadam"]["chosen"] == {"server_lr": 0.03, "server_tau": 1e-3}  # the --quick grid's one point
    for png in ("r1_by_uncertainty.png", "uncertainty_by_level.png", "federated.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "4 clients" in out and "merged-dare_ties" in out and "done in" in out
    assert "chance" in out and "fedadam" in out and "server hyperparameters" in out
