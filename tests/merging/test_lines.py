"""LiNeS (merging.lines) against a NumPy transcription of the published scaling, after several methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymvlm.errors import ConfigError
from asymvlm.federated.core import Sum
from asymvlm.merging.api import _check_arguments
from asymvlm.merging.lines import LinesScaled, block_index, lines_scales
from asymvlm.merging.methods import make_method, merge_params

SHAPES = {
    "embed.weight": (6, 4),
    "blocks.0.attn.weight": (4, 4),
    "blocks.0.attn.bias": (4,),
    "blocks.1.mlp.weight": (4, 4),
    "blocks.2.mlp.weight": (4, 4),
    "blocks.3.mlp.weight": (4, 4),
    "head.weight": (3, 4),
}


def _taus(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(n)]


def _lines_numpy(merged, taus, beta, num_blocks):
    """Wang et al. 2025 (LiNeS), multi-task rule as in the authors' evaluation code: alpha = the L1
    norm of the summed task vectors / (T * the L1 norm of the merged one); block l of L (the first
    '.i.' of the key, i = 0..L-1) scaled by alpha + beta * l / (L - 1); other keys by alpha."""
    flat = lambda d: np.concatenate([np.ravel(d[k]) for k in SHAPES])  # noqa: E731
    alpha = np.abs(sum(flat(t) for t in taus)).sum() / (len(taus) * np.abs(flat(merged)).sum())
    out = {}
    for k, v in merged.items():
        scale = alpha
        for layer in range(num_blocks):
            if f".{layer}." in k:
                scale = alpha + beta * layer / (num_blocks - 1)
                break
        out[k] = v * scale
    return out


@pytest.mark.parametrize(("method", "opts"), [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("iso_c", {})])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_lines_matches_the_transcription_after_any_method(method, opts, beta):
    taus = _taus()
    base = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    plain = merge_params(base, taus, method, **opts)
    got = merge_params(base, taus, method, lines=beta, **opts)
    np_taus = [{k: v.numpy() for k, v in t.items()} for t in taus]
    ref = _lines_numpy({k: v.numpy() for k, v in plain.items()}, np_taus, beta, 4)
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-12, atol=1e-14)


def test_lines_alpha_makes_the_shallow_update_the_mean_size():
    """With beta 0, the task-arithmetic merge is rescaled to the L1 size of the task vectors' mean."""
    taus = _taus(seed=1)
    out = LinesScaled(Sum(), beta=0.0)(taus).delta
    total = sum(float(sum(t[k] for t in taus).abs().sum()) for k in SHAPES)
    got = sum(float(v.abs().sum()) for v in out.values())
    assert got == pytest.approx(total / len(taus), rel=1e-12)


def test_block_index_and_scales():
    assert block_index("transformer.resblocks.11.mlp.c_fc.weight") == 11
    assert block_index("text_model.encoder.layers.3.self_attn.q_proj.weight") == 3
    assert block_index("mlp.6.bias") == 6
    assert block_index("positional_embedding") is None
    assert block_index("layer10.weight") is None
    s = lines_scales(["a.0.w", "a.1.w", "a.4.w", "z"], alpha=0.5, beta=2.0)
    assert s == {"a.0.w": 0.5, "a.1.w": 1.0, "a.4.w": 2.5, "z": 0.5}
    assert lines_scales(["a.0.w"], alpha=0.5, beta=2.0) == {"a.0.w": 2.5}  # one block: the deepest scale
    assert lines_scales(["a.0.w", "a.1.w"], 1.0, 1.0, blocks=3)["a.1.w"] == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="block 3"):
        lines_scales(["a.3.w"], 1.0, 1.0, blocks=2)


def test_lines_options_are_checked_and_recorded():
    recipe = make_method("ties", lines=0.3, lines_blocks=4)
    assert isinstance(recipe.aggregator, LinesScaled)
    assert recipe.options["lines"] == 0.3 and recipe.options["lines_blocks"] == 4
    assert not isinstance(make_method("ties").aggregator, LinesScaled)
    with pytest.raises(ConfigError, match="lines must be a number"):
        make_method("ties", lines="deep")
    with pytest.raises(ConfigError, match="integer"):
        make_method("ties", lines=0.3, lines_blocks=2.5)
    with pytest.raises(ConfigError, match="finite"):
        make_method("ties", lines=float("nan"))
    with pytest.raises(ConfigError, match="linez"):
        make_method("ties", linez=0.3)
    _check_arguments(["a"], "ties", 1.0, None, {"lines": 0.5}, lam_grid=None, select_by=None, on_flat=None)
    info = LinesScaled(Sum(), beta=1.0)(_taus()).info["lines"]
    assert info["beta"] == 1.0 and info["scales"][1] == pytest.approx(info["alpha"] + 1.0)
