"""What real collections and real text towers met (issue 14): a text-only encoder spec, evaluation
on precomputed embeddings, batch sizes larger than the data, concentration statistics in the log."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_text_only_encoder_is_mean_pooled_and_refuses_images(tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    from asymvlm.encoders import HFTextEncoder, load_encoder, parse_spec

    assert parse_spec(f"hf-text:{tiny_bert_dir}") == ("hf-text", str(tiny_bert_dir))
    enc = load_encoder(f"hf-text:{tiny_bert_dir}")
    assert isinstance(enc, HFTextEncoder) and enc.dim == 24
    texts = ["a red circle", "a big blue square left of a green triangle"]
    got = enc.encode_text(texts)
    # reference: transformers directly, mean over the attention mask (sentence-transformers' pooling)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert_dir), AutoModel.from_pretrained(tiny_bert_dir).eval()
    ref = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding at all
            ids = tok([t], return_tensors="pt")
            ref.append(F.normalize(model(**ids).last_hidden_state.mean(1), dim=-1))
    torch.testing.assert_close(got, torch.cat(ref), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="text-only encoder: it embeds no images.*write_cache"):
        enc.encode_image(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pretrained= is for open_clip"):
        load_encoder(f"hf-text:{tiny_bert_dir}", pretrained="x")
    assert enc.fingerprint == load_encoder(f"hf-text:{tiny_bert_dir}").fingerprint


def _precomputed_cache(path, n_img=12, per=2, d=16, seed=0):
    from asymvlm.cache import write_cache

    img = unit(n_img, d, seed).float()
    owner = torch.arange(n_img).repeat_interleave(per)
    txt = F.normalize(img[owner] + 0.3 * unit(n_img * per, d, seed + 1).float(), dim=-1)
    levels = [0, 1] * n_img
    amb = [float(n_img), 1.0] * n_img
    caps = [f"caption {i}" for i in range(n_img * per)]
    write_cache(path, img, txt, owner, captions=caps, caption_meta={"level": levels, "ambiguity": amb})
    return img, txt, owner


def test_asymvlm_eval_on_a_precomputed_cache(tmp_path, capsys):
    from asymvlm import AsymVLM, TextHead
    from asymvlm.eval import cli

    img, txt, owner = _precomputed_cache(tmp_path / "cache")
    model = AsymVLM(TextHead(dim=16, hidden_dims=(8,)), encoder_source={"spec": None, "fingerprint": None, "dim": 16})
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    assert cli.main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "cache"), "--output_dir", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["dataset"] == f"cache:{tmp_path / 'cache'}" and report["images"] == 12
    clip, m = report["metrics"]["clip"], report["metrics"]["m"]
    # the frozen baseline, by hand: rank of the own image among all 12 (pessimistic ties)
    s = txt @ img.T
    hits = (s > s.gather(1, owner[:, None])).sum(1) == 0
    assert clip["t2i_R@1"] == pytest.approx(float(hits.double().mean()), abs=1e-12)
    assert m["t2i_R@1"] == clip["t2i_R@1"]  # direction="frozen": exactly the frozen ranking
    assert set(m) >= {"t2i_R@1_level0", "t2i_R@1_level1", "uncertainty_ambiguity_spearman", "uncertainty_by_level"}
    # --images keeps the first images and only their captions
    assert cli.main(["--cache", str(tmp_path / "cache"), "--images", "5", "--output_dir", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["images"] == 5
    capsys.readouterr()
    assert cli.main(["--cache", str(tmp_path / "cache"), "--dataset", "shapeworld"]) == 2
    assert "give --cache or --dataset, not both" in capsys.readouterr().err


def test_eval_cache_refuses_a_model_of_another_encoder(tmp_path, capsys):
    from asymvlm import AsymVLM, TextHead
    from asymvlm.cache import write_cache
    from asymvlm.eval import cli

    img = unit(4, 8, 0).float()
    write_cache(tmp_path / "c", img, img, torch.arange(4), encoder={"spec": "x", "fingerprint": "aaa"})
    AsymVLM(
        TextHead(dim=8, hidden_dims=(4,)), encoder_source={"spec": "y", "fingerprint": "bbb", "dim": 8}
    ).save_pretrained(tmp_path / "m")
    assert (
        cli.main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "c"), "--output_dir", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on another encoder" in err and "Traceback" not in err


def test_caption_meta_is_validated(tmp_path):
    from asymvlm.cache import EmbeddingCache, write_cache
    from asymvlm.errors import ArtefactError

    img = unit(3, 8, 0).float()
    with pytest.raises(ValueError, match=r"unknown caption_meta key\(s\) \['levels'\]"):
        write_cache(tmp_path / "c", img, img, torch.arange(3), caption_meta={"levels": [0, 1, 2]})
    with pytest.raises(ValueError, match="has 2 entries for 3 texts"):
        write_cache(tmp_path / "c", img, img, torch.arange(3), caption_meta={"level": [0, 1]})
    write_cache(tmp_path / "c", img, img, torch.arange(3), caption_meta={"ambiguity": [1, 2, 3]})
    (tmp_path / "c" / "caption_meta.json").write_text(json.dumps({"ambiguity": [1, 2, "x"]}))
    with pytest.raises(ArtefactError, match="caption_meta.json: 'ambiguity' holds a non-number"):
        EmbeddingCache.load(tmp_path / "c")
    (tmp_path / "c" / "caption_meta.json").write_text(json.dumps({"ambiguity": [1, 0, 3]}))
    with pytest.raises(ArtefactError, match="'ambiguity' must be positive"):
        EmbeddingCache.load(tmp_path / "c")


def test_small_collection_caps_the_batch_and_logs_concentrations(tmp_path, caplog):
    """batch_size 2048 on 24 captions: capped with a warning (no caption twice in a batch); the
    log has the temperature and the batch's min/median/max concentration, which match the head."""
    from asymvlm import AsymVLM
    from asymvlm.training.config import parse_config
    from asymvlm.training.loop import train

    _precomputed_cache(tmp_path / "cache")
    cfg = parse_config(
        ["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"), "--max_steps", "6",
         "--hidden_dims", "8", "--log_every", "1", "--eval_every", "-1", "--no_progress", "--log_with", "none"]
    )  # fmt: skip
    assert cfg.train.batch_size == 2048 and cfg.train.optimizer == "adamw" and cfg.train.warmup == 0
    with caplog.at_level(logging.WARNING, logger="asymvlm.training.data"):
        model_dir = train(cfg)
    assert "batch_size 2048 exceeds the 24 training captions; using 24" in caplog.text
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    last = log[-1]
    assert last["temperature"] == pytest.approx(math.exp(-last["logit_scale"]), rel=1e-12)
    assert last["kappa_min"] <= last["kappa_median"] <= last["kappa_max"]
    model = AsymVLM.from_pretrained(model_dir, load_encoder=False)
    assert model.head.config.direction == "frozen"
    assert len({r["kappa_median"] for r in log}) > 1  # the concentration moves as it trains


