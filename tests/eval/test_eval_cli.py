"""asymvlm-eval end to end on a tiny model (ShapeWorld and a local image folder)."""

import json

import torch

from asymvlm.encoders import load_encoder
from asymvlm.eval.cli import main
from asymvlm.heads import TextHead
from asymvlm.model import AsymVLM


def test_eval_cli_on_shapeworld_writes_metrics_and_plots(tmp_path, tiny_open_clip_dir, capsys):
    torch.manual_seed(0)
    enc = load_encoder(str(tiny_open_clip_dir))
    for family in ("vmf", "ps"):
        AsymVLM(TextHead(dim=32, family=family, hidden_dims=(16,), residual=True), enc).save_pretrained(
            tmp_path / family
        )
    rc = main(
        [
            "--model",
            str(tmp_path / "vmf"),
            "--model",
            str(tmp_path / "ps"),
            "--images",
            "60",
            "--bins",
            "4",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(doc["metrics"]) == {"clip", "vmf", "ps"} and doc["images"] == 60
    vmf = doc["metrics"]["vmf"]
    for key in (
        "t2i_R@1",
        "i2t_R@5",
        "consistent_t2i_R@1",
        "bin_recall",
        "bin_spearman",
        "error_auroc",
        "uncertainty_ambiguity_spearman",
        "uncertainty_by_level",
        "zeroshot_shape_accuracy",
        "zeroshot_colour_aurc",
        "t2i_R@1_level4",
        "consistent_t2i_R@1_level0",
    ):
        assert key in vmf, key
    assert "bin_recall" not in doc["metrics"]["clip"]
    for png in ("r1_by_uncertainty.png", "uncertainty_by_level.png", "risk_coverage.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "clip" in out and "vmf" in out and "metrics.json" in out


def test_eval_cli_baseline_on_an_image_folder(tmp_path, tiny_open_clip_dir, make_images):
    root = tmp_path / "folder"
    root.mkdir()
    lines = []
    for i, im in enumerate(make_images(6)):
        im.save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "captions": [f"image {i}", "a photo"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    rc = main(
        [
            "--encoder",
            str(tiny_open_clip_dir),
            "--dataset",
            f"imagefolder:{root}",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(doc["metrics"]) == {"clip"} and doc["images"] == 6
    assert "consistent_t2i_R@1" not in doc["metrics"]["clip"]  # no ground truth outside ShapeWorld


def test_models_that_adapt_the_text_tower_are_evaluated_on_their_own_text(tmp_path, tiny_open_clip_dir, capsys):
    """A federated/LoRA model folds updates into the text tower: asymvlm-eval and evaluate() must embed
    the captions (and zero-shot prompts) with the adapted tower, not reuse the frozen embeddings."""
    import dataclasses

    import pytest

    from asymvlm.eval.benchmark import evaluate, shapeworld_eval_data

    torch.manual_seed(0)
    frozen = load_encoder(str(tiny_open_clip_dir))
    head = TextHead(dim=32, family="vmf", hidden_dims=(16,), residual=True)
    weight = dict(frozen.model.named_parameters())["token_embedding.weight"]
    delta = {"token_embedding.weight": 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))}
    AsymVLM(head, frozen, text_base_delta=delta).save_pretrained(tmp_path / "fed")
    assert (
        main(["--model", str(tmp_path / "fed"), "--images", "40", "--bins", "4", "--output_dir", str(tmp_path / "o")])
        == 0
    )
    got = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["fed"]

    from asymvlm.worlds import shapeworld as sw

    world = dict(caption_styles=sw.CAPTION_STYLES, visual_styles=sw.VISUAL_STYLES)
    data = shapeworld_eval_data(frozen, n=40, seed=12345, **world)  # the CLI's split
    adapted = load_encoder(str(tiny_open_clip_dir))
    with torch.no_grad():
        dict(adapted.model.named_parameters())["token_embedding.weight"].add_(delta["token_embedding.weight"])
    own = dataclasses.replace(
        data,
        text_embeddings=adapted.encode_text(data.captions),
        zero_shot={
            t: (adapted.encode_text(data.zero_shot_prompts[t]), n, y) for t, (_, n, y) in data.zero_shot.items()
        },
    )
    plain = AsymVLM(head, None)
    want = evaluate(own, {"fed": plain}, n_bins=4, include_clip=False)["fed"]
    stale = evaluate(data, {"fed": plain}, n_bins=4, include_clip=False)["fed"]
    for key in ("t2i_R@1", "i2t_R@1", "uncertainty_ambiguity_spearman", "zeroshot_shape_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert any(
        abs(got[k] - stale[k]) > 1e-6 for k in ("uncertainty_ambiguity_spearman", "t2i_mean_rank", "i2t_mean_rank")
    )
    with pytest.warns(UserWarning, match="adapts the text tower"):
        loaded = AsymVLM.from_pretrained(tmp_path / "fed", load_encoder=False)
    assert loaded.adapts_text_tower
    with pytest.raises(ValueError, match="adapts the text tower"):
        evaluate(data, {"fed": loaded}, include_clip=False)
