"""training/: config parsing, the loop, resume, divergence, checkpoint failures, masks, LoRA, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymvlm.config import ConfigError, load_yaml
from asymvlm.model import AsymVLM
from asymvlm.training import data as data_mod
from asymvlm.training.config import TRAIN_GROUPS, TrainConfig, parse_config
from asymvlm.training.loop import CheckpointWriteError, TrainingDiverged, latest_checkpoint, train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("cache") / "c", 64, dim=16, captions=True)


def config(cache_dir, out, **kw):
    base = dict(
        cache_dir=str(cache_dir),
        hidden_dims=[32],
        max_steps=12,
        batch_size=32,
        save_every=4,
        output_dir=str(out),
        progress=False,
        log_with="none",
        optimizer="adamw",
        lr=1e-2,
        log_every=1,
        eval_every=-1,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def head_weights(model_dir):
    return load_file(Path(model_dir) / "head.safetensors")


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def test_yaml_then_flags_and_unknown_keys(tmp_path):
    y = tmp_path / "exp.yaml"
    y.write_text("family: ps\nmax_steps: 7\nhidden_dims: [64, 32]\noptimizer: adamw\n")
    cfg = parse_config(["--config", str(y), "--max_steps", "9"])
    assert (cfg.head.family, cfg.train.max_steps, cfg.head.hidden_dims, cfg.train.optimizer) == (
        "ps",
        9,
        (64, 32),
        "adamw",
    )
    y.write_text("family: ps\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        load_yaml(y, TRAIN_GROUPS)
    with pytest.raises(ConfigError, match="unknown argument"):
        parse_config(["--nonsense", "1"])
    with pytest.raises(ConfigError, match="invalid choice: 'rmsprop'"):
        parse_config(["--optimizer", "rmsprop"])
    with pytest.raises(ConfigError, match="optimizer='rmsprop' is not one of"):
        TrainConfig.from_dict({"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="unrecognized|unknown argument"):  # no prefix abbreviations
        parse_config(["--max_step", "3"])
    y.write_text("hidden_dims: 64\n")
    with pytest.raises(ConfigError, match="hidden_dims must be a list"):
        parse_config(["--config", str(y)])
    y.write_text("max_steps: 5.7\n")
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        parse_config(["--config", str(y)])
    y.write_text("lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="lr must be a number"):
        parse_config(["--config", str(y)])
    assert parse_config(["--max-steps", "3"]).train.max_steps == 3  # dashes or underscores
    with pytest.raises(ConfigError, match="lr must be a positive"):
        TrainConfig.from_dict({"lr": -1.0})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['bogus'\]"):
        TrainConfig.from_dict({"bogus": 1})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_caption_styles_pick_the_shapeworld_training_styles(tmp_path, monkeypatch, tiny_encoder):
    from asymvlm.config import DataArguments
    from asymvlm.worlds import shapeworld as sw

    data = parse_config(["--caption_styles", "photo, synonyms", "--train_images", "30"]).data
    assert data.styles() == ("photo", "synonyms")
    assert DataArguments().styles() == tuple(sw.CAPTION_STYLES)
    with pytest.raises(ConfigError, match=r"unknown caption_styles \['poetry'\]"):
        parse_config(["--caption_styles", "photo,poetry"])
    monkeypatch.setenv("ASYMVLM_CACHE", str(tmp_path))
    cache = data_mod.cache_for_config(data, tiny_encoder)
    assert "photo+synonyms" in cache.path.name  # its own cache, not the all-styles one
    w = sw.generate_arrays(30, seed=0, caption_styles=("photo", "synonyms"), visual_styles=sw.VISUAL_STYLES)
    assert list(cache.captions) == [c for row in w.captions for c in row]
    full = data_mod.cache_for_config(DataArguments(train_images=30), tiny_encoder)
    assert full.path != cache.path


def test_cli_reports_config_errors(tmp_path, capsys):
    from asymvlm.training.cli import main

    y = tmp_path / "exp.yaml"
    y.write_text("warmup: 3\n")
    assert main(["--config", str(y)]) == 2
    assert "unknown config key(s) ['warmup']" in capsys.readouterr().err
    assert (
        main(
            [
                "--cache_dir",
                str(tmp_path / "missing"),
                "--output_dir",
                str(tmp_path / "o"),
                "--progress",
                "false",
                "--log_with",
                "none",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot use the embedding cache" in err and "missing" in err


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------
def test_trains_saves_and_reloads(cache_dir, tmp_path):
    out = tmp_path / "run"
    model_dir = train(config(cache_dir, out, eval_fraction=0.25, eval_every=6))
    model = AsymVLM.from_pretrained(model_dir)
    assert model.encoder is None and model.dim == 16 and model.family == "vmf"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])
    assert any("eval/t2i_R@1" in r for r in log) and log[-1]["processes"] == 1
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-00000008", "checkpoint-00000012"]  # keep_last = 2, nothing temporary left
    state = json.loads((out / "checkpoints" / "checkpoint-00000012" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["config"]["max_steps"] == 12
    assert (out / "checkpoints" / "checkpoint-00000012" / "trainable.safetensors").is_file()


def test_same_seed_same_weights(cache_dir, tmp_path):
    a = train(config(cache_dir, tmp_path / "a"))
    b = train(config(cache_dir, tmp_path / "b"))
    assert_same(head_weights(a), head_weights(b))
    c = train(config(cache_dir, tmp_path / "c", seed=1))
    assert any(not torch.equal(head_weights(a)[k], head_weights(c)[k]) for k in head_weights(a))


class _Kill(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(cache_dir, tmp_path):
    full = train(config(cache_dir, tmp_path / "full", optimizer="sgd", lr=0.1, warmup_steps=2))

    def dying(cfg, accelerator):
        d = data_mod.get_dataloaders(cfg, accelerator)
        real = d.batches.batch

        def batch(micro, rank=0, world=1):
            if micro == 6:  # dies during step 7, after the checkpoint of step 4
                raise _Kill("SIGKILL")
            return real(micro, rank, world)

        d.batches.batch = batch
        return d

    cfg = config(cache_dir, tmp_path / "resumed", optimizer="sgd", lr=0.1, warmup_steps=2)
    with pytest.raises(_Kill):
        train(cfg, data_fn=dying)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-00000004"
    resumed = train(cfg.replace(resume=True))
    assert_same(head_weights(full), head_weights(resumed))
    a = json.loads((Path(full) / "asymvlm_config.json").read_text())["logit_scale"]
    b = json.loads((Path(resumed) / "asymvlm_config.json").read_text())["logit_scale"]
    assert a == b


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cache_dir, tmp_path):
    def poisoned(cfg, accelerator):
        d = data_mod.get_dataloaders(cfg, accelerator)
        real = d.batches.batch

        def batch(micro, rank=0, world=1):
            b = real(micro, rank, world)
            if micro == 5:
                b["text"] = torch.full_like(b["text"], float("nan"))
            return b

        d.batches.batch = batch
        return d

    with pytest.raises(TrainingDiverged, match=r"at step 6 .*checkpoint-00000004"):
        train(config(cache_dir, tmp_path / "run"), data_fn=poisoned)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-00000004"
    assert not (tmp_path / "run" / "model").exists()


def test_failed_checkpoint_write_keeps_the_previous_one(cache_dir, tmp_path, monkeypatch):
    import asymvlm.training.loop as loop

    real = loop.save_training_state
    calls = {"n": 0}

    def flaky(directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(directory) / "partial.bin").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(loop, "save_training_state", flaky)
    with pytest.raises(CheckpointWriteError, match=r"step 8 .*No space left.*checkpoint-00000004.*is intact"):
        train(config(cache_dir, tmp_path / "run"))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-00000004"]  # no half-written folder
    assert json.loads((root / "checkpoint-00000004" / "trainer_state.json").read_text())["step"] == 4


def test_sparse_masks_freeze_everything_outside(cache_dir, tmp_path):
    start = train(config(cache_dir, tmp_path / "start", max_steps=2))
    before = head_weights(start)
    g = torch.Generator().manual_seed(3)
    masks = {f"head.{k}": torch.rand(v.shape, generator=g) < 0.3 for k, v in before.items()}
    save_file(masks, tmp_path / "masks.safetensors")
    after = head_weights(
        train(
            config(
                cache_dir,
                tmp_path / "sparse",
                init_from=str(start),
                weight_decay=0.1,
                mask_file=str(tmp_path / "masks.safetensors"),
                optimizer="sgd",
                lr=0.5,
            )
        )
    )
    for k, v in before.items():
        m = masks[f"head.{k}"]
        assert torch.equal(after[k][~m], v[~m]), k  # not a single bit moved outside the mask
        assert not torch.equal(after[k][m], v[m]), k
    save_file({"head.nope": torch.ones(2, dtype=torch.bool)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="mask names not among the trained parameters"):
        train(config(cache_dir, tmp_path / "bad", mask_file=str(tmp_path / "bad.safetensors")))


def test_gradient_accumulation_steps_once_per_accumulated_batch(cache_dir, tmp_path, monkeypatch):
    from asymvlm.batching import IndexBatcher

    seen = []
    real = IndexBatcher.batch

    def spy(self, micro, rank=0, world=1):
        seen.append(micro)
        return real(self, micro, rank, world)

    monkeypatch.setattr(IndexBatcher, "batch", spy)
    out = tmp_path / "acc"
    train(
        config(
            cache_dir,
            out,
            gradient_accumulation_steps=3,
            max_steps=4,
            save_every=0,
            warmup_steps=4,
            scheduler="constant",
            optimizer="sgd",
            lr=0.1,
        )
    )
    assert seen == list(range(12))  # 4 optimizer steps x 3 micro-batches, each a fresh slice of the data
    lrs = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 0.075, 0.1, 0.1])  # the schedule advances once per optimizer step


def test_bf16_mixed_precision_runs(cache_dir, tmp_path):
    out = tmp_path / "bf16"
    train(config(cache_dir, out, mixed_precision="bf16", max_steps=3))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out))


def test_dimension_mismatch_and_missing_cache(cache_dir, tmp_path):
    from asymvlm.heads import TextHead

    AsymVLM(TextHead(dim=24, hidden_dims=(8,))).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="dimension 24, the embeddings have 16"):
        train(config(cache_dir, tmp_path / "run", init_from=str(tmp_path / "other")))
    with pytest.raises(FileNotFoundError, match="cannot use the embedding cache"):
        train(config(tmp_path / "nowhere", tmp_path / "run2"))


def test_batches_are_a_function_of_the_step():
    from asymvlm.batching import IndexBatcher

    text = torch.arange(10).float().unsqueeze(1)
    b = IndexBatcher(text, torch.zeros(10, 1), torch.arange(10), batch_size=4, seed=0)
    assert b.num_batches == 2  # 10 // 4: each epoch leaves out 2 rows of its permutation
    for epoch in range(3):
        rows = torch.cat([b.global_rows(2 * epoch + k) for k in range(2)])
        assert len(set(rows.tolist())) == 8  # no caption twice in an epoch (nor in a batch)
        assert torch.equal(rows, b._perm(epoch)[:8])
    again = IndexBatcher(text, torch.zeros(10, 1), torch.arange(10), batch_size=4, seed=0)
    assert torch.equal(again.global_rows(3), b.global_rows(3))
    halves = torch.cat([b.batch(2, 0, 2)["ids"], b.batch(2, 1, 2)["ids"]])
    assert torch.equal(halves, b.global_rows(2))
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        b.batch(0, 0, 3)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
        IndexBatcher(text, torch.zeros(10, 1), torch.arange(10), batch_size=11, seed=0)


def test_identical_captions_of_different_images_are_positives():
    """Positives by caption identity as well as image identity, over the whole data: caption
    "a shape" of image 0 is true of image 2 because image 2 has the caption "a shape" too, even
    when that caption is not in the batch. Reference: a brute-force set of (text, image) pairs."""
    from asymvlm.batching import IndexBatcher, caption_groups

    captions = ["a shape", "red square", "a shape", "blue circle", "green star", "a shape", "red square", "x"]
    owner = torch.tensor([0, 0, 2, 2, 3, 4, 5, 1])
    true_of = {(c, int(i)) for c, i in zip(captions, owner)}
    text = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = IndexBatcher(
        text, torch.eye(6, 4), owner, batch_size=4, seed=1, text_groups=caption_groups(captions), caption_scope="data"
    )
    for step in range(6):
        rows = b.global_rows(step).tolist()
        want = torch.tensor([[(captions[a], int(owner[c])) in true_of for c in rows] for a in rows])
        got = b.batch(step)["positives"]
        assert torch.equal(got, want), (step, rows)
        assert got.diagonal().all()
    # caption_scope="batch" (the default): only identical captions *in the batch* count
    local = IndexBatcher(text, torch.eye(6, 4), owner, batch_size=4, seed=1, text_groups=caption_groups(captions))
    for step in range(6):
        rows = local.global_rows(step).tolist()
        want = torch.tensor([[owner[a] == owner[c] or captions[a] == captions[c] for c in rows] for a in rows])
        assert torch.equal(local.batch(step)["positives"], want)
    # default "identical": identical rows are one caption; None: image ids only
    same = text.clone()
    same[2], same[5] = same[0], same[0]
    auto = IndexBatcher(same, torch.eye(6, 4), owner, batch_size=8, seed=0)
    by_caption = IndexBatcher(same, torch.eye(6, 4), owner, batch_size=8, seed=0, text_groups=caption_groups(
        ["a", "b", "a", "c", "d", "a", "e", "f"]))  # fmt: skip
    assert torch.equal(auto.batch(0)["positives"], by_caption.batch(0)["positives"])
    ids = owner[auto.global_rows(0)]
    plain = IndexBatcher(same, torch.eye(6, 4), owner, batch_size=8, seed=0, text_groups=None)
    assert torch.equal(plain.batch(0)["positives"], ids[:, None] == ids[None, :])
    assert not torch.equal(auto.batch(0)["positives"], plain.batch(0)["positives"])


# ------------------------------------------------------------------------------------------
# LoRA on the text tower
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_lora_mode_trains_saves_in_peft_format_and_reloads(backend, tmp_path, tiny_open_clip_dir, tiny_hf_dirs):
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.worlds import shapeworld as sw

    spec = str(tiny_open_clip_dir) if backend == "open_clip" else f"hf:{tiny_hf_dirs['clip']}"
    base = load_encoder(spec)
    cache = embed_dataset(base, sw.generate(48, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    cfg = config(
        cache.path,
        tmp_path / "run",
        trainable="both",
        encoder=spec,
        pretrained="",
        lora_r=4,
        max_steps=4,
        batch_size=16,
        lr=5e-2,
    )
    model_dir = train(cfg)
    files = sorted(p.name for p in (model_dir / "text_adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    adapter = load_file(model_dir / "text_adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert not any("visual" in k or "vision" in k for k in adapter)  # text tower only
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    model = AsymVLM.from_pretrained(model_dir)
    texts = ["a red circle", "a big blue square in the top left"]
    adapted = model.text_embeddings(texts)
    assert not torch.allclose(adapted, base.encode_text(texts))  # the adapter changes the text tower
    again = AsymVLM.from_pretrained(model_dir)
    torch.testing.assert_close(again.text_embeddings(texts), adapted)
    model.save_pretrained(tmp_path / "copy")  # a loaded (merged) adapter is saved again
    torch.testing.assert_close(AsymVLM.from_pretrained(tmp_path / "copy").text_embeddings(texts), adapted)


# ------------------------------------------------------------------------------------------
# two processes
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_cpu_processes_train_the_same_model_as_one(cache_dir, tmp_path):
    bin_dir = Path(sys.executable).parent
    common = (
        f"cache_dir: {cache_dir}\nhidden_dims: [32]\nmax_steps: 6\nbatch_size: 32\nsave_every: 0\n"
        f"progress: false\nlog_with: none\noptimizer: sgd\nlr: 0.1\n"
    )
    (tmp_path / "exp.yaml").write_text(common)  # the README's command: --config exp.yaml --output_dir ...
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(bin_dir / "asymvlm-train"), "--config", str(tmp_path / "exp.yaml"), "--output_dir", str(tmp_path / "one")],
        check=True,
        env=env,
        capture_output=True,
    )
    launch = [
        str(bin_dir / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "--no_python",
        str(bin_dir / "asymvlm-train"),
        "--config",
        str(tmp_path / "exp.yaml"),
        "--output_dir",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["processes"] == 2
    one = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    assert_same(head_weights(tmp_path / "one" / "model"), head_weights(tmp_path / "two" / "model"), atol=1e-6)


def test_cache_for_config_reuses_a_checked_cache_without_regenerating(tmp_path, monkeypatch, tiny_encoder):
    """Within a process a ShapeWorld cache already built is loaded without generating the split
    again; another cache root, seed or style set is another cache."""
    from asymvlm.config import DataArguments
    from asymvlm.worlds import data as data_mod
    from asymvlm.worlds import shapeworld as sw

    monkeypatch.setenv("ASYMVLM_CACHE", str(tmp_path / "root-a"))
    args = DataArguments(train_images=12, data_seed=3)
    first = data_mod.cache_for_config(args, tiny_encoder)
    calls = []
    real = sw.generate
    monkeypatch.setattr(sw, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = data_mod.cache_for_config(args, tiny_encoder)
    assert calls == [] and again.path == first.path
    assert torch.equal(again.text_embeddings, first.text_embeddings)
    data_mod.cache_for_config(DataArguments(train_images=12, data_seed=4), tiny_encoder)
    assert calls == [1]
    monkeypatch.setenv("ASYMVLM_CACHE", str(tmp_path / "root-b"))  # another root: built there
    other = data_mod.cache_for_config(args, tiny_encoder)
    assert calls == [1, 1] and str(other.path).startswith(str(tmp_path / "root-b"))


def test_saved_hf_adapter_loads_in_peft_without_glue(tmp_path, tiny_hf_dirs):
    """The text adapter's config names its base model, so peft's own loaders rebuild the adapted
    tower: ``PeftModel.from_pretrained(AutoModel...)`` and ``AutoPeftModel.from_pretrained(dir)``
    give the text features asymvlm computes (before the head)."""
    import json

    from peft import AutoPeftModel, PeftModel
    from transformers import AutoModel, AutoTokenizer

    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.worlds import shapeworld as sw

    base_path = str(tiny_hf_dirs["clip"])
    spec = f"hf:{base_path}"
    cache = embed_dataset(load_encoder(spec), sw.generate(48, seed=0), tmp_path / "cache", dtype="float32",
                          progress=False)  # fmt: skip
    cfg = config(cache.path, tmp_path / "run", trainable="both", encoder=spec, pretrained="", lora_r=4, max_steps=4,
                 batch_size=16, lr=5e-2)  # fmt: skip
    adapter_dir = train(cfg) / "text_adapter"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == base_path
    texts = ["a red circle", "a big blue square in the top left"]
    ours = AsymVLM.from_pretrained(adapter_dir.parent).text_embeddings(texts)
    tok = AutoTokenizer.from_pretrained(base_path)
    batch = tok(texts, padding=True, return_tensors="pt")
    for peft_model in (
        PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), str(adapter_dir)),
        AutoPeftModel.from_pretrained(str(adapter_dir)),
    ):
        with torch.no_grad():
            feats = peft_model.get_text_features(**batch)
        feats = getattr(feats, "pooler_output", feats)
        torch.testing.assert_close(torch.nn.functional.normalize(feats, dim=-1), ours, rtol=1e-4, atol=1e-5)
