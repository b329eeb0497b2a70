"""KnOTS and Core Space LoRA merging (asymvlm.merging.lora_spaces): against NumPy float64 transcriptions of the
authors' algorithms (dense SVD of the concatenation, their TIES), the dense Delta W oracle for task arithmetic,
written adapters loaded by peft, Eckart–Young truncation errors, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from asymvlm.errors import ConfigError
from asymvlm.merging.api import merge
from asymvlm.merging.cli import main
from asymvlm.merging.lora import merge_lora_adapters
from asymvlm.merging.lora_spaces import LoraSpaceMerge, best_rank_factors, merge_lora_factors
from asymvlm.merging.methods import make_method, merge_params
from asymvlm.merging.task_vectors import MergeInputError

SPACES = ("knots", "core_space")


# ------------------------------------------------------------------------------------------------
# NumPy float64 transcriptions of the published algorithms
# ------------------------------------------------------------------------------------------------
def np_ties(x, density, w):
    """TIES as in the authors' code (KnOTS masking_ops / core-space merging_functions): per row the
    (D - int(D density))-th smallest |x| is the threshold (entries >= it kept), the sign of the sum
    (0 -> the sign of the summed signs), the mean of the agreeing entries by count; weights multiply
    the kept entries (the package's convention; the authors' one scalar coefficient is lam)."""
    t, d = x.shape
    if density < 1:
        k = d - int(d * density)
        kth = np.sort(np.abs(x), axis=1)[:, k - 1 : k]
        x = x * (np.abs(x) >= kth)
    sign = np.sign(x.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep = np.where(sign > 0, x > 0, x < 0)
    sel = (x * np.asarray(w)[:, None]) * keep
    return sel.sum(0) / np.maximum(keep.sum(0), 1)


def np_inner(mats, inner, density, w):
    """mats: per task a list of matrices (one per layer): the inner merge over all of them at once."""
    if inner == "task_arithmetic":
        return [sum(wt * m[i] for wt, m in zip(w, mats)) for i in range(len(mats[0]))]
    flat = np.stack([np.concatenate([x.ravel() for x in m]) for m in mats])
    merged, out, start = np_ties(flat, density, w), [], 0
    for x in mats[0]:
        out.append(merged[start : start + x.size].reshape(x.shape))
        start += x.size
    return out


def np_knots(layers, scalings, w, lam, inner, density):
    """KnOTS: dense SVD of [dW_1, ..., dW_T] (nonzero components), task reps S V_t^T, merged over the whole
    model, dW = U merged."""
    us, reps = [], [[] for _ in scalings]
    for f in layers.values():
        n = f[0][0].shape[1]
        cat = np.concatenate([s * b @ a for (a, b), s in zip(f, scalings)], axis=1)  # (m, T n)
        u, sv, vh = np.linalg.svd(cat, full_matrices=False)
        keep = sv > 1e-9 * sv[0]
        u, sv, vh = u[:, keep], sv[keep], vh[keep]
        us.append(u)
        for t in range(len(scalings)):
            reps[t].append(sv[:, None] * vh[:, t * n : (t + 1) * n])
    merged = np_inner(reps, inner, density, w)
    return {k: lam * u @ m for k, u, m in zip(layers, us, merged)}


def np_core_space(layers, scalings, w, lam, inner, density):
    """Core Space: U_B, V_A from the SVDs of the stacked factors, M_t = U_B^T dW_t V_A, merged layer by layer."""
    out = {}
    for k, f in layers.items():
        u_b = np.linalg.svd(np.concatenate([b for _, b in f], axis=1), full_matrices=False)[0]
        vh_a = np.linalg.svd(np.concatenate([a for a, _ in f], axis=0), full_matrices=False)[2]
        cores = [[u_b.T @ (s * b @ a) @ vh_a.T] for (a, b), s in zip(f, scalings)]
        out[k] = lam * u_b @ np_inner(cores, inner, density, w)[0] @ vh_a
    return out


REFERENCE = {"knots": np_knots, "core_space": np_core_space}


def random_layers(seed, ranks=(2, 3, 2), shapes=(("q", 9, 7), ("v", 6, 11))):
    g = torch.Generator().manual_seed(seed)
    return {
        name: [
            (torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64))
            for r in ranks
        ]
        for name, m, n in shapes
    }


def as_numpy(layers):
    return {k: [(a.numpy(), b.numpy()) for a, b in f] for k, f in layers.items()}


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("inner,density", [("ties", 0.2), ("ties", 0.5), ("task_arithmetic", 0.2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_the_numpy_transcription(space, inner, density, weighted):
    layers, scalings = random_layers(0), [0.5, 2.0, 1.0]
    w = [1.0, 0.375, 2.0] if weighted else None  # float32-exact: Ties holds its weights in float32 (see notes)
    out = merge_lora_factors(layers, scalings, space, inner=inner, density=density, weights=w, lam=0.7)
    ref = REFERENCE[space](as_numpy(layers), scalings, w or [1.0] * 3, 0.7, inner, density)
    for k, (a, b) in out.items():
        assert a.dtype == b.dtype == torch.float64
        np.testing.assert_allclose((b @ a).numpy(), ref[k], rtol=0, atol=1e-10 * np.abs(ref[k]).max())


@pytest.mark.parametrize("space", SPACES)
def test_task_arithmetic_is_the_dense_delta_w(space):
    layers, scalings, w, lam = random_layers(1, ranks=(3, 1, 4)), [0.25, 1.5, 1.0], [2.0, -0.5, 1.0], 0.6
    out = merge_lora_factors(layers, scalings, space, inner="task_arithmetic", weights=w, lam=lam)
    for k, f in layers.items():
        oracle = lam * sum(wt * s * b @ a for (a, b), s, wt in zip(f, scalings, w))
        a, b = out[k]
        assert a.shape[0] <= 8  # the merged update has rank <= sum of the ranks
        torch.testing.assert_close(b @ a, oracle, rtol=0, atol=1e-10)
        a8, b8, err, sq = best_rank_factors(a, b, 8)  # the exact adapter of rank sum r_t
        torch.testing.assert_close(b8 @ a8, oracle, rtol=0, atol=1e-10)
        assert err < 1e-12 and sq == pytest.approx(float(oracle.pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
def test_zero_updates_merge_to_zero(space, inner):
    """peft initialises B = 0: a layer no task has moved merges to 0 (KnOTS finds no basis there)."""
    layers = random_layers(5, ranks=(2, 2))
    layers["v"] = [(a, torch.zeros_like(b)) for a, b in layers["v"]]
    layers["q"][1] = (layers["q"][1][0], torch.zeros_like(layers["q"][1][1]))  # one untrained task in "q"
    out = merge_lora_factors(layers, [1.0, 2.0], space, inner=inner, density=1.0, lam=0.5)
    a, b = out["v"]
    assert bool((b @ a == 0).all())
    a4, b4, err, sq = best_rank_factors(a, b, 4)
    assert a4.shape == (4, 11) and b4.shape == (6, 4) and err == sq == 0.0
    (a0, b0), _ = layers["q"]
    a, b = out["q"]  # TIES with density 1 and a single nonzero task: that task
    torch.testing.assert_close(b @ a, 0.5 * b0 @ a0, rtol=0, atol=1e-10)


def test_knots_basis_reproduces_each_task_without_a_dense_svd():
    from asymvlm.merging.lora_spaces import core_space_basis, knots_basis

    f, scalings = random_layers(2)["q"], [1.0, 0.5, 3.0]
    u, sv, vts = knots_basis(f, scalings)
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), rtol=0, atol=1e-12)
    vcat = torch.cat(vts, 1)  # (p, T n): orthonormal rows
    torch.testing.assert_close(vcat @ vcat.T, torch.eye(u.shape[1], dtype=torch.float64), rtol=0, atol=1e-12)
    cat = torch.cat([s * b @ a for (a, b), s in zip(f, scalings)], 1)
    np.testing.assert_allclose(sv.numpy(), np.linalg.svd(cat.numpy(), compute_uv=False)[: sv.numel()], rtol=1e-12)
    u_b, vh_a, cores = core_space_basis(f, scalings)
    for (a, b), s, vt, m in zip(f, scalings, vts, cores):
        torch.testing.assert_close(u * sv @ vt, s * b @ a, rtol=0, atol=1e-12)
        torch.testing.assert_close(u_b @ m @ vh_a, s * b @ a, rtol=0, atol=1e-12)


def test_best_rank_factors_is_eckart_young():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    sv = np.linalg.svd((b @ a).numpy(), compute_uv=False)
    for r in (1, 3, 6, 9):
        ar, br, err, _ = best_rank_factors(a, b, r)
        assert ar.shape == (r, 10) and br.shape == (8, r)
        ref = math.sqrt((sv[r:] ** 2).sum() / (sv**2).sum())
        assert err == pytest.approx(ref, rel=1e-10, abs=1e-14)
        got = float((br @ ar - b @ a).norm() / (b @ a).norm())
        assert got == pytest.approx(ref, rel=1e-8, abs=1e-13)


# ------------------------------------------------------------------------------------------------
# written adapters, loaded by peft
# ------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def base_model():
    torch.manual_seed(0)
    return Tiny()


def make_adapter(path, r, alpha, seed, targets=("fc1", "fc2"), rslora=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, use_rslora=rslora)
    get_peft_model(base_model(), cfg).save_pretrained(str(path))
    return path


def factors_of(adapter_dir):
    """({layer: (A, B)} float64, scaling) straight from the files."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    st = load_file(adapter_dir / "adapter_model.safetensors")
    layers = {}
    for name in ("fc1", "fc2"):
        p = f"base_model.model.{name}"
        layers[p] = (st[f"{p}.lora_A.weight"].double(), st[f"{p}.lora_B.weight"].double())
    return layers, s


