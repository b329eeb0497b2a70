"""Speed options of the training loop (issue 30): the optimizer kernel, bf16 of a head (MLP only, loss
in float32) against float32, compile's config check, and the FLOP count of bench/train_throughput.py.
No timing asserts: the speed itself is measured by bench/train_throughput.py."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asymvlm.config import ConfigError
from asymvlm.heads import HeadConfig
from asymvlm.training.config import TrainConfig, optimizer_kernel
from asymvlm.training.loop import train

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("cache") / "c", 128, dim=64)


def run(cache_dir, out, **kw):
    base = dict(
        cache_dir=str(cache_dir),
        hidden_dims=[128, 128],
        max_steps=60,
        batch_size=64,
        save_every=0,
        output_dir=str(out),
        progress=False,
        log_with="none",
        lr=1e-3,
        log_every=1,
        eval_every=-1,
        fit_confidence=False,
    )
    base.update(kw)
    train(TrainConfig.from_dict(base))
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_optimizer_kernel_choices():
    assert optimizer_kernel("auto", "cpu") == {"fused": True}  # torch >= 2.4 has fused CPU AdamW / SGD
    assert optimizer_kernel("fused", "cpu") == {"fused": True}
    assert optimizer_kernel("foreach", "cpu") == {"foreach": True}
    assert optimizer_kernel("for-loop", "cpu") == {"foreach": False}
    with pytest.raises(ConfigError, match="optimizer_impl"):
        optimizer_kernel("turbo", "cpu")
    with pytest.raises(ConfigError, match="optimizer_impl"):
        TrainConfig.from_dict({"optimizer_impl": "turbo"})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_kernel_trains_like_for_loop(cache_dir, tmp_path, optimizer):
    """The default (fused) against torch's CPU default (for-loop): SGD bit-identical; fused AdamW
    differs in the last bits only (measured: ~1e-7 relative per step), so the loss curves agree to 1e-5."""
    a = run(cache_dir, tmp_path / "fused", optimizer=optimizer, max_steps=20)
    b = run(cache_dir, tmp_path / "loop", optimizer=optimizer, max_steps=20, optimizer_impl="for-loop")
    la, lb = (torch.tensor([r["loss"] for r in x], dtype=torch.float64) for x in (a, b))
    if optimizer == "sgd":
        assert torch.equal(la, lb)
    else:
        assert torch.allclose(la, lb, rtol=1e-5, atol=0)


def test_bf16_loss_curve_follows_float32(cache_dir, tmp_path):
    """bf16 of a head runs its MLP under bf16 autocast and the loss in float32: the loss curve stays
    within 1% of float32's at every step (measured at d=64: < 0.1%; accelerate's autocast of the
    whole forward, loss included, was 4% off here and 18% at the start with d=512). The saved
    heads agree to bf16 training noise."""
    fp32 = run(cache_dir, tmp_path / "fp32")
    bf16 = run(cache_dir, tmp_path / "bf16", mixed_precision="bf16")
    a, b = (torch.tensor([r["loss"] for r in x], dtype=torch.float64) for x in (fp32, bf16))
    assert a[-1] < 0.7 * a[0]  # it trained
    assert ((a - b).abs() / a).max() < 0.01
    assert a[0] == pytest.approx(float(b[0]), rel=1e-3)  # step 1: only the MLP's bf16 rounding
    ka, kb = (torch.tensor([r["kappa_median"] for r in x], dtype=torch.float64) for x in (fp32, bf16))
    assert ((ka - kb).abs() / ka).max() < 0.02


def test_bf16_head_saved_and_resumed_exactly(cache_dir, tmp_path):
    """The bf16 wrapper leaves no trace on the parameters' names: a bf16 run resumed from its
    checkpoint ends bit-identical to an uninterrupted one."""
    full = run(cache_dir, tmp_path / "full", mixed_precision="bf16", max_steps=8, save_every=4)
    part = tmp_path / "part"
    run(cache_dir, part, mixed_precision="bf16", max_steps=8, save_every=4)
    shutil.rmtree(part / "checkpoints" / "checkpoint-00000008")  # as if killed after step 4's checkpoint
    (part / "train_log.jsonl").unlink()
    resumed = run(cache_dir, part, mixed_precision="bf16", max_steps=8, save_every=4, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]
    a = load_file(tmp_path / "full" / "model" / "head.safetensors")
    b = load_file(part / "model" / "head.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compile_is_for_head_training():
    with pytest.raises(ConfigError, match="compile is for trainable=head"):
        TrainConfig.from_dict({"compile": True, "trainable": "lora"})


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_train_throughput", BENCH / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_head_train_flops_hand_count(throughput):
    """4 -> 8 -> 4 head at batch 10. Forward 2*(4*8 + 8*4) = 128 per sample; backward: weight
    gradients 128, input gradient of the second layer only 2*8*4 = 64; logits 2*10*4 = 80 forward,
    and 80 more backward with a learned direction."""
    frozen = HeadConfig(dim=4, hidden_dims=(8,))
    learned = HeadConfig(dim=4, hidden_dims=(8,), direction="learned")
    assert throughput.head_train_flops(frozen, 10) == 128 + 128 + 64 + 80
    assert throughput.head_train_flops(learned, 10) == 128 + 128 + 64 + 160
    paper = HeadConfig(dim=512)  # 512-1024-1024-1024-512
    mlp = 6 * (512 * 1024 + 1024 * 1024 * 2 + 1024 * 512) - 2 * 512 * 1024
    assert throughput.head_train_flops(paper, 2048) == mlp + 2 * 2048 * 512
    assert throughput.gemm_floor(torch.float32, n=32, repeat=1) > 0
