"""Fisher-weighted merging of AsymVLM heads (asymvlm.merging.fisher): the head's Fisher against a plain
per-example autograd loop in float64, FisherWeighted against a NumPy transcription of the paper's rule
(Matena & Raffel 2022, https://arxiv.org/abs/2111.09832) and its invariants, saved Fishers and their
errors, and merge(method="fisher") end to end."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from asymvlm.cache import EmbeddingCache, write_cache
from asymvlm.errors import ConfigError
from asymvlm.heads import TextHead
from asymvlm.io import tensor_fingerprint
from asymvlm.merging.api import merge
from asymvlm.merging.fisher import (
    FisherWeighted,
    compute_fisher,
    fisher_pairs,
    head_fisher,
    load_fisher,
    save_fisher,
    with_fisher,
)
from asymvlm.merging.methods import merge_params
from asymvlm.merging.task_vectors import MergeInputError
from asymvlm.model import AsymVLM

SOURCE = {"spec": "open_clip:toy", "pretrained": None, "fingerprint": "f" * 64}


def tiny_head(family="vmf", seed=0, direction="learned", dtype=torch.float64):
    torch.manual_seed(seed)
    head = TextHead(dim=8, hidden_dims=(16,), family=family, direction=direction, residual=True)
    with torch.no_grad():  # off the zero-initialised last layer: every parameter has a gradient
        for p in head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return head.to(dtype)


def tiny_cache(path, n=24, seed=0, noise=0.4):
    g = torch.Generator().manual_seed(seed)
    img = nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    txt = nn.functional.normalize(img + noise * torch.randn(n, 8, generator=g), dim=-1)
    return write_cache(path, img, txt, torch.arange(n), encoder=SOURCE)


def loop_fisher(head, pairs):
    """The reference: one torch.autograd.grad per example through the head's own log_prob, float64."""
    names = [k for k, _ in head.named_parameters()]
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in head.named_parameters()}
    n = 0
    for x, y in pairs:
        for i in range(x.shape[0]):
            lp = head(x[i : i + 1]).log_prob(y[i : i + 1]).sum()
            grads = torch.autograd.grad(lp, list(head.parameters()))
            for k, g in zip(names, grads):
                total[k] += g.double() ** 2
            n += 1
    return {k: v / n for k, v in total.items()}


# ------------------------------------------------------------------------------------------------
# (a) the Fisher of a head
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vmf", "ps"])
@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_head_fisher_matches_a_per_example_autograd_loop(tmp_path, family, estimator):
    head = tiny_head(family)
    cache = tiny_cache(tmp_path / "c", n=13)
    got = head_fisher(head, cache, estimator=estimator, batch_size=5, seed=3)
    pairs = list(fisher_pairs(head, cache, estimator=estimator, batch_size=5, seed=3))
    ref = loop_fisher(head, pairs)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-14)
        assert float(ref[k].abs().max()) > 0  # a real check: every parameter has a gradient
    if estimator == "empirical":  # the pairs are the cache's own
        c = EmbeddingCache.load(cache.path)
        torch.testing.assert_close(torch.cat([y for _, y in pairs]), c.image_embeddings[c.text_image_index].double())


def test_frozen_direction_and_float32_head_and_subset(tmp_path):
    head = tiny_head("vmf", direction="frozen", dtype=torch.float32)
    cache = tiny_cache(tmp_path / "c", n=20)
    got = head_fisher(head, cache, estimator="empirical", max_pairs=7, batch_size=4)
    pairs = list(fisher_pairs(head, cache, estimator="empirical", max_pairs=7, batch_size=4))
    assert sum(x.shape[0] for x, _ in pairs) == 7
    ref = loop_fisher(head, pairs)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-10)


def test_sampled_pairs_follow_the_heads_distribution_and_the_seed(tmp_path):
    head = tiny_head("ps")
    cache = tiny_cache(tmp_path / "c", n=400)
    pairs = list(fisher_pairs(head, cache, estimator="sampled", batch_size=64, seed=1))
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    q = head(x)
    cos = (q.loc * y).sum(-1)
    # E[mu^T y] under PS is kappa / (kappa + d - 1): the mean of the draws' cosines within 5 sigma
    expected = q.concentration / (q.concentration + 7)
    resid = (cos - expected).detach().numpy()
    assert abs(resid.mean()) < 5 * resid.std() / np.sqrt(len(resid))
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(len(y), dtype=y.dtype))
    again = torch.cat([p[1] for p in fisher_pairs(head, cache, estimator="sampled", batch_size=64, seed=1)])
    other = torch.cat([p[1] for p in fisher_pairs(head, cache, estimator="sampled", batch_size=64, seed=2)])
    assert torch.equal(y, again) and not torch.equal(y, other)


