"""Vectorised clients (asymvlm.federated.vectorized) against the sequential client loop.

Every configuration trains a group of clients from one global model twice: together through
``train_group`` and one by one through ``client_update``. In float64 the deltas, the losses
before and after training and the gradient norms agree to 1e-9 (the batched GEMMs only sum in
another order); a test of the whole run compares ``client_batch`` auto and 1 in float32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from asymvlm.batching import IndexBatcher
from asymvlm.errors import ConfigError
from asymvlm.federated.client import ClientOptions, build_client_model, client_update
from asymvlm.federated.core import WeightedMean
from asymvlm.federated.vectorized import (
    StreamedMean,
    chunk_size,
    group_loss,
    train_group,
    train_round,
    vectorizable,
)
from asymvlm.heads import HeadConfig

TOL = 1e-9  # float64: the same arithmetic summed in another order


def _clients(n: int, dim: int = 6, seed: int = 0, sizes=(24, 40, 17, 33), batch: int = 8, repeat: bool = True):
    """``n`` clients' batchers over one shared image table, with captions repeated across images
    (so the positives mask has off-diagonal entries) and clients of different sizes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(200, dim, generator=g, dtype=torch.float64), dim=-1)
    out = []
    for k in range(n):
        m = sizes[k % len(sizes)]
        owner = torch.randint(0, 200, (m,), generator=g)
        text = torch.nn.functional.normalize(torch.randn(m, dim, generator=g, dtype=torch.float64), dim=-1)
        if repeat:
            text[1::5] = text[0]  # the same caption for several images
        out.append(IndexBatcher(text, images, owner, batch_size=batch, seed=100 + k))
    return out


def _model(dim=6, **head):
    loss = head.pop("loss", None)
    cfg = HeadConfig(dim=dim, hidden_dims=head.pop("hidden_dims", (12, 10)), **head)
    return build_client_model(cfg, seed=3, loss_kwargs=loss).double()


def _perturbed(model, scale=0.3, seed=5):
    """The model's parameters moved off their init (a residual head's zero last layer included)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.get_params().items()}


def _compare(model, params, batchers, options, **kw):
    together = train_group(model, params, batchers, options, clients=list(range(len(batchers))), **kw)
    for i, b in enumerate(batchers):
        alone = client_update(model, params, b, options, client=i, **kw)
        r = together[i]
        assert sorted(r.delta) == sorted(alone.delta)
        for k in alone.delta:
            assert r.delta[k].shape == alone.delta[k].shape
            torch.testing.assert_close(r.delta[k], alone.delta[k], rtol=0, atol=TOL, msg=f"client {i} {k}")
        assert r.loss_after == pytest.approx(alone.loss_after, abs=TOL)
        for name in ("loss_before", "grad_norm"):
            a, b2 = getattr(r, name), getattr(alone, name)
            assert (a is None) == (b2 is None) and (a is None or a == pytest.approx(b2, abs=TOL))
    return together


HEADS = [
    {},
    {"direction": "learned", "family": "ps"},
    {"direction": "learned", "residual": True, "activation": "gelu"},
    {"family": "vmf", "direction": "learned", "activation": "tanh", "loss": {"vmf_normalizer": "approx"}},
    {"direction": "learned", "loss": {"positive_mode": "sum", "max_logit_scale": 0.2}},
    {"family": "ps", "loss": {"positive_mode": "diagonal", "learn_logit_scale": False}},
]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()) or "default")
def test_every_head_and_loss_equals_the_sequential_loop(head):
    head = dict(head)
    loss = head.pop("loss", None)
    model = build_client_model(HeadConfig(dim=6, hidden_dims=(12, 10), **head), seed=3, loss_kwargs=loss).double()
    params = _perturbed(model)
    # 7 local steps over clients of 3-5 batches: every client wraps into its next epoch
    _compare(model, params, _clients(4), ClientOptions(local_steps=7, local_lr=0.2, batch_size=8, momentum=0.9))


@pytest.mark.parametrize(
    "options,loss",
    [
        (ClientOptions(local_steps=4, local_lr=0.3), None),
        (ClientOptions(local_steps=4, local_lr=0.01, optimizer="adamw", weight_decay=0.1), None),
        (
            ClientOptions(local_steps=4, local_lr=0.01, optimizer="adamw", weight_decay=0.1),
            {"learn_logit_scale": False},
        ),
        (ClientOptions(local_steps=3, local_lr=0.1, momentum=0.5, loss_batches=2), None),
    ],
    ids=["sgd", "adamw", "adamw-fixed-temperature", "momentum"],
)
def test_optimizers_and_the_measurements_at_the_global_model_equal_the_loop(options, loss):
    model = _model(direction="learned", loss=loss)
    _compare(model, _perturbed(model), _clients(3), options, need_loss_before=True, need_grad_norm=True)


def test_client_terms_and_masks_equal_the_loop():
    model = _model(direction="learned")
    params = _perturbed(model)
    momentum = {k: 0.05 * torch.ones_like(v) for k, v in params.items()}
    config = {"proximal": {"mu": 0.7}, "heavy_ball": {"beta": 0.9, "momentum": momentum}}
    opts = ClientOptions(local_steps=4, local_lr=0.2, momentum=0.9)
    _compare(model, params, _clients(3), opts, client_config=config)
    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=g) < 0.3 for k, v in params.items() if k.startswith("head.")}
    res = _compare(model, params, _clients(3), dataclasses.replace(opts, masks=masks), client_config=config)
    for r in res:  # only the masked entries moved
        for k, m in masks.items():
            assert bool((r.delta[k][~m] == 0).all())


def test_clients_are_independent_of_their_group():
    """A client's update is the same alone, in a group of 3 or in a group of 4 (no coupling)."""
    model = _model(direction="learned")
    params = _perturbed(model)
    opts = ClientOptions(local_steps=5, local_lr=0.2, momentum=0.9)
    four = train_group(model, params, _clients(4), opts, clients=[0, 1, 2, 3])
    one = train_group(model, params, _clients(4)[2:3], opts, clients=[2])
    for k in one[0].delta:
        torch.testing.assert_close(four[2].delta[k], one[0].delta[k], rtol=0, atol=TOL)


