"""merging: TIES against the naive published algorithm and peft, invariants, DARE, streaming, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymvlm.merging.methods import Dare, Ties, kth_smallest_magnitude, merge_files, merge_params
from asymvlm.merging.task_vectors import (
    LazyTaskVector,
    MergeInputError,
    task_vector_from_checkpoints,
    task_vector_from_lora,
    task_vector_from_models,
)

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 7), "c": (11,)}


def tasks(k=4, seed=0, dtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g, dtype=dtype) for n, s in shapes.items()} for _ in range(k)]


def naive_global_ties(taus, density):
    """The published algorithm (Yadav et al. 2023, official code): flatten every task vector, keep
    |x| >= its (d - int(d density))-th smallest |x|, elect the sign of the sum, resolve zero signs
    with the sign of the summed signs, average the agreeing nonzero entries."""
    keys = list(taus[0])
    flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus])  # (T, N)
    d = flat.shape[1]
    kk = d - int(d * density)
    if kk > 0:
        kth = flat.abs().kthvalue(kk, dim=1, keepdim=True).values
        flat = flat * (flat.abs() >= kth)
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, flat > 0, flat < 0)
    sel = flat * keep
    merged = sel.sum(0) / (sel != 0).sum(0).float().clamp(min=1)
    out, pos = {}, 0
    for k in keys:
        n = taus[0][k].numel()
        out[k] = merged[pos : pos + n].reshape(taus[0][k].shape)
        pos += n
    return out


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_global_ties_equals_the_naive_published_algorithm(density):
    taus = tasks(5, seed=1)
    ours = Ties(density=density, scope="global")(taus).delta
    ref = naive_global_ties(taus, density)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6)


def test_global_ties_zero_sign_resolution_and_ties_in_magnitude():
    # exact cancellations (sign 0 with nonzero entries) and duplicated magnitudes
    taus = [
        {"x": torch.tensor([1.0, -1.0, 2.0, 0.5, 0.5])},
        {"x": torch.tensor([-1.0, 1.0, -3.0, -0.5, 0.5])},
        {"x": torch.tensor([0.0, 0.0, 2.0, 0.5, -0.5])},
    ]
    for density in (0.4, 0.6, 1.0):
        torch.testing.assert_close(Ties(density=density)(taus).delta["x"], naive_global_ties(taus, density)["x"])


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_per_tensor_ties_equals_peft(method):
    from peft.utils.merge_utils import ties as peft_ties

    taus = tasks(4, seed=2)
    w = torch.tensor([0.5, 1.0, 2.0, 0.7])
    ours = Ties(
        density=0.3, scope="per_tensor", sign=method, sign_weighted=False, normalize="count", zero_sign="positive"
    )(taus, w.tolist()).delta
    for k in SHAPES:
        ref = peft_ties([t[k] for t in taus], w, density=0.3, majority_sign_method=method)
        torch.testing.assert_close(ours[k], ref, rtol=1e-6, atol=1e-6)


def test_invariants():
    taus = tasks(3, seed=3)
    one = tasks(1, seed=4)
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    # density 1 and one task = task arithmetic
    ta = merge_params(base, one, "task_arithmetic", lam=0.7)
    for scope in ("global", "per_tensor"):
        ties = merge_params(base, one, "ties", lam=0.7, density=1.0, scope=scope)
        for k in SHAPES:
            torch.testing.assert_close(ties[k], ta[k])
    # identical task vectors merge to themselves
    same = [taus[0]] * 4
    for method, opts in (("ties", {"density": 1.0}), ("ties", {"density": 0.3, "scope": "per_tensor"}), ("mean", {})):
        merged = merge_params(base, same, method, lam=1.0, **opts)
        for k in SHAPES:
            expected = taus[0][k] if opts.get("density", 1.0) == 1.0 else merged[k]
            torch.testing.assert_close(merged[k], expected)
    # per-tensor TIES of identical inputs keeps exactly the top entries of that input
    merged = merge_params(base, same, "ties", lam=1.0, density=0.3, scope="per_tensor")
    for k in SHAPES:
        nz = merged[k] != 0
        torch.testing.assert_close(merged[k][nz], taus[0][k][nz])
    ta_sum = merge_params(base, taus, "task_arithmetic", lam=0.5)
    for k in SHAPES:
        torch.testing.assert_close(ta_sum[k], 0.5 * sum(t[k] for t in taus))


def test_weighted_normalisation_options():
    taus = tasks(3, seed=5)
    w = [1.0, 2.0, 3.0]
    by_weight = Ties(density=1.0, normalize="weight", sign_weighted=True, zero_sign="none")(taus, w).delta
    for k in SHAPES:
        stack = torch.stack([t[k] for t in taus])
        ww = torch.tensor(w).view(-1, *([1] * (stack.dim() - 1)))
        sign = (stack * ww).sum(0).sign()
        agree = (stack.sign() == sign) & (stack != 0)
        ref = (stack * ww * agree).sum(0) / (ww * agree).sum(0).clamp_min(1e-30)
        torch.testing.assert_close(by_weight[k], ref)


def test_radix_selection_is_exact():
    g = torch.Generator().manual_seed(6)
    parts = [torch.randn(1000, generator=g), torch.randn(37, 3, generator=g), torch.tensor([0.0, -0.0, 5.0, 5.0])]
    flat = torch.cat([p.reshape(-1) for p in parts]).abs()
    for k in (1, 2, 500, 1111, flat.numel()):
        assert kth_smallest_magnitude(lambda: iter(parts), k) == float(flat.kthvalue(k).values)
    parts64 = [p.double() * 1e-3 for p in parts]
    flat64 = torch.cat([p.reshape(-1) for p in parts64]).abs()
    assert kth_smallest_magnitude(lambda: iter(parts64), 700, bits=64) == float(flat64.kthvalue(700).values)


def test_dare_is_seeded_order_independent_and_unbiased():
    taus = tasks(2, seed=7, shapes={"w": (200, 200)})
    a = Dare(p=0.8, seed=1)(taus).delta["w"]
    b = Dare(p=0.8, seed=1)([{"w": taus[0]["w"]}, {"w": taus[1]["w"]}]).delta["w"]
    assert torch.equal(a, b)
    assert not torch.equal(a, Dare(p=0.8, seed=2)(taus).delta["w"])
    dropped = Dare(p=0.8, seed=1).dropped(taus)[0]["w"]
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.2) < 0.01
    torch.testing.assert_close(dropped[kept], taus[0]["w"][kept] / 0.2)
    # E[dropped] = tau: the mean over many seeds approaches it
    mean = torch.stack([Dare(p=0.5, seed=s).dropped(taus)[0]["w"] for s in range(200)]).mean(0)
    assert float((mean - taus[0]["w"]).abs().mean()) < 0.1
    with pytest.raises(ValueError, match="drop probability"):
        Dare(p=1.0)


def test_files_stream_and_match_memory_merge(tmp_path):
    base = tasks(1, seed=8)[0]
    fts = [{k: base[k] + t[k] for k in base} for t in tasks(3, seed=9)]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"ft{i}.safetensors")
        paths.append(
            task_vector_from_checkpoints(
                tmp_path / "base.safetensors", tmp_path / f"ft{i}.safetensors", tmp_path / f"tv{i}"
            )
        )
    out = merge_files(
        tmp_path / "base.safetensors", paths, tmp_path / "merged.safetensors", "ties", lam=0.8, density=0.3
    )
    mem = merge_params(base, [LazyTaskVector(p) for p in paths], "ties", lam=0.8, density=0.3)
    got = load_file(out)
    for k in base:
        torch.testing.assert_close(got[k], mem[k])
    meta = json.loads((paths[0] / "task_vector.json").read_text())
    assert meta["type"] == "asymvlm.task_vector" and len(meta["base_fingerprint"]) == 64


def test_bad_inputs_write_nothing(tmp_path):
    base = tasks(1, seed=10)[0]
    save_file(base, tmp_path / "base.safetensors")
    ft = {k: v + 1 for k, v in base.items()}
    save_file(ft, tmp_path / "ft.safetensors")
    tv = task_vector_from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "tv")
    other_base = {k: v * 2 for k, v in base.items()}
    save_file(other_base, tmp_path / "base2.safetensors")
    tv2 = task_vector_from_checkpoints(tmp_path / "base2.safetensors", tmp_path / "ft.safetensors", tmp_path / "tv2")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeInputError, match="different bases"):
        merge_files(tmp_path / "base.safetensors", [tv, tv2], out, "task_arithmetic")
    save_file({k: v for k, v in ft.items() if k != "c"}, tmp_path / "ft_small.safetensors")
    tv3 = task_vector_from_checkpoints(
        tmp_path / "base.safetensors", tmp_path / "ft_small.safetensors", tmp_path / "tv3"
    )
    with pytest.raises(MergeInputError, match="keys differ"):
        merge_files(tmp_path / "base.safetensors", [tv, tv3], out, "task_arithmetic")
    save_file({**ft, "a.bias": torch.zeros(8)}, tmp_path / "ft_shape.safetensors")
    with pytest.raises(MergeInputError, match=r"'a.bias': shape \(8,\)"):
        task_vector_from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft_shape.safetensors", tmp_path / "x")
    save_file({**ft, "c": torch.full((11,), float("nan"))}, tmp_path / "ft_nan.safetensors")
    with pytest.raises(MergeInputError, match="NaN"):
        task_vector_from_checkpoints(tmp_path / "base.safetensors", tmp_path / "ft_nan.safetensors", tmp_path / "y")
    with pytest.raises(ValueError, match="density must be in"):
        merge_files(tmp_path / "base.safetensors", [tv], out, "ties", density=0.0)
    with pytest.raises(ValueError, match="density must be in"):
        merge_files(tmp_path / "base.safetensors", [tv], out, "ties", density=1.5)
    (tmp_path / "bad.safetensors").write_bytes(b"12345678garbage")
    with pytest.raises(MergeInputError):
        merge_files(tmp_path / "bad.safetensors", [tv], out, "task_arithmetic")
    assert not out.exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_task_vectors_are_exact_and_target_checked(tmp_path):
    g = torch.Generator().manual_seed(11)

    def adapter(path, targets):
        path.mkdir()
        state = {}
        for t in targets:
            state[f"base_model.model.{t}.lora_A.weight"] = torch.randn(2, 6, generator=g)
            state[f"base_model.model.{t}.lora_B.weight"] = torch.randn(5, 2, generator=g)
        save_file(state, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8, "target_modules": targets}))
        return state

    s1 = adapter(tmp_path / "a1", ["m.q", "m.v"])
    adapter(tmp_path / "a2", ["m.q", "m.k"])
    tv1 = task_vector_from_lora(tmp_path / "a1", tmp_path / "tv1")
    tv2 = task_vector_from_lora(tmp_path / "a2", tmp_path / "tv2")
    dense = LazyTaskVector(tv1)["m.q.weight"]
    b, a = s1["base_model.model.m.q.lora_B.weight"], s1["base_model.model.m.q.lora_A.weight"]
    torch.testing.assert_close(dense, 4.0 * b @ a)  # scaling = lora_alpha / r = 8 / 2
    save_file(
        {"m.q.weight": torch.zeros(5, 6), "m.v.weight": torch.zeros(5, 6), "m.k.weight": torch.zeros(5, 6)},
        tmp_path / "base.safetensors",
    )
    with pytest.raises(MergeInputError, match="LoRA adapters of different target modules"):
        merge_files(tmp_path / "base.safetensors", [tv1, tv2], tmp_path / "m.safetensors", "task_arithmetic")


def test_head_task_vectors_from_saved_models(tmp_path):
    from asymvlm.heads import TextHead
    from asymvlm.model import AsymVLM

    torch.manual_seed(0)
    base = TextHead(dim=8, hidden_dims=(4,))
    AsymVLM(base).save_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.mlp[0].weight.add_(1.0)
    AsymVLM(base).save_pretrained(tmp_path / "ft")
    tv = LazyTaskVector(task_vector_from_models(tmp_path / "base", tmp_path / "ft", tmp_path / "tv"))
    torch.testing.assert_close(tv["mlp.0.weight"], torch.ones(4, 8))
    assert float(tv["mlp.2.weight"].abs().sum()) == 0.0
    AsymVLM(TextHead(dim=8, hidden_dims=(5,))).save_pretrained(tmp_path / "other")
    with pytest.raises(MergeInputError, match="heads differ"):
        task_vector_from_models(tmp_path / "base", tmp_path / "other", tmp_path / "tv2")


def test_merging_core_import_stays_light():
    # the import time itself is measured by bench/merge.py (no timing thresholds in tests)
    code = (
        "import sys; import asymvlm.merging, asymvlm.merging.methods, asymvlm.merging.task_vectors, "
        "asymvlm.merging.lora, asymvlm.merging.talos, asymvlm.merging.api, asymvlm.merging.cli; "
        "print([m for m in ('transformers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_non_finite_task_vector_files_are_named(tmp_path):
    base = tasks(1, seed=12)[0]
    save_file(base, tmp_path / "base.safetensors")
    good = tmp_path / "good"
    good.mkdir()
    save_file(tasks(1, seed=13)[0], good / "task_vector.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({**tasks(1, seed=14)[0], "c": torch.full((11,), float("nan"))}, bad / "task_vector.safetensors")
    for method in ("task_arithmetic", "ties", "dare"):
        with pytest.raises(MergeInputError, match="task vector 1.*'c' contains NaN"):
            merge_files(tmp_path / "base.safetensors", [good, bad], tmp_path / "m.safetensors", method)
    assert not (tmp_path / "m.safetensors").exists()