def test_fisher_arguments_are_checked(tmp_path):
    cache = tiny_cache(tmp_path / "c", n=4)
    with pytest.raises(ConfigError, match="estimator='exact' is not one of"):
        head_fisher(tiny_head(), cache, estimator="exact")
    with pytest.raises(ConfigError, match="max_pairs must be a positive integer"):
        head_fisher(tiny_head(), cache, max_pairs=0)


# ------------------------------------------------------------------------------------------------
# (b) the merge rule
# ------------------------------------------------------------------------------------------------
def numpy_fisher_merge(taus, fishers, weights, floor):
    """The paper's rule per coordinate, with the authors' floor (max(F, floor)) made relative."""
    out = {}
    w = np.asarray(weights, dtype=np.float64)
    for k in taus[0]:
        t = np.stack([np.asarray(d[k], dtype=np.float64) for d in taus])
        f = np.stack([np.asarray(x[k], dtype=np.float64) for x in fishers])
        ww = w.reshape(-1, *([1] * (t.ndim - 1)))
        m = (ww * f).sum(0).mean() / w.sum()
        f = np.maximum(f, floor * m)
        out[k] = (ww * f * t).sum(0) / (ww * f).sum(0)
    return out


def random_tasks(k=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"a": (4, 5), "b": (5,)}
    taus = [{n: rng.normal(size=s) for n, s in shapes.items()} for _ in range(k)]
    fishers = [{n: rng.exponential(size=s) * (rng.random(s) > 0.3) for n, s in shapes.items()} for _ in range(k)]
    return taus, fishers


def as_torch(d, dtype=torch.float64):
    return {k: torch.tensor(v, dtype=dtype) for k, v in d.items()}


@pytest.mark.parametrize("floor", [0.0, 1e-3, 0.5])
def test_fisher_weighted_matches_numpy(floor):
    taus, fishers = random_tasks()
    for f in fishers:
        f["b"][0] = 1.0  # no all-zero coordinate (floor 0 would leave it undefined in the transcription)
    weights = [1.0, 2.0, 0.5]
    ref = numpy_fisher_merge(taus, fishers, weights, floor)
    deltas = [with_fisher(as_torch(t), as_torch(f)) for t, f in zip(taus, fishers)]
    got = FisherWeighted(floor=floor)(deltas, weights).delta
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-12, atol=1e-14)
    # through the registry: base + lam * merge, in the deltas' dtype
    deltas32 = [with_fisher(as_torch(t, torch.float32), as_torch(f)) for t, f in zip(taus, fishers)]
    base = {k: torch.ones(v.shape) for k, v in deltas32[0].items()}
    out = merge_params(base, deltas32, "fisher", lam=0.7, weights=weights, floor=floor)
    for k in ref:
        assert out[k].dtype == torch.float32
        np.testing.assert_allclose(out[k].numpy(), 1 + 0.7 * ref[k], rtol=1e-5, atol=1e-6)


