"""TextHead and the AsymVLM loss, including parity with the published formulation.

The reference is a float64 numpy transcription of the AsymVLM formulation (Ju et al. 2025,
https://arxiv.org/abs/2505.11029, as released): an MLP d->1024->1024->1024->d with ReLU,
kappa = |eta|, mu = eta/kappa; log-likelihood matrix with rows = images and columns = texts;
vMF with the Scott et al. (2021) approximate normaliser, Power Spherical with the exact lgamma
normaliser; logits = temperature * log-likelihood; mean of the two cross-entropies.
"""

import math

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F

from asymvlm.distributions import PowerSpherical, VonMisesFisher
from asymvlm.heads import HeadConfig, TextHead, check_embeddings
from asymvlm.losses import (
    AsymVLMLoss,
    asymvlm_loss,
    log_likelihood,
    parameter_groups,
    positives_from_ids,
    symmetric_infonce,
)


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


# ------------------------------------------------------------------------------------------
# numpy reference of the published formulation
# ------------------------------------------------------------------------------------------
def np_mlp(layers, x):
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def np_log_softmax(z, axis):
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def reference_loss(layers, text, image, family, temperature):
    eta = np_mlp(layers, text)
    kappa = np.linalg.norm(eta, axis=-1, keepdims=True)  # (T, 1)
    mu = eta / kappa
    x = image / np.linalg.norm(image, axis=-1, keepdims=True)
    d = mu.shape[1]
    kt = kappa.T  # (1, T)
    if family == "vmf":

        def part(n):
            return (d - 1) / 4 * np.log((d - 1) / 2 + np.sqrt(n**2 + kt**2)) - 0.5 * np.sqrt(n**2 + kt**2)

        ll = x @ (mu * kappa).T + part((d - 1) / 2) + part((d + 1) / 2)
    else:
        alpha, beta = (d - 1) / 2 + kt, (d - 1) / 2
        log_c = -(
            (alpha + beta) * math.log(2)
            + scipy.special.gammaln(alpha)
            - scipy.special.gammaln(alpha + beta)
            + beta * math.log(math.pi)
        )
        ll = np.log1p(x @ mu.T) * kt + log_c
    logits = ll * temperature  # rows: images, columns: texts
    n = logits.shape[0]
    l1 = -np_log_softmax(logits, 1)[np.arange(n), np.arange(n)].mean()
    l2 = -np_log_softmax(logits.T, 1)[np.arange(n), np.arange(n)].mean()
    return (l1 + l2) / 2


def head_layers(head):
    return [
        (m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
        for m in head.mlp
        if isinstance(m, torch.nn.Linear)
    ]


def clip_like_batch(n, d, dtype=torch.float64, cos=0.3):
    """Unit text embeddings and matching unit image embeddings at cosine ~ `cos` (like CLIP)."""
    t = unit(n, d, dtype=dtype)
    noise = unit(n, d, dtype=dtype)
    noise = F.normalize(noise - (noise * t).sum(-1, keepdim=True) * t, dim=-1)
    i = cos * t + math.sqrt(1 - cos**2) * noise
    return t, F.normalize(i, dim=-1)


# ------------------------------------------------------------------------------------------
# heads
# ------------------------------------------------------------------------------------------
def test_default_head_is_the_papers_architecture():
    head = TextHead()
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1024), (1024, 1024), (1024, 1024), (1024, 512)]
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "ReLU"] * 3 + ["Linear"]
    assert head.family == "vmf" and head.config == HeadConfig()