def reference_dense(adapters, space, inner, density, lam, w=None):
    """The NumPy transcription on the adapters' factors: {layer: dW} (float64)."""
    read = [factors_of(a) for a in adapters]
    layers = {k: [(a.numpy(), b.numpy()) for a, b in (r[0][k] for r in read)] for k in read[0][0]}
    return REFERENCE[space](layers, [r[1] for r in read], w or [1.0] * len(adapters), lam, inner, density)


def peft_model_of(adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(), str(adapter_dir))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(d / "a1", r=2, alpha=4, seed=1),
        make_adapter(d / "a2", r=3, alpha=6, seed=2, rslora=True),
        make_adapter(d / "a3", r=2, alpha=2, seed=3),
    ]


@pytest.mark.parametrize("space", SPACES)
def test_written_adapter_loads_in_peft_and_holds_the_merge(adapters, tmp_path, space):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    rep = merge(None, adapters, tmp_path / "full", space, lam=0.8, lora_output="svd", density=0.4)
    assert rep["rank"] == 7 and rep["truncation_error"]["max"] < 1e-6  # sum of the ranks: exact
    assert rep["space"]["name"] == space and rep["space"]["inner"] == "ties" and rep["space"]["density"] == 0.4
    ref = reference_dense(adapters, space, "ties", 0.4, 0.8)
    written, s = factors_of(tmp_path / "full")
    assert s == 1.0
    model = peft_model_of(tmp_path / "full")
    expected = base_model()
    with torch.no_grad():
        for k, (a, b) in written.items():
            np.testing.assert_allclose((s * b @ a).numpy(), ref[k], rtol=0, atol=1e-6 * np.abs(ref[k]).max())
            getattr(expected, k.split(".")[-1]).weight.add_(torch.from_numpy(ref[k]).float())
        torch.testing.assert_close(model(x), expected(x), rtol=1e-5, atol=1e-6)
    # a smaller rank: the best truncation of the merged Delta W, with NumPy's Eckart-Young error
    rep = merge_lora_adapters(adapters, tmp_path / "r2", space, lam=0.8, output="svd", rank=2, density=0.4)
    written, _ = factors_of(tmp_path / "r2")
    num = den = 0.0
    for k, d in ref.items():
        sv = np.linalg.svd(d, compute_uv=False)
        err = math.sqrt((sv[2:] ** 2).sum() / (sv**2).sum())
        assert rep["truncation_error"]["per_layer"][k] == pytest.approx(err, rel=1e-6)
        a, b = written[k]
        assert a.shape[0] == 2
        assert float(np.linalg.norm((b @ a).numpy() - d) / np.linalg.norm(d)) == pytest.approx(err, rel=1e-5)
        num, den = num + (sv[2:] ** 2).sum(), den + (sv**2).sum()
    assert rep["truncation_error"]["overall"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert rep["truncation_error"]["max"] == max(rep["truncation_error"]["per_layer"].values())
    assert json.loads((tmp_path / "r2" / "merge.json").read_text())["rank"] == 2


def test_task_arithmetic_adapter_equals_the_concatenated_lora(adapters, tmp_path):
    w, lam = [1.0, 0.5, 2.0], 0.7
    merge(None, adapters, tmp_path / "cat", "task_arithmetic", lam=lam, weights=w, lora_output="concat")
    exact, _ = factors_of(tmp_path / "cat")
    for space in SPACES:  # concat of a LoRA-space merge: the exact adapter of rank sum r_k
        rep = merge(None, adapters, tmp_path / space, space, inner="task_arithmetic", lam=lam, weights=w)
        assert rep["output"] == "concat" and rep["rank"] == 7
        got, _ = factors_of(tmp_path / space)
        for k, (a, b) in got.items():
            torch.testing.assert_close(b @ a, exact[k][1] @ exact[k][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", SPACES)
def test_dense_output_folds_the_merge_into_the_base(adapters, tmp_path, space):
    base = {k: v.contiguous() for k, v in base_model().state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    rep = merge(tmp_path / "base.safetensors", adapters, tmp_path / "dense", space, lam=0.5, lora_output="dense")
    assert rep["base"] == str(tmp_path / "base.safetensors")
    ref = reference_dense(adapters, space, "ties", 0.2, 0.5)
    got = load_file(tmp_path / "dense" / "model.safetensors")
    assert got.keys() == base.keys()
    for k in got:
        layer = "base_model.model." + k.removesuffix(".weight")
        want = base[k] + torch.from_numpy(ref[layer]).float() if layer in ref else base[k]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


def test_cli_merges_adapters_with_knots(adapters, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--inputs", *map(str, adapters[:2]), "--method", "knots", "--lora_output", "svd", "--rank", "3",
            "--output_dir", str(out), "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "knots" in printed and "rank-3 SVD truncation error" in printed
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3
    peft_model_of(out)  # loads


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", SPACES)
def test_dense_inputs_are_a_clear_error(space, tmp_path):
    taus = [{"w": torch.randn(3, 4)}, {"w": torch.randn(3, 4)}]
    with pytest.raises(MergeInputError, match=f"{space} merges LoRA adapters' factors.*adapter directories"):
        merge_params({"w": torch.zeros(3, 4)}, taus, space)
    base = base_model().state_dict()
    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "base.safetensors")
    for i in range(2):
        save_file({k: (v + 0.1 * (i + 1)).contiguous() for k, v in base.items()}, tmp_path / f"ft{i}.safetensors")
    fts = [tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors"]
    with pytest.raises(MergeInputError, match="LoRA adapters' factors"):
        merge(tmp_path / "base.safetensors", fts, tmp_path / "o", space)
    assert not (tmp_path / "o").exists()


def test_options_are_checked(adapters, tmp_path):
    rec = make_method("knots", inner="task_arithmetic", density=0.5)  # density is declared: fine with any inner
    assert isinstance(rec.aggregator, LoraSpaceMerge) and rec.aggregator.reference.endswith("2410.19735")
    assert make_method("core_space").aggregator.reference.endswith("2509.17786")
    with pytest.raises(ConfigError, match="scope"):
        make_method("knots", scope="global")
    with pytest.raises(ConfigError, match="inner"):
        merge(None, adapters, tmp_path / "o", "core_space", inner="dare", lora_output="svd")
    with pytest.raises(ConfigError, match="inner"):
        LoraSpaceMerge("knots", inner="mean")
    with pytest.raises(ConfigError, match="space"):
        LoraSpaceMerge("tsv")
    with pytest.raises((ConfigError, MergeInputError), match="density"):
        merge(None, adapters, tmp_path / "o", "knots", density=0.0, lora_output="svd")
    with pytest.raises(MergeInputError, match="exact adapter of rank 7"):
        merge(None, adapters, tmp_path / "o", "knots", lora_output="concat", rank=4)
    with pytest.raises(MergeInputError, match="rank must be >= 1"):
        merge(None, adapters, tmp_path / "o", "knots", lora_output="svd", rank=0)
    with pytest.raises(MergeInputError, match="LiNeS"):  # never silently dropped
        merge(None, adapters, tmp_path / "o", "knots", lora_output="svd", lines=0.5)
    with pytest.raises(MergeInputError, match="LiNeS"):
        merge(None, adapters, tmp_path / "o", "task_arithmetic", lora_output="concat", lines=0.5)
    assert not (tmp_path / "o").exists()


def test_mismatched_adapters_are_an_error(adapters, tmp_path):
    other = make_adapter(tmp_path / "other", r=2, alpha=4, seed=5, targets=("fc1",))
    with pytest.raises(MergeInputError, match="different target modules"):
        merge(None, [adapters[0], other], tmp_path / "o", "knots", lora_output="svd")
    layers = random_layers(4)
    layers["q"][1] = (torch.randn(3, 5, dtype=torch.float64), layers["q"][1][1])  # n = 5, not 7
    with pytest.raises(MergeInputError, match=r"'q': Delta W is \(9, 7\) in task 0 but \(9, 5\) in task 1"):
        merge_lora_factors(layers, [1.0, 1.0, 1.0], "core_space")
    with pytest.raises(MergeInputError, match="3 finite numbers"):
        merge_lora_factors(random_layers(4), [1.0, 1.0, 1.0], "knots", weights=[1.0, 2.0])
    with pytest.raises(MergeInputError, match="2 LoRA factor pairs for 3 scalings"):
        merge_lora_factors({"q": random_layers(4)["q"][:2]}, [1.0, 1.0, 1.0], "knots")
    assert not (tmp_path / "o").exists()