def test_group_loss_is_the_models_loss_per_client():
    model = _model(direction="learned", family="ps")
    params = _perturbed(model)
    batchers = _clients(3)
    stacked = {k: v.unsqueeze(0).repeat(3, *([1] * v.dim())) for k, v in params.items()}
    batch = {k: torch.stack([b.batch(0)[k] for b in batchers]) for k in ("text", "images", "positives")}
    losses = group_loss(model, stacked, batch)
    model.set_params(params)
    expected = torch.stack([model.batch_loss(b.batch(0)) for b in batchers]).detach()
    torch.testing.assert_close(losses.detach(), expected, rtol=0, atol=1e-12)


def test_train_round_groups_by_batch_size_and_chunks_in_order():
    """Clients with another batch size go into another stack; tiny chunks change nothing."""
    model = _model(direction="learned")
    params = _perturbed(model)
    batchers = _clients(5) + [_clients(1, batch=5, seed=9)[0]]
    opts = ClientOptions(local_steps=3, local_lr=0.2, momentum=0.9)
    clients = [10, 11, 12, 13, 14, 15]
    seeds = [7, 8, 9, 10, 11, 12]
    kw = dict(clients=clients, seeds=seeds, num_examples=[3] * 6, client_config=None)
    whole = train_round(model, params, batchers, opts, budget_mb=1e6, **kw)
    tiny = train_round(model, params, batchers, opts, budget_mb=1e6, cap=2, **kw)
    assert [r.client for r in whole] == clients == [r.client for r in tiny]
    for i, b in enumerate(batchers):
        b.reseed(seeds[i])
        alone = client_update(model, params, b, opts, client=clients[i])
        for k in alone.delta:
            torch.testing.assert_close(whole[i].delta[k], alone.delta[k], rtol=0, atol=TOL)
            torch.testing.assert_close(tiny[i].delta[k], alone.delta[k], rtol=0, atol=TOL)


@pytest.mark.parametrize("weighting,cap", [("examples", None), ("uniform", None), ("capped", 4.0)])
def test_streamed_mean_equals_the_weighted_mean_and_rejects_non_finite(weighting, cap):
    g = torch.Generator().manual_seed(1)
    deltas = [{"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g,
              dtype=torch.float64)} for _ in range(7)]  # fmt: skip
    weights = [3, 1, 5, 2, 8, 1, 4]
    deltas[4]["b"][2] = float("nan")
    agg = WeightedMean(weighting, cap)
    stream = StreamedMean(agg, [f"c{i}" for i in range(7)], weights)
    for s in (0, 3, 5):  # chunks of 3, 2 and 2 clients
        part = range(s, min(7, s + (3 if s == 0 else 2)))
        stacked = {k: torch.stack([deltas[i][k] for i in part]) for k in ("a", "b")}
        stream.add([f"c{i}" for i in part], stacked)
    assert stream.rejected == [{"client": "c4", "reason": "client 'c4': 'b' contains NaN or inf"}]
    kept = [i for i in range(7) if i != 4]
    ref = agg([deltas[i] for i in kept], [weights[i] for i in kept])
    got = stream.result()
    for k in ("a", "b"):
        torch.testing.assert_close(got.delta[k], ref.delta[k], rtol=0, atol=1e-12)
    assert got.info["weights"] == pytest.approx(ref.info["weights"], abs=1e-15)
    assert StreamedMean(agg, [], []).result() is None
    # without a rejection the streamed mean is the weighted mean bit for bit (the same additions in order)
    clean = [{k: torch.nan_to_num(v) for k, v in d.items()} for d in deltas]
    stream = StreamedMean(agg, list(range(7)), weights)
    stream.add(list(range(4)), {k: torch.stack([clean[i][k] for i in range(4)]) for k in ("a", "b")})
    stream.add([4, 5, 6], {k: torch.stack([clean[i][k] for i in (4, 5, 6)]) for k in ("a", "b")})
    ref = agg(clean, weights).delta
    assert all(torch.equal(stream.result().delta[k], ref[k]) for k in ref)