@pytest.mark.parametrize("family,cls", [("vmf", VonMisesFisher), ("ps", PowerSpherical)])
def test_head_outputs_loc_and_concentration_from_eta(family, cls):
    head = TextHead(dim=32, family=family, hidden_dims=(64, 64), direction="learned").double()
    x = unit(5, 32)
    q = head(x)
    assert isinstance(q, cls) and q.batch_shape == (5,) and q.event_shape == (32,)
    eta = head.eta(x)
    torch.testing.assert_close(q.concentration, eta.norm(dim=-1))
    torch.testing.assert_close(q.loc, eta / eta.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(head.uncertainty(x), 1 / eta.norm(dim=-1))


@pytest.mark.parametrize("family", ["vmf", "ps"])
def test_frozen_direction_keeps_the_frozen_ranking_and_learns_only_concentration(family):
    """direction="frozen" (the default): loc is the input itself, bit for bit, so text->image
    retrieval by log-likelihood is the frozen cosine ranking however the head is trained."""
    head = TextHead(dim=32, family=family, hidden_dims=(64,)).double()
    assert head.config.direction == "frozen"
    text, images = unit(12, 32), unit(50, 32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        AsymVLMLoss()(head(text), images[:12]).backward()
        opt.step()
    q = head(text)
    assert torch.equal(q.loc, text)
    torch.testing.assert_close(q.concentration, head.eta(text).norm(dim=-1))
    ll = log_likelihood(q, images)
    assert torch.equal(ll.argsort(dim=1, stable=True), (text @ images.T).argsort(dim=1, stable=True))
    with pytest.raises(ValueError, match="unknown direction 'free'; choose one of"):
        HeadConfig(direction="free")


def test_residual_head_starts_as_clip():
    head = TextHead(dim=64, hidden_dims=(128,), direction="learned", residual=True, init_concentration=25.0).double()
    text, images = unit(10, 64), unit(40, 64)
    q = head(text)
    torch.testing.assert_close(q.loc, text, rtol=0, atol=1e-15)
    torch.testing.assert_close(q.concentration, torch.full((10,), 25.0, dtype=torch.float64))
    # text -> image ranking is exactly the cosine ranking of the frozen model
    ll = log_likelihood(q, images)
    assert torch.equal(ll.argsort(dim=1), (text @ images.T).argsort(dim=1))
    # and it still trains: the zero last layer receives gradient
    AsymVLMLoss()(q, images[:10]).backward()
    assert head.mlp[-1].weight.grad.abs().sum() > 0


def test_concentration_bounds_enforced():
    head = TextHead(dim=8, hidden_dims=(8,), min_concentration=0.5, max_concentration=100.0)
    with torch.no_grad():
        head.mlp[-1].weight.mul_(1e6)
        head.mlp[-1].bias.fill_(1e6)
    q = head(F.normalize(torch.randn(4, 8), dim=-1))
    assert torch.all(q.concentration == 100.0)
    assert torch.allclose(q.loc.norm(dim=-1), torch.ones(4))
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
    q = head(F.normalize(torch.randn(4, 8), dim=-1))
    assert torch.all(q.concentration == 0.5) and torch.isfinite(q.loc).all()


def test_head_bad_input():
    head = TextHead(dim=16, hidden_dims=(8,))
    x = F.normalize(torch.randn(4, 16), dim=-1)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="text embeddings: row 2 contains NaN or inf"):
        head(x)
    with pytest.raises(ValueError, match=r"dimension 12 \(shape \(4, 12\)\) but 16 is expected"):
        head(torch.randn(4, 12))
    with pytest.raises(ValueError, match=r"must have shape \(N, 16\)"):
        head(torch.randn(16))
    with pytest.raises(ValueError, match="unknown family 'gauss'"):
        TextHead(dim=16, family="gauss")
    with pytest.raises(ValueError, match="unknown activation"):
        HeadConfig(activation="swish!")
    with pytest.raises(ValueError, match="min_concentration < max_concentration"):
        HeadConfig(min_concentration=10.0, max_concentration=1.0)


def test_check_embeddings_unit():
    x = unit(3, 4, dtype=torch.float32)
    check_embeddings(x, 4, "image embeddings", unit=True)
    x[1] *= 1.5
    with pytest.raises(ValueError, match="row 1 has norm 1.5"):
        check_embeddings(x, 4, "image embeddings", unit=True)
    with pytest.raises(TypeError, match="floating point"):
        check_embeddings(torch.ones(3, 4, dtype=torch.long), 4, "x")


# ------------------------------------------------------------------------------------------
# log-likelihood
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [VonMisesFisher, PowerSpherical])
def test_log_likelihood_matches_log_prob_and_chunking(cls):
    d = 24
    q = cls(unit(7, d), torch.rand(7, dtype=torch.float64) * 50)
    x = unit(13, d)
    ll = log_likelihood(q, x)
    assert ll.shape == (7, 13)
    ref = q.log_prob(x.unsqueeze(1))  # (13, 7) by broadcasting
    torch.testing.assert_close(ll, ref.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_likelihood(q, x, chunk_size=4), ll, rtol=1e-13, atol=1e-13)