def test_equal_fishers_give_the_weighted_mean_and_a_zero_fisher_gives_way():
    taus, fishers = random_tasks()
    weights = [3.0, 1.0, 2.0]
    same = [fishers[0]] * 3
    got = FisherWeighted(floor=1e-6)([with_fisher(as_torch(t), as_torch(f)) for t, f in zip(taus, same)], weights)
    for k in taus[0]:
        mean = sum(w * t[k] for w, t in zip(weights, taus)) / sum(weights)
        np.testing.assert_allclose(got.delta[k].numpy(), mean, rtol=1e-12, atol=1e-14)
    # all-zero Fishers are equal Fishers too: the weighted mean, with the tensor named
    zeros = [{k: np.zeros_like(v) for k, v in fishers[0].items()}] * 3
    got = FisherWeighted(floor=1e-6)([with_fisher(as_torch(t), as_torch(f)) for t, f in zip(taus, zeros)], weights)
    for k in taus[0]:
        mean = sum(w * t[k] for w, t in zip(weights, taus)) / sum(weights)
        np.testing.assert_allclose(got.delta[k].numpy(), mean, rtol=1e-12, atol=1e-14)
    assert got.info["unweighted_keys"] == ["a", "b"]
    # one task's Fisher is 0 on a coordinate: there the other task's value (exactly at floor 0)
    t0, t1 = {"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([-1.0, 5.0, 7.0])}
    f0, f1 = {"w": torch.tensor([0.0, 1.0, 2.0])}, {"w": torch.tensor([4.0, 0.0, 2.0])}
    out = FisherWeighted(floor=0.0)([with_fisher(t0, f0), with_fisher(t1, f1)]).delta["w"]
    assert out.tolist() == [-1.0, 2.0, 5.0]
    # with a floor the zero-Fisher task keeps a weight of floor * mean Fisher there
    out = FisherWeighted(floor=0.1)([with_fisher(t0, f0), with_fisher(t1, f1)]).delta["w"]
    m = (0 + 1 + 2 + 4 + 0 + 2) / 3 / 2  # the mean over the tensor of the mean Fisher
    assert out[0].item() == pytest.approx((0.1 * m * 1.0 + 4.0 * -1.0) / (0.1 * m + 4.0), rel=1e-6)


def test_a_zero_base_task_pulls_toward_the_base_where_its_fisher_is_large():
    tau = [{"w": torch.tensor([1.0, 1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0, 3.0])}]
    f = [{"w": torch.ones(3)}, {"w": torch.ones(3)}]
    experts = [with_fisher(t, x) for t, x in zip(tau, f)]
    alone = FisherWeighted(floor=0.0)(experts).delta["w"]
    base = with_fisher({"w": torch.zeros(3)}, {"w": torch.tensor([0.0, 1.0, 1e6])})
    pulled = FisherWeighted(floor=0.0)([*experts, base]).delta["w"]
    assert alone.tolist() == [2.0, 2.0, 2.0]
    assert pulled[0].item() == 2.0  # no base Fisher: the experts' merge
    assert pulled[1].item() == pytest.approx(4.0 / 3.0)  # (1 + 3 + 0) / 3
    assert 0 < pulled[2].item() < 1e-5  # the base's data pins it: the base value


def test_fisher_weighted_errors_name_the_task_and_the_key():
    t = {"w": torch.ones(2)}
    with pytest.raises(MergeInputError, match="task vector 1 carries no Fisher.*compute_fisher"):
        FisherWeighted()([with_fisher(t, {"w": torch.ones(2)}), t])
    for bad, msg in (
        ({"v": torch.ones(2)}, "its Fisher has no 'w'"),
        ({"w": torch.ones(3)}, r"the Fisher of 'w' has shape \(3,\)"),
        ({"w": torch.tensor([1.0, -1.0])}, "the Fisher of 'w' has NaN, inf or negative"),
        ({"w": torch.tensor([1.0, float("nan")])}, "the Fisher of 'w' has NaN, inf or negative"),
    ):
        with pytest.raises(MergeInputError, match=f"task vector 0: {msg}"):
            FisherWeighted()([with_fisher(t, bad)])
    with pytest.raises(ConfigError, match="floor must be in"):
        FisherWeighted(floor=-1.0)


# ------------------------------------------------------------------------------------------------
# (c) saved Fishers
# ------------------------------------------------------------------------------------------------
def save_model(path, head, logit_scale=1.0):
    AsymVLM(head.float(), encoder_source={**SOURCE, "dim": 8}, logit_scale=logit_scale).save_pretrained(path)
    return path


def test_compute_save_load_round_trip(tmp_path):
    model = save_model(tmp_path / "m", tiny_head("ps"))
    cache = tiny_cache(tmp_path / "c", n=10)
    path = compute_fisher(model, cache.path, estimator="empirical", max_pairs=6, batch_size=4)
    assert path == model / "fisher.safetensors"
    loaded = load_fisher(model)
    head = AsymVLM.from_pretrained(model, load_encoder=False).head
    ref = head_fisher(head, cache, estimator="empirical", max_pairs=6, batch_size=4)
    for k in ref:
        assert loaded[k].dtype == torch.float32
        torch.testing.assert_close(loaded[k].double(), ref[k], rtol=1e-6, atol=1e-12)
    meta = json.loads((model / "fisher.json").read_text())
    assert meta["type"] == "asymvlm.fisher" and meta["format_version"] == 1
    assert meta["estimator"] == "empirical" and meta["pairs"] == 6 and meta["family"] == "ps"
    assert meta["cache"]["path"] == str(cache.path) and meta["cache"]["encoder_fingerprint"] == SOURCE["fingerprint"]
    assert meta["head_fingerprint"] == tensor_fingerprint(head.state_dict())
    assert loaded.meta["estimator"] == "empirical"


def test_saved_fisher_errors(tmp_path):
    model = save_model(tmp_path / "m", tiny_head())
    with pytest.raises(MergeInputError, match="has no Fisher.*compute_fisher"):
        load_fisher(model)
    good = {
        k: torch.ones_like(v) for k, v in AsymVLM.from_pretrained(model, load_encoder=False).head.state_dict().items()
    }
    with pytest.raises(MergeInputError, match="the Fisher of 'mlp.0.bias' has negative entries"):
        save_fisher({**good, "mlp.0.bias": -good["mlp.0.bias"]}, model)
    with pytest.raises(MergeInputError, match="contains NaN or inf"):
        save_fisher({**good, "mlp.0.bias": good["mlp.0.bias"] * float("nan")}, model)
    assert not (model / "fisher.safetensors").exists()  # nothing written
    save_fisher(good, model, {"estimator": "sampled"})
    load_fisher(model)  # no head_fingerprint recorded: keys and shapes are still checked
    # keys and shapes of another head
    save_fisher({**good, "extra": torch.ones(2)}, model)
    with pytest.raises(MergeInputError, match=r"keys are not the head's .*'extra'"):
        load_fisher(model)
    save_fisher({**good, "mlp.0.bias": torch.ones(3)}, model)
    with pytest.raises(MergeInputError, match=r"'mlp.0.bias' has shape \(3,\), the head's is \(16,\)"):
        load_fisher(model)
    # a record of another Fisher, a missing or corrupt record, a corrupt file
    save_fisher(good, model)
    save_file({k: 2 * v for k, v in good.items()}, model / "fisher.safetensors")
    with pytest.raises(MergeInputError, match="does not describe"):
        load_fisher(model)
    (model / "fisher.json").write_text("{not json")
    with pytest.raises(MergeInputError, match="fisher.json"):
        load_fisher(model)
    (model / "fisher.json").unlink()
    with pytest.raises(MergeInputError, match="but no fisher.json"):
        load_fisher(model)
    save_fisher(good, model)
    (model / "fisher.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(MergeInputError, match="fisher.safetensors"):
        load_fisher(model)
    # negative / NaN entries written behind save_fisher's back (with a matching record)
    for bad in (-good["mlp.0.bias"], good["mlp.0.bias"] * float("nan")):
        tensors = {**good, "mlp.0.bias": bad}
        save_file(tensors, model / "fisher.safetensors")
        rec = {"type": "asymvlm.fisher", "format_version": 1, "fisher_fingerprint": tensor_fingerprint(tensors)}
        (model / "fisher.json").write_text(json.dumps(rec))
        with pytest.raises(MergeInputError, match="the Fisher of 'mlp.0.bias' (has negative|contains NaN)"):
            load_fisher(model)


def test_a_fisher_of_other_weights_is_stale(tmp_path):
    model = save_model(tmp_path / "m", tiny_head())
    compute_fisher(model, tiny_cache(tmp_path / "c", n=6).path, estimator="empirical")
    save_model(model, tiny_head(seed=5))  # retrained: the saved Fisher no longer describes it
    with pytest.raises(MergeInputError, match="other head weights.*stale"):
        load_fisher(model)


# ------------------------------------------------------------------------------------------------
# (d) merge(method="fisher")
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def experts(tmp_path):
    base_head = tiny_head("vmf", seed=0)
    base = save_model(tmp_path / "base", base_head)
    paths = []
    for i in range(2):
        h = tiny_head("vmf", seed=0)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        paths.append(save_model(tmp_path / f"ft{i}", h, 1.0 + i))
    caches = [tiny_cache(tmp_path / f"c{i}", n=16, seed=20 + i).path for i in range(3)]
    return base, paths, caches


def head_state(path):
    return load_file(path / "head.safetensors")


def test_merge_fisher_end_to_end(experts, tmp_path):
    base, fts, caches = experts
    with pytest.raises(MergeInputError, match=r"merge method 'fisher': the input .*ft0 has no Fisher.*compute_fisher"):
        merge(base, fts, tmp_path / "no", "fisher")
    assert not (tmp_path / "no").exists()
    for p, c in zip(fts, caches):
        compute_fisher(p, c, estimator="sampled")
    weights = [1.0, 3.0]
    rep = merge(base, fts, tmp_path / "m", "fisher", lam=0.8, weights=weights, floor=1e-3)
    assert rep["fisher_base"] is False and rep["method"] == "fisher" and rep["options"] == {"floor": 1e-3}
    assert rep["reference"] == "https://arxiv.org/abs/2111.09832"
    b = {k: v.double().numpy() for k, v in head_state(base).items()}
    taus = [{k: head_state(p)[k].double().numpy() - b[k] for k in b} for p in fts]
    fishers = [{k: v.numpy() for k, v in load_fisher(p).items()} for p in fts]
    ref = numpy_fisher_merge(taus, fishers, weights, 1e-3)
    got = head_state(tmp_path / "m")
    for k in b:
        np.testing.assert_allclose(got[k].numpy(), b[k] + 0.8 * ref[k], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["fisher_base"] is False
    # the base's own Fisher: one more task, a zero task vector, weighted by the mean weight
    compute_fisher(base, caches[2], estimator="sampled")
    rep = merge(base, fts, tmp_path / "mb", "fisher", lam=0.8, weights=weights, floor=1e-3)
    assert rep["fisher_base"] is True
    zero = {k: np.zeros_like(v) for k, v in b.items()}
    fb = {k: v.numpy() for k, v in load_fisher(base).items()}
    ref_b = numpy_fisher_merge([*taus, zero], [*fishers, fb], [*weights, 2.0], 1e-3)
    got = head_state(tmp_path / "mb")
    for k in b:
        np.testing.assert_allclose(got[k].numpy(), b[k] + 0.8 * ref_b[k], rtol=1e-5, atol=1e-6)
    moved = sum(float(np.abs(ref[k]).sum()) for k in b)
    moved_b = sum(float(np.abs(ref_b[k]).sum()) for k in b)
    assert moved_b < moved  # the base's Fisher holds the merge nearer to the base


def test_merge_fisher_lambda_search(experts, tmp_path):
    base, fts, caches = experts
    for p, c in zip(fts, caches):
        compute_fisher(p, c, estimator="empirical")
    grid = [0.0, 0.5, 1.0]
    rep = merge(base, fts, tmp_path / "m", "fisher", lam_grid=grid, val=caches[:2], select_by="likelihood")
    curve = rep["lambda_search"]["curve"]
    assert [c["lam"] for c in curve] == grid and rep["lam"] in grid and rep["fisher_base"] is False
    assert len({round(c["score"], 12) for c in curve}) > 1
    same = merge(base, fts, tmp_path / "m2", "fisher", lam=rep["lam"])
    for k, v in head_state(tmp_path / "m").items():
        torch.testing.assert_close(v, head_state(tmp_path / "m2")[k])
    assert same["lam"] == rep["lam"]


def test_cli_computes_fishers_and_merges_with_lines(experts, tmp_path, capsys):
    """asymvlm-merge --compute_fisher saves each model's Fisher (equal to compute_fisher's), then
    --method fisher merges with them; --lines composes LiNeS after the method (recorded)."""
    from asymvlm.merging.cli import main

    base, fts, caches = experts
    assert main(["--compute_fisher", str(fts[0]), str(fts[1]), "--fisher_cache", str(caches[0])]) == 2
    assert "one each" in capsys.readouterr().err
    argv = ["--compute_fisher", str(fts[0]), str(fts[1]), "--fisher_cache", str(caches[0]), str(caches[1])]
    assert main([*argv, "--fisher_estimator", "empirical", "--no_progress"]) == 0
    assert "Fisher (empirical)" in capsys.readouterr().out
    got = load_fisher(fts[0])
    ref = head_fisher(AsymVLM.from_pretrained(fts[0], load_encoder=False).head, caches[0], estimator="empirical")
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=1e-6, atol=1e-12)
    out = tmp_path / "m"
    argv = ["--base", str(base), "--inputs", *map(str, fts), "--method", "fisher", "--lines", "0.5"]
    assert main([*argv, "--output_dir", str(out), "--no_progress"]) == 0
    rep = json.loads((out / "merge.json").read_text())
    assert rep["options"]["lines"] == 0.5 and rep["method"] == "fisher"
    plain = merge(base, fts, tmp_path / "plain", "fisher")
    assert "lines" not in plain["options"]
    assert any(not torch.equal(head_state(out)[k], head_state(tmp_path / "plain")[k]) for k in head_state(out))