def test_what_cannot_be_vectorised_is_named():
    model = _model()
    assert vectorizable(model, _clients(2), None) == ""
    assert "own centre" in vectorizable(model, [], {"proximal": {"mu": 1.0, "center": {}}})
    assert "relationship" in vectorizable(model, [], {"relationship": {"lam": 1.0}})
    tokens = IndexBatcher({"input_ids": torch.zeros(8, 3, dtype=torch.long)}, torch.eye(4), torch.arange(8) % 4, 2, 0)
    assert "token ids" in vectorizable(model, [tokens], None)


def test_chunks_follow_the_memory_budget():
    model = _model(dim=32, hidden_dims=(64,))
    small, big = chunk_size(model, 16, 1.0), chunk_size(model, 16, 100.0)
    assert 1 <= small < big and chunk_size(model, 16, 100.0, cap=3) == 3
    assert chunk_size(model, 256, 100.0) < big  # larger batches, fewer clients per chunk
    assert chunk_size(model, 16, 1e-6) == 1  # never zero


def test_client_batch_option_is_checked():
    from asymvlm.federated.config import FederatedArguments

    for bad in ("0", "-2", "x", "auto2"):
        with pytest.raises(ConfigError, match="client_batch must be 'auto' or a number >= 1"):
            FederatedArguments(client_batch=bad)
    with pytest.raises(ConfigError, match="client_memory_mb must be >= 1"):
        FederatedArguments(client_memory_mb=0)


def test_group_batches_are_every_clients_own_batch():
    """The gathered batches equal each batcher's batch(i), on the fast path (plain batchers) and
    on the fallback (a data-wide caption scope), epochs wrapping included."""
    from asymvlm.federated.vectorized import GroupBatches

    plain = _clients(4)
    fast = GroupBatches(plain)
    assert fast.fast
    own = [IndexBatcher(b.text, b.images[: 120 + 10 * i].clone(), b.owner % (120 + 10 * i), 8, seed=i)
           for i, b in enumerate(_clients(3))]  # each client its own image table  # fmt: skip
    assert GroupBatches(own).fast
    for i in (0, 5):
        got = GroupBatches(own).batch(i)
        for k in ("text", "images", "positives"):
            assert torch.equal(got[k], torch.stack([b.batch(i)[k] for b in own])), (k, i)
    wide = _clients(2)
    wide[1].caption_scope = "data"
    slow = GroupBatches(wide)
    assert not slow.fast
    for group, batchers in ((fast, plain), (slow, wide)):
        for i in (0, 1, 6):
            got = group.batch(i)
            for k in ("text", "images", "positives"):
                assert torch.equal(got[k], torch.stack([b.batch(i)[k] for b in batchers])), (k, i)
    assert fast.batch(0)["positives"].sum() > 4 * 8  # repeated captions: off-diagonal positives


def test_population_losses_equal_each_clients_loss():
    from asymvlm.federated.vectorized import population_losses

    model = _model(direction="learned", family="ps")
    params = _perturbed(model)
    batchers = _clients(5) + [_clients(1, batch=5, seed=4)[0]]
    seeds = [3, 1, 4, 1, 5, 9]
    vec = population_losses(model, params, batchers, seeds, 3, vectorised=True, budget_mb=1e-3)  # chunks of 1
    big = population_losses(model, params, batchers, seeds, 3, vectorised=True, budget_mb=1e3)
    seq = population_losses(model, params, batchers, seeds, 3, vectorised=False, budget_mb=1e3)
    assert vec == pytest.approx(seq, abs=TOL) and big == pytest.approx(seq, abs=TOL)
    model.set_params(params)
    batchers[2].reseed(4)
    from asymvlm.federated.client import client_loss

    assert seq[2] == client_loss(model, batchers[2], 3)[0]


def test_check_stacked_words_every_rejection_as_check_delta():
    from asymvlm.errors import ClientUpdateError
    from asymvlm.federated.core import check_delta, check_stacked

    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    g = torch.Generator().manual_seed(0)
    stacked = {"a": torch.randn(3, 2, 3, generator=g), "b": torch.randn(3, 4, generator=g)}
    stacked["a"][1, 0, 2] = float("inf")
    stacked["b"][1, 3] = float("nan")
    stacked["b"][2, 0] = float("nan")
    cases = [
        stacked,
        {"a": stacked["a"]},  # a key missing
        {"a": stacked["a"], "b": torch.zeros(3, 5)},  # another shape
        {"a": stacked["a"], "b": torch.zeros(3, 4, dtype=torch.float64)},  # another dtype
    ]
    for case in cases:
        got = check_stacked(ref, case, ["x", "y", "z"])
        for i, c in enumerate(["x", "y", "z"]):
            try:
                check_delta(ref, {k: v[i] for k, v in case.items()}, c)
                want = ""
            except ClientUpdateError as err:
                want = str(err)
            assert got[i] == want
