"""The demo's report records what its figures depend on besides the code (issue 26, defect 11):
package versions, the encoder's weights fingerprint and how this machine built the toy CLIP, the
seeds, the machine (CPU model and kernel-selecting flags, torch's threads) and the date."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
from pathlib import Path
from types import SimpleNamespace

import torch


def test_provenance_records_packages_encoder_seeds_machine_and_date(tmp_path):
    from asymvlm.training.demo import EVAL_SEEDS, PROVENANCE_PACKAGES, provenance

    toy = tmp_path / "toy-clip" / "0123456789abcdef"
    toy.mkdir(parents=True)
    recipe = {"recipe": {"steps": 2600, "threads": 2, "seed": 0}, "build_seconds": 240.5, "torch": "2.x"}
    (toy / "recipe.json").write_text(json.dumps({**recipe, "fingerprint": "0123456789abcdef"}))

    p = provenance(SimpleNamespace(fingerprint="feedfacecafebeef"), 3, toy)

    for name in PROVENANCE_PACKAGES:  # every listed distribution: its installed version, or None
        try:
            expected = md.version(name)
        except md.PackageNotFoundError:
            expected = None
        assert p["packages"][name] == expected, name
    assert p["packages"]["torch"] is not None and p["packages"]["asymvlm"] is not None
    assert p["encoder"]["fingerprint"] == "feedfacecafebeef"
    assert p["encoder"]["toy_clip"] == {"directory": "0123456789abcdef", **recipe}
    assert p["seeds"]["run"] == 3 and p["seeds"]["data"] == 3 and p["seeds"]["merge_domains"] == 4
    assert {k: p["seeds"][k] for k in EVAL_SEEDS} == EVAL_SEEDS
    m = p["machine"]
    assert m["torch_threads"] == torch.get_num_threads() and m["mkldnn"] == torch.backends.mkldnn.is_available()
    assert m["python"] and m["platform"] and isinstance(m["cpu_count"], int)
    if Path("/proc/cpuinfo").is_file():  # Linux: the model and which kernel-selecting flags it has
        assert isinstance(m["cpu_model"], str) and isinstance(m["cpu_flags"], list)
    stamp = datetime.datetime.fromisoformat(p["date"])
    assert stamp.tzinfo is not None and abs(datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds() < 600
    # shareable: JSON, and no path of this machine in it
    text = json.dumps(p)
    assert str(tmp_path) not in text and str(Path.home()) + "/" not in text


def test_provenance_without_a_toy_clip_record(tmp_path):
    """An encoder that is not the toy CLIP, or a toy CLIP directory without (or with a broken)
    recipe.json: the fingerprint is still recorded and nothing fails."""
    from asymvlm.training.demo import provenance

    assert provenance(SimpleNamespace(fingerprint="f"), 0)["encoder"] == {"fingerprint": "f", "toy_clip": None}
    (tmp_path / "recipe.json").write_text("{not json")
    p = provenance(SimpleNamespace(fingerprint="f"), 0, tmp_path)
    assert p["encoder"]["toy_clip"] == {"directory": tmp_path.name}