def test_warmup_ratio_and_steps():
    from asymvlm.errors import ConfigError
    from asymvlm.training.config import parse_config

    assert parse_config(["--max_steps", "1000"]).train.warmup == 50
    assert parse_config(["--max_steps", "1000", "--warmup_steps", "7"]).train.warmup == 7
    assert parse_config(["--max_steps", "1000", "--warmup_ratio", "0"]).train.warmup == 0
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\)"):
        parse_config(["--warmup_ratio", "1.5"])


def test_old_saved_heads_load_with_the_papers_direction(tmp_path):
    """A model saved before ``direction`` existed has a learned direction; loading keeps it."""
    from asymvlm import AsymVLM, TextHead

    AsymVLM(TextHead(dim=8, hidden_dims=(4,), direction="learned")).save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "asymvlm_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["head"]["direction"]
    cfg_path.write_text(json.dumps(cfg))
    assert AsymVLM.from_pretrained(tmp_path / "m", load_encoder=False).head.config.direction == "learned"


@pytest.mark.parametrize(
    "mode,scope,grouped", [("batch", "batch", True), ("data", "data", True), ("none", "batch", False)]
)
def test_caption_positives_reach_the_batches(tmp_path, mode, scope, grouped):
    from types import SimpleNamespace

    from asymvlm.training.config import parse_config
    from asymvlm.training.data import get_dataloaders

    _precomputed_cache(tmp_path / "cache")
    cfg = parse_config(
        ["--cache_dir", str(tmp_path / "cache"), "--caption_positives", mode, "--batch_size", "8", "--eval_every", "-1"]
    )
    accelerator = SimpleNamespace(num_processes=1, is_main_process=True, device=torch.device("cpu"))
    accelerator.main_process_first = lambda: __import__("contextlib").nullcontext()
    batches = get_dataloaders(cfg, accelerator).batches
    assert batches.caption_scope == scope and (batches.groups is not None) == grouped and batches.batch_size == 8