def test_log_likelihood_bad_input():
    q = VonMisesFisher(unit(3, 8), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dimension 9 \(shape \(5, 9\)\)"):
        log_likelihood(q, unit(5, 9))
    x = unit(5, 8)
    x[4, 0] = float("inf")
    with pytest.raises(ValueError, match="image embeddings: row 4 contains NaN or inf"):
        log_likelihood(q, x)
    with pytest.raises(ValueError, match="row 0 has norm 2"):
        log_likelihood(q, 2 * unit(5, 8))
    with pytest.raises(ValueError, match="batch shape"):
        log_likelihood(VonMisesFisher(unit(2, 3, 8), torch.ones(2, 3, dtype=torch.float64)), unit(5, 8))
    with pytest.raises(ValueError, match="unknown vmf_normalizer"):
        log_likelihood(q, unit(5, 8), vmf_normalizer="fast")


# ------------------------------------------------------------------------------------------
# parity with the published formulation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,normalizer", [("vmf", "approx"), ("ps", "exact")])
@pytest.mark.parametrize("temperature", [1.0, 3.7])
def test_loss_parity_with_reference_formulation(family, normalizer, temperature):
    d, n = 512, 64
    head = TextHead(dim=d, family=family, direction="learned").double()  # the paper's head
    with torch.no_grad():  # reach realistic concentrations (|eta| ~ 10-300)
        head.mlp[-1].weight.mul_(40.0)
    text, image = clip_like_batch(n, d)
    loss_fn = AsymVLMLoss(
        vmf_normalizer=normalizer, positive_mode="diagonal", init_logit_scale=math.log(temperature)
    ).double()
    ours = float(loss_fn(head(text), image).detach())
    ref = reference_loss(head_layers(head), text.numpy(), image.numpy(), family, temperature)
    assert ours == pytest.approx(ref, abs=1e-6, rel=1e-9)
    # float32 end to end (what training runs): same value within float32 resolution
    head32, loss32 = head.float(), loss_fn.float()
    ours32 = float(loss32(head32(text.float()), image.float()).detach())
    assert ours32 == pytest.approx(ref, rel=1e-5)


def test_exact_and_approx_vmf_gradients_agree_at_d512():
    d, n = 512, 128
    text, image = clip_like_batch(n, d, dtype=torch.float32)
    for scale in (1.0, 40.0, 200.0):
        torch.manual_seed(1)
        head = TextHead(dim=d)
        with torch.no_grad():
            head.mlp[-1].weight.mul_(scale)
            head.mlp[-1].bias.mul_(scale)
        grads = []
        for normalizer in ("exact", "approx"):
            head.zero_grad()
            AsymVLMLoss(vmf_normalizer=normalizer, positive_mode="diagonal")(head(text), image).backward()
            grads.append(torch.cat([p.grad.flatten().double() for p in head.parameters()]))
        cos = F.cosine_similarity(grads[0], grads[1], dim=0)
        assert cos >= 0.9999, (scale, float(cos))


# ------------------------------------------------------------------------------------------
# positives
# ------------------------------------------------------------------------------------------
def naive_infonce(logits, pos, mode):
    """Loop transcription of the two multi-positive modes, per direction."""

    def one_direction(z, p):
        rows = []
        for r in range(z.shape[0]):
            pos_idx = [j for j in range(z.shape[1]) if p[r, j]]
            if not pos_idx:
                continue
            neg = [z[r, j] for j in range(z.shape[1]) if not p[r, j]]
            if mode == "exclude":
                terms = [-(z[r, j] - math.log(math.exp(z[r, j]) + sum(math.exp(v) for v in neg))) for j in pos_idx]
                rows.append(sum(terms) / len(terms))
            else:
                num = math.log(sum(math.exp(z[r, j]) for j in pos_idx))
                den = math.log(sum(math.exp(v) for v in z[r]))
                rows.append(den - num)
        return sum(rows) / len(rows)

    z = logits.tolist()
    p = pos.tolist()
    zt = [list(c) for c in zip(*z)]
    pt = [list(c) for c in zip(*p)]
    return 0.5 * (one_direction(np.array(z), np.array(p)) + one_direction(np.array(zt), np.array(pt)))


@pytest.mark.parametrize("mode", ["exclude", "sum"])
def test_multi_positive_modes_match_naive_reference(mode):
    text_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    image_ids = torch.tensor([0, 1, 2, 3, 0, 2, 4])  # image columns; id 4 has no caption here
    pos = positives_from_ids(text_ids, image_ids)
    logits = torch.randn(7, 7, dtype=torch.float64) * 3
    got = float(symmetric_infonce(logits, pos, positive_mode=mode))
    assert got == pytest.approx(naive_infonce(logits, pos, mode), rel=1e-12)


def test_all_modes_equal_plain_infonce_on_the_diagonal():
    logits = torch.randn(9, 9, dtype=torch.float64) * 5 - 3  # negative scores included
    labels = torch.arange(9)
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    eye = torch.eye(9, dtype=torch.bool)
    for mode in ("exclude", "sum"):
        torch.testing.assert_close(symmetric_infonce(logits, eye, positive_mode=mode), ref)
    torch.testing.assert_close(symmetric_infonce(logits, positive_mode="diagonal"), ref)
    torch.testing.assert_close(symmetric_infonce(logits), ref)


def test_duplicate_captions_are_not_negatives():
    # two captions of image 0 in one batch (the image embedding appears twice): with "exclude"
    # the loss of the duplicate pair equals the loss without the duplicate
    d = 16
    head = TextHead(dim=d, hidden_dims=(32,)).double()
    text = unit(4, d)
    img = unit(3, d)
    images = torch.stack([img[0], img[0], img[1], img[2]])
    ids = torch.tensor([0, 0, 1, 2])
    q = head(text)
    loss = AsymVLMLoss(positive_mode="exclude").double()
    with_mask = loss(q, images, positives_from_ids(ids, ids))
    diag = AsymVLMLoss(positive_mode="diagonal").double()(q, images)
    assert with_mask < diag  # the diagonal mode punishes a correct caption as a negative
    ll = log_likelihood(q, images)
    ref = naive_infonce(ll, positives_from_ids(ids, ids), "exclude")
    assert float(with_mask.detach()) == pytest.approx(ref, rel=1e-12)


def test_infonce_bad_input():
    with pytest.raises(ValueError, match="square"):
        symmetric_infonce(torch.randn(3, 4))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        symmetric_infonce(torch.randn(3, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="no True entry"):
        symmetric_infonce(torch.randn(3, 3), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown positive_mode"):
        AsymVLMLoss(positive_mode="all")
    with pytest.raises(ValueError, match="ignores a positives mask"):
        symmetric_infonce(torch.randn(3, 3), torch.eye(3, dtype=torch.bool), positive_mode="diagonal")


# ------------------------------------------------------------------------------------------
# temperature
# ------------------------------------------------------------------------------------------
def test_logit_scale_is_log_space_learnable_and_not_decayed():
    head, loss_fn = TextHead(dim=8, hidden_dims=(16,)), AsymVLMLoss(init_logit_scale=math.log(2.0))
    t, i = clip_like_batch(6, 8, dtype=torch.float32)
    loss = loss_fn(head(t), i)
    ref = asymvlm_loss(head(t), i, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad != 0
    groups = parameter_groups([head, loss_fn], weight_decay=5e-4)
    assert any(p is loss_fn.logit_scale for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert all(p is not loss_fn.logit_scale for p in groups[0]["params"])
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=5e-4)
    before = loss_fn.logit_scale.detach().clone()
    loss_fn.logit_scale.grad = torch.zeros(())  # pure decay step: the scale must not move
    opt.step()
    assert torch.equal(loss_fn.logit_scale.detach(), before)
    # fixed scale and clamp
    fixed = AsymVLMLoss(learn_logit_scale=False, init_logit_scale=10.0, max_logit_scale=math.log(100))
    assert "logit_scale" not in dict(fixed.named_parameters()) and float(fixed.scale()) == pytest.approx(100.0)


def test_training_reduces_the_loss_and_learns_uncertainty():
    # 8 "classes"; each image gets either its class's vague caption (the class direction, shared
    # by many different images) or an exact caption (near its own embedding). Trained with the
    # loss, the head must give every vague caption more uncertainty than every exact one.
    torch.manual_seed(0)
    d, n_classes = 32, 8
    classes = unit(n_classes, d, dtype=torch.float32)

    def batch(n):
        c = torch.randint(0, n_classes, (n,))
        images = F.normalize(classes[c] + 0.6 * unit(n, d, dtype=torch.float32), dim=-1)
        vague = torch.rand(n) < 0.5
        exact = F.normalize(images + 0.1 * unit(n, d, dtype=torch.float32), dim=-1)
        return torch.where(vague[:, None], classes[c], exact), images, vague

    for family in ("vmf", "ps"):
        torch.manual_seed(0)
        head = TextHead(dim=d, family=family, hidden_dims=(64,), direction="learned")  # the paper's head
        loss_fn = AsymVLMLoss()
        opt = torch.optim.Adam(list(head.parameters()) + list(loss_fn.parameters()), lr=1e-2)
        losses = []
        for _ in range(600):
            text, images, _ = batch(64)
            loss = loss_fn(head(text), images)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert np.mean(losses[-50:]) < np.mean(losses[:50])
        text, _, vague = batch(400)
        unc = head.uncertainty(text).detach()
        correctly_ordered = (unc[vague][:, None] > unc[~vague][None, :]).float().mean()
        assert correctly_ordered >= 0.95, (family, float(correctly_ordered))


def test_exclude_mode_at_the_positives_equals_the_whole_matrix_form():
    # the previous implementation (softplus over every (T, I) entry, masked by the positives),
    # transcribed, against the positives-only one: loss and gradient in float64
    def whole(z, pos):
        def one(z, pos):
            neg = torch.logsumexp(z.masked_fill(pos, torch.finfo(z.dtype).min), dim=1, keepdim=True)
            neg = torch.where((~pos).any(dim=1, keepdim=True), neg, torch.full_like(neg, -math.inf))
            per = (F.softplus(neg - z) * pos).sum(1) / pos.sum(1).clamp_min(1)
            return per[pos.any(dim=1)].mean()

        return 0.5 * (one(z, pos) + one(z.T, pos.T))

    g = torch.Generator().manual_seed(0)
    pos = torch.rand(40, 33, generator=g) < 0.08
    pos[3] = True  # a text whose every image is positive: no negatives in its row
    pos[:, 5] = False  # an image without a caption
    pos[0, 0] = True
    a = (torch.randn(40, 33, generator=g, dtype=torch.float64) * 4).requires_grad_()
    b = a.detach().clone().requires_grad_()
    la, lb = symmetric_infonce(a, pos), whole(b, pos)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-13, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-16)
