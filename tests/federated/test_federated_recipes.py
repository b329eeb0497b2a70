"""Fairness/momentum recipes against numpy transcriptions of their published updates."""

import math

import numpy as np
import pytest
import torch

from asymvlm.federated.core import apply_updates
from asymvlm.federated.recipes import RECIPES, ghbm_momentum, make_recipe

SHAPES = {"a": (3, 2), "b": (4,)}


def tree(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


def flat(t):
    return np.concatenate([t[k].double().numpy().ravel() for k in SHAPES])


def test_registry_names_and_references():
    assert set(RECIPES) == {
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "adafedadam",
        "qffl",
        "ghbm",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
    }
    assert all(ref.startswith("https://arxiv.org/abs/") for ref in (e.reference for e in RECIPES.values()))
    with pytest.raises(ValueError, match="unknown recipe"):
        make_recipe("fedsgd")
    prox = make_recipe("fedprox", proximal_mu=0.3)
    assert prox.client_config(prox.server.init({}), {})["proximal"]["mu"] == 0.3


def test_qffl_matches_the_published_update():
    w = tree(0)
    locals_ = [tree(s) for s in (1, 2, 3)]
    deltas = [{k: lw[k] - w[k] for k in SHAPES} for lw in locals_]
    losses, q, lr = [0.7, 2.5, 1.1], 0.5, 0.05
    r = make_recipe("qffl", qffl_q=q, local_lr=lr)
    res = r.aggregator(deltas, [10, 20, 30], loss_before=losses)
    new = apply_updates(w, r.server.update(res.delta, r.server.init(w), w)[0])
    # Li et al. 2020 Alg. 3: Delta w_k = L (w - w_k); Delta_k = F^q Delta w_k; h_k = q F^(q-1)|Delta w_k|^2 + L F^q
    big_l = 1 / lr
    dw = [big_l * (flat(w) - flat(lw)) for lw in locals_]
    f = [x + 1e-10 for x in losses]
    num = sum(fk**q * d for fk, d in zip(f, dw))
    den = sum(q * fk ** (q - 1) * float(d @ d) + big_l * fk**q for fk, d in zip(f, dw))
    np.testing.assert_allclose(flat(new), flat(w) - num / den, rtol=1e-12)


def test_qffl_with_q_zero_is_uniform_fedavg():
    deltas = [tree(s) for s in (4, 5)]
    r = make_recipe("qffl", qffl_q=0.0, local_lr=0.1)
    res = r.aggregator(deltas, [1, 99], loss_before=[3.0, 0.2])
    np.testing.assert_allclose(flat(res.delta), (flat(deltas[0]) + flat(deltas[1])) / 2, rtol=1e-12)


def test_adafedadam_matches_its_algorithm():
    w = tree(0)
    rounds = [[tree(10 * t + s) for s in range(3)] for t in range(3)]
    n = [5, 10, 20]
    eta_l, alpha, lr, b1, b2, eps = 0.1, 1.0, 1e-2, 0.9, 0.999, 1e-8
    r = make_recipe(
        "adafedadam",
        server_lr=lr,
        server_beta1=b1,
        server_beta2=b2,
        server_tau=eps,
        local_lr=eta_l,
        fairness_alpha=alpha,
    )
    state = r.server.init(w)
    ours = w
    ref = flat(w)
    m = np.zeros_like(ref)
    v = np.zeros_like(ref)
    c1 = c2 = 1.0
    rng = np.random.default_rng(0)
    init_loss = [1.5, 2.0, 0.5]
    for deltas in rounds:
        grad_norm = list(rng.uniform(0.5, 2.0, 3))
        loss = list(rng.uniform(0.2, 2.0, 3))
        res = r.aggregator(deltas, n, loss_before=loss, grad_norm=grad_norm, loss_initial=init_loss)
        step, state = r.server.update(res.delta, state, ours, **res.info)
        ours = apply_updates(ours, step)
        # transcription: eta'_k = |d_k|/|g_k|, U_k = d_k/eta'_k, C_k = ln(eta'_k/eta_l) + 1,
        # w_k ∝ (n_k/N)(F_k/F_k0)^alpha, g = sum w_k U_k, C = sum w_k C_k, Adam with beta^C, step C*lr
        d = [flat(x) for x in deltas]
        eff = [np.linalg.norm(dk) / gk for dk, gk in zip(d, grad_norm)]
        u = [dk / e for dk, e in zip(d, eff)]
        ck = [math.log(e / eta_l) + 1 for e in eff]
        raw = [nk / sum(n) * (fk / f0) ** alpha for nk, fk, f0 in zip(n, loss, init_loss)]
        wk = [x / sum(raw) for x in raw]
        g = sum(a * b for a, b in zip(wk, u))
        c = sum(a * b for a, b in zip(wk, ck))
        bb1, bb2 = b1**c, b2**c
        m = bb1 * m + (1 - bb1) * g
        v = bb2 * v + (1 - bb2) * g * g
        c1, c2 = c1 * bb1, c2 * bb2
        ref = ref + c * lr * (m / (1 - c1)) / (np.sqrt(v / (1 - c2)) + eps)
        assert res.info["certainty"] == pytest.approx(c, rel=1e-12)
    np.testing.assert_allclose(flat(ours), ref, rtol=1e-10)


def test_ghbm_keeps_the_last_tau_models_and_sends_their_difference():
    tau = 3
    r = make_recipe("ghbm", ghbm_tau=tau, ghbm_beta=0.9)
    params = tree(0)
    state = r.server.init(params)
    models = [params]
    for t in range(5):
        hist = state[0]["history"]
        m = ghbm_momentum(hist, params, tau)
        if t < tau:
            assert m is None
        else:
            for k in SHAPES:  # (theta_{t-tau} - theta_t) / tau
                torch.testing.assert_close(m[k], (models[t - tau][k] - params[k]) / tau)
        step, state = r.server.update(tree(100 + t), state, params)
        params = apply_updates(params, step)
        models.append(params)
    assert len(state[0]["history"]) == tau
