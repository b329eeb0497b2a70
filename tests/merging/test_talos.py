"""asymvlm.merging.talos: TaLoS sensitivities against per-sample autograd, exact global thresholds, rounds,
mask files, and sparse federated clients."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from asymvlm.heads import HeadConfig, TextHead
from asymvlm.losses import log_likelihood
from asymvlm.masks import load_masks
from asymvlm.merging.talos import (
    _keep_lowest,
    calibrate_mask,
    mask_density,
    sampled_log_likelihood,
    save_masks,
    sensitivity_scores,
)


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def head_model(d=6, hidden=(10,), seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = TextHead(config=HeadConfig(dim=d, hidden_dims=hidden), validate=False).to(dtype)
    return nn.ModuleDict({"head": head})


def reference_scores(model, batches, params, seed):
    """Per-sample autograd, one backward pass per text, with the same sampled images."""
    gen = torch.Generator().manual_seed(seed)
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for b in batches:
        obj = sampled_log_likelihood(model, b, gen)
        for i in range(obj.shape[0]):
            g = torch.autograd.grad(obj[i], list(params.values()), retain_graph=True, allow_unused=True)
            for k, gi in zip(params, g):
                if gi is not None:
                    acc[k] += gi.double() ** 2
    return acc


def test_linear_fast_path_equals_per_sample_autograd():
    model = head_model()
    batches = [{"text": unit(12, 6, 1), "images": unit(12, 6, 2)}, {"text": unit(9, 6, 3), "images": unit(9, 6, 4)}]
    params = dict(model.named_parameters())
    got = sensitivity_scores(model, batches, params, generator=torch.Generator().manual_seed(5))
    ref = reference_scores(model, batches, params, 5)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14)  # float64 throughout


class NormHead(nn.Module):
    """A head with a LayerNorm (not a Linear): the batched-VJP path."""

    def __init__(self):
        super().__init__()
        self.inner = TextHead(config=HeadConfig(dim=6, hidden_dims=(8,)), validate=False).double()
        self.norm = nn.LayerNorm(6).double()

    def forward(self, x):
        return self.inner(self.norm(x))


def test_general_path_equals_per_sample_autograd():
    torch.manual_seed(0)
    model = nn.ModuleDict({"head": NormHead()})
    with torch.no_grad():
        model["head"].norm.weight.uniform_(0.5, 1.5)
    batches = [{"text": unit(10, 6, 1), "images": unit(10, 6, 2)}]
    params = dict(model.named_parameters())
    assert any("norm" in k for k in params)
    got = sensitivity_scores(model, batches, params, generator=torch.Generator().manual_seed(3))
    ref = reference_scores(model, batches, params, 3)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14)


def test_objective_is_the_log_likelihood_of_an_image_drawn_from_the_model():
    model = head_model()
    text, images = unit(50, 6, 1), unit(7, 6, 2)
    obj = sampled_log_likelihood(model, {"text": text, "images": images}, torch.Generator().manual_seed(0))
    q = model["head"](text)
    ll = log_likelihood(q, images)
    probs = torch.softmax(ll.double(), dim=1)  # no loss_fn: temperature 1
    j = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    torch.testing.assert_close(obj, ll.gather(1, j[:, None]).squeeze(1))
    # the draws follow the model's posterior: an image with near-zero probability is never drawn
    many = torch.stack(
        [
            sampled_log_likelihood(model, {"text": text, "images": images}, torch.Generator().manual_seed(s))
            for s in range(20)
        ]
    )
    drawn = (many[..., None] == ll[None]).any(0)  # (T, I) which images were ever drawn
    assert not drawn[probs < 1e-12].any()


def test_masks_keep_exactly_the_least_sensitive_entries_under_one_global_threshold():
    model = head_model(hidden=(16, 16))
    batches = [{"text": unit(32, 6, 1), "images": unit(32, 6, 2)}]
    masks = calibrate_mask(model, batches, sparsity=0.8, rounds=1, seed=7)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert mask_density(masks) == pytest.approx(0.2, abs=1 / total)
    scores = sensitivity_scores(model, batches, params, generator=torch.Generator().manual_seed(7 * 1000003 + 1))
    kept = torch.cat([scores[k][masks[k]] for k in masks])
    frozen = torch.cat([scores[k][~masks[k]] for k in masks])
    assert kept.max() <= frozen.min()  # one threshold over every tensor, not per tensor
    per_tensor = {k: float(masks[k].float().mean()) for k in masks}
    assert max(per_tensor.values()) - min(per_tensor.values()) > 0.05  # the global threshold spreads unevenly


def test_rounds_follow_the_schedule_and_only_freeze_more():
    model = head_model(hidden=(16,))
    batches = [{"text": unit(24, 6, 1), "images": unit(24, 6, 2)}]
    seen = []
    calibrate_mask(
        model, batches, sparsity=0.9, rounds=3, on_round=lambda r, m: seen.append({k: v.clone() for k, v in m.items()})
    )
    total = sum(p.numel() for p in model.parameters())
    assert len(seen) == 3
    for r, m in enumerate(seen, 1):
        assert sum(int(v.sum()) for v in m.values()) == round(total * 0.1 ** (r / 3))
    for prev, nxt in zip(seen, seen[1:]):
        assert all(not (nxt[k] & ~prev[k]).any() for k in prev)  # a frozen entry never comes back


def test_ties_are_broken_to_the_exact_count():
    scores = {"a": torch.zeros(5, dtype=torch.float64), "b": torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)}
    active = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in scores.items()}
    out = _keep_lowest(scores, active, 3)
    assert sum(int(v.sum()) for v in out.values()) == 3
    assert not out["b"][1:].any()
    active["a"][:] = False  # held-out entries never return, whatever their score
    out = _keep_lowest(scores, active, 2)
    assert not out["a"].any() and out["b"].tolist() == [True, True, False]


def test_bad_arguments_are_clear_errors():
    model = head_model()
    b = [{"text": unit(4, 6, 1), "images": unit(4, 6, 2)}]
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="sparsity must be in"):
            calibrate_mask(model, b, sparsity=bad)
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        calibrate_mask(model, b, sparsity=0.5, rounds=0)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate_mask(model, [], sparsity=0.5)
    with pytest.raises(ValueError, match="no parameters"):
        calibrate_mask(model, b, sparsity=0.5, include="nothing-matches")
    with pytest.raises(TypeError, match="'text' and 'images'"):
        calibrate_mask(model, [torch.zeros(3)], sparsity=0.5)


def test_mask_files_round_trip_through_the_training_hook(tmp_path):
    model = head_model(dtype=torch.float32)
    b = [{"text": unit(16, 6, 1).float(), "images": unit(16, 6, 2).float()}]
    masks = calibrate_mask(model, b, sparsity=0.5, rounds=2)
    path = save_masks(masks, tmp_path / "m" / "talos.safetensors", {"sparsity": 0.5, "rounds": 2})
    back = load_masks(path)
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    meta = json.loads((tmp_path / "m" / "talos.json").read_text())
    assert meta["type"] == "asymvlm.masks" and meta["density"] == pytest.approx(mask_density(masks))
    with pytest.raises(ValueError, match="bool tensors"):
        save_masks({"x": torch.ones(2)}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def _synthetic_cache(path, n=60, d=16):
    from asymvlm.cache import write_cache

    g = torch.Generator().manual_seed(0)
    img = nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    idx = torch.arange(n).repeat_interleave(2)
    txt = nn.functional.normalize(img[idx] + 0.3 * torch.randn(2 * n, d, generator=g), dim=-1)
    write_cache(path, img, txt, idx)
    return path


def test_federated_clients_send_sparse_deltas(tmp_path):
    from safetensors.torch import save_file

    from asymvlm.config import DataArguments
    from asymvlm.federated.client import build_client_model
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated
    from asymvlm.heads import HeadConfig

    g = torch.Generator().manual_seed(0)
    _synthetic_cache(tmp_path / "c")
    head = HeadConfig(hidden_dims=[32])
    common = dict(rounds=2, num_clients=3, local_steps=3, local_batch_size=16, progress=False)
    fed = FederatedArguments(output_dir=str(tmp_path / "dense"), **common)
    data = get_federated_data(DataArguments(cache_dir=str(tmp_path / "c")), fed)
    start = build_client_model(dataclasses.replace(head, dim=16), seed=fed.seed).get_params()  # the run's theta_0
    masks = {k: torch.rand(v.shape, generator=g) < 0.25 for k, v in start.items() if k.startswith("head.")}
    save_file(masks, tmp_path / "masks.safetensors")
    logs = []
    fed = FederatedArguments(
        output_dir=str(tmp_path / "sparse"), mask_file=str(tmp_path / "masks.safetensors"), **common
    )
    state, _ = run_federated(fed, data, head=head, log=logs.append)
    for k, m in masks.items():
        moved = state.params[k] != start[k]
        assert not (moved & ~m).any(), k  # nothing outside the mask moved
        assert moved.any(), k
    assert not torch.equal(state.params["loss_fn.logit_scale"], start["loss_fn.logit_scale"])  # unmasked: trains
    comm = next(r for r in logs if r.get("event", "").startswith("communication"))
    n_head = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert comm["dense_bytes"] == 4 * (n_head + 1)
    assert comm["sent_bytes"] == 4 * (kept + 1)
    assert comm["saving"] == pytest.approx(1 - (kept + 1) / (n_head + 1))
    bad = {"head.nope": torch.ones(3, dtype=torch.bool)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="names no parameter"):
        run_federated(
            FederatedArguments(output_dir=str(tmp_path / "b"), mask_file=str(tmp_path / "bad.safetensors"), **common),
            data,
            head=head,
        )


def test_one_mask_file_works_unchanged_in_training_and_federated_clients(tmp_path):
    """calibrate_mask's file, as written, restricts asymvlm-train's optimizer and federated clients alike."""
    from asymvlm.batching import IndexBatcher
    from asymvlm.cache import EmbeddingCache
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated
    from asymvlm.heads import HeadConfig
    from asymvlm.model import AsymVLM
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    cache = _synthetic_cache(tmp_path / "c")
    base = train(TrainConfig.from_dict(dict(
        cache_dir=str(cache), hidden_dims=[32], max_steps=3, batch_size=16, save_every=0, eval_every=-1,
        log_with="none", progress=False, output_dir=str(tmp_path / "base"), seed=3,
    )))  # fmt: skip
    model = AsymVLM.from_pretrained(base, load_encoder=False)
    c = EmbeddingCache.load(cache)
    batcher = IndexBatcher(c.text_embeddings.float(), c.image_embeddings.float(), c.text_image_index, 16, 0)
    masks = calibrate_mask(model, batcher, sparsity=0.8, rounds=2, num_batches=2)
    mask_file = save_masks(masks, tmp_path / "mask.safetensors")
    start = AsymVLM.from_pretrained(base, load_encoder=False).head.state_dict()

    def check(head_state, where):
        for name, m in masks.items():
            key = name.removeprefix("head.")
            moved = head_state[key] != start[key]
            assert not (moved & ~m).any(), (where, name)
            assert moved.any() or not m.any(), (where, name)
        assert any(bool((head_state[n.removeprefix("head.")] != start[n.removeprefix("head.")]).any()) for n in masks)

    trained = train(TrainConfig.from_dict(dict(
        cache_dir=str(cache), hidden_dims=[32], max_steps=4, batch_size=16, save_every=0, eval_every=-1,
        log_with="none", progress=False, output_dir=str(tmp_path / "t"), init_from=str(base),
        mask_file=str(mask_file), optimizer="adamw", lr=1e-2,
    )))  # fmt: skip
    check(AsymVLM.from_pretrained(trained, load_encoder=False).head.state_dict(), "asymvlm-train")
    fed = FederatedArguments(
        rounds=2, num_clients=3, local_steps=3, local_batch_size=16, progress=False, output_dir=str(tmp_path / "f"),
        init_from=str(base), mask_file=str(mask_file), local_lr=0.5,
    )  # fmt: skip
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    state, client_model = run_federated(fed, data, head=HeadConfig(hidden_dims=[32]))
    check(client_model.head.state_dict(), "asymvlm-federate")


def test_talos_end_to_end_calibrate_train_merge(tmp_path):
    """calibrate_mask on a saved AsymVLM -> asymvlm-train's loop with mask_file -> merge(method=talos):
    each expert moves only inside its mask and the merge is base + the sum of the sparse task vectors."""
    from safetensors.torch import load_file

    from asymvlm.batching import IndexBatcher
    from asymvlm.cache import EmbeddingCache, write_cache
    from asymvlm.merging.api import merge
    from asymvlm.model import AsymVLM
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    def cfg(cache, out, **kw):
        return TrainConfig.from_dict(
            dict(cache_dir=str(cache), hidden_dims=[32], max_steps=6, batch_size=32, save_every=0,
                 output_dir=str(out), progress=False, log_with="none", optimizer="adamw", lr=1e-2,
                 eval_every=-1, **kw)
        )  # fmt: skip

    caches = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        img = nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
        txt = nn.functional.normalize(img + 0.3 * torch.randn(64, 16, generator=g), dim=-1)
        caches.append(write_cache(tmp_path / f"c{i}", img, txt, torch.arange(64)).path)
    base = train(cfg(caches[0], tmp_path / "base"))
    experts, masks = [], []
    for i in (1, 2):
        c = EmbeddingCache.load(caches[i])
        batcher = IndexBatcher(c.text_embeddings, c.image_embeddings, c.text_image_index, 32, seed=0)
        m = calibrate_mask(AsymVLM.from_pretrained(base, load_encoder=False), batcher, 0.8, 2, num_batches=2)
        assert set(m) == {f"head.{k}" for k in load_file(base / "head.safetensors")}
        path = save_masks(m, tmp_path / f"mask{i}.safetensors")
        masks.append(m)
        experts.append(train(cfg(caches[i], tmp_path / f"e{i}", init_from=str(base), mask_file=str(path))))
    b = load_file(base / "head.safetensors")
    taus = []
    for e, m in zip(experts, masks):
        w = load_file(e / "head.safetensors")
        tau = {k: w[k] - b[k] for k in b}
        for k in b:
            assert not tau[k][~m[f"head.{k}"]].any(), k  # sparse: nothing outside the mask moved
        assert any(tau[k].any() for k in b)
        taus.append(tau)
    merge(base, experts, tmp_path / "merged", "talos", lam=1.0)
    got = load_file(tmp_path / "merged" / "head.safetensors")
    for k in b:
        torch.testing.assert_close(got[k], b[k] + taus[0][k] + taus[1][k], rtol=0, atol=1e-6)
