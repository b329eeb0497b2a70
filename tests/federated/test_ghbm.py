"""GHBM against a NumPy transcription of the published algorithm (Zaccone et al., "Communication-
Efficient Heterogeneous Federated Learning with Generalized Heavy-Ball Momentum",
https://arxiv.org/abs/2311.18578, Algorithm 1, and the authors' code: RickZack/GHBM), on quadratic
clients ``f_i(theta) = 1/2 (theta - c_i)^T diag(a_i) (theta - c_i)``.

The published algorithm, in the package's sign convention (a delta is ``theta_new - theta_ref`` and
is added):

- the server keeps the last ``tau`` global models before each of its steps and sends
  ``m_t = (theta_{t-tau} - theta_t) / tau`` (zero until ``tau`` models exist);
- every local step of every client is ``theta <- theta - eta_l (grad f_i(theta) + beta / (eta_l J) m_t)``,
  so over the ``J`` local steps the momentum term moves a client by exactly ``-beta m_t`` (the
  heavy-ball term ``beta (theta_t - theta_{t-tau}) / tau``);
- ``theta_{t+1} = theta_t + eta * sum_i w_i (theta_i - theta_t)``.

The algorithm has no local momentum. With the clients' SGD momentum ``mu`` (``--local_momentum``)
the gradient follows SGD with momentum and the GHBM term is still the displacement ``-beta/J m_t``
per step: it must not pass through the momentum buffer, which would multiply the heavy-ball
coefficient by ``(1/J) sum_j (1 - mu^j) / (1 - mu)`` (3.6 at ``mu = 0.9, J = 8``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymvlm.federated.client import ClientOptions, client_update
from asymvlm.federated.core import flatten_state, server_update, unflatten_state
from asymvlm.federated.recipes import make_recipe

DIM = 5


class _Quadratic(torch.nn.Module):
    """A stand-in for a client's TrainableModel: one exchanged parameter ``w`` and the loss
    ``1/2 sum a (w - c)^2`` (the batch is ignored), in float64."""

    def __init__(self, a: np.ndarray, c: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
        self.a, self.c = torch.as_tensor(a), torch.as_tensor(c)

    def exchanged(self):
        return {"w": self.w}

    def trained_names(self):
        return ["w"]

    def get_params(self):
        return {"w": self.w.detach().clone()}

    @torch.no_grad()
    def set_params(self, params):
        self.w.copy_(params["w"])

    def batch_loss(self, batch):
        return 0.5 * (self.a * (self.w - self.c) ** 2).sum()


class _Batches:
    num_batches = 1

    def batch(self, i):
        return {}

    def reseed(self, seed):
        pass


def _clients(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heterogeneous quadratics: curvatures in [0.5, 2], optima far apart."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, (k, DIM)), rng.normal(0.0, 3.0, (k, DIM))


def reference_ghbm(a, c, weights, rounds, *, beta, tau, server_lr, local_lr, local_steps, local_momentum=0.0,
                   participants=None):  # fmt: skip
    """The published GHBM (NumPy, float64); returns the global model after every round."""
    k = len(a)
    theta = np.zeros(DIM)
    history: list[np.ndarray] = []  # the models before each server step, oldest first (at most tau)
    m = np.zeros(DIM)
    out = []
    for t in range(rounds):
        active = list(range(k)) if participants is None else participants[t]
        deltas = []
        for i in active:
            x, buf = theta.copy(), np.zeros(DIM)
            for _ in range(local_steps):
                g = a[i] * (x - c[i])
                buf = local_momentum * buf + g  # torch's SGD (dampening 0): the first step's buffer is g
                x = x - local_lr * buf - (beta / local_steps) * m  # the GHBM term: beta / (eta_l J) m_t, times eta_l
            deltas.append(x - theta)
        w = np.asarray([weights[i] for i in active], dtype=float)
        agg = sum(wi * d for wi, d in zip(w / w.sum(), deltas))
        history = (history + [theta.copy()])[-tau:]
        theta = theta + server_lr * agg
        m = (history[0] - theta) / tau if len(history) == tau else np.zeros(DIM)
        out.append(theta.copy())
    return out


def package_ghbm(a, c, weights, rounds, *, beta, tau, server_lr, local_lr, local_steps, local_momentum=0.0,
                 participants=None, resume_every=0):  # fmt: skip
    """The same federation through the package: the ghbm recipe, the momentum the server sends,
    :func:`client_update` and :func:`server_update` (and, with ``resume_every``, the server state
    through a checkpoint's flatten/unflatten every that many rounds)."""
    recipe = make_recipe("ghbm", ghbm_beta=beta, ghbm_tau=tau, server_lr=server_lr)
    models = [_Quadratic(a[i], c[i]) for i in range(len(a))]
    params = {"w": torch.zeros(DIM, dtype=torch.float64)}
    state = recipe.server.init(params)
    opts = ClientOptions(local_steps=local_steps, local_lr=local_lr, momentum=local_momentum)
    out = []
    for t in range(rounds):
        active = list(range(len(a))) if participants is None else participants[t]
        config = recipe.client_config(state, params)  # GHBM's momentum for the clients' heavy-ball term
        deltas = [client_update(models[i], params, _Batches(), opts, client_config=config).delta for i in active]
        params, state, _ = server_update(recipe, deltas, [weights[i] for i in active], state, params)
        params = {k: v.clone() for k, v in params.items()}
        if resume_every and (t + 1) % resume_every == 0:
            tensors, skeleton = flatten_state(state)
            state = unflatten_state(tensors, skeleton)
        out.append(params["w"].numpy().copy())
    return out


SETTINGS = dict(rounds=12, local_lr=0.05, local_steps=8)


@pytest.mark.parametrize("beta,tau,server_lr", [(0.9, 1, 1.0), (0.5, 1, 0.3), (0.9, 3, 1.0), (0.0, 1, 1.0)])
def test_ghbm_equals_the_published_algorithm(beta, tau, server_lr):
    a, c = _clients(4)
    weights = [10, 20, 30, 40]
    ref = reference_ghbm(a, c, weights, beta=beta, tau=tau, server_lr=server_lr, **SETTINGS)
    ours = package_ghbm(a, c, weights, beta=beta, tau=tau, server_lr=server_lr, **SETTINGS)
    for t, (r, o) in enumerate(zip(ref, ours)):
        np.testing.assert_allclose(o, r, rtol=1e-10, atol=1e-10, err_msg=f"round {t + 1}")


def test_ghbm_equals_the_published_algorithm_under_partial_participation_and_resume():
    a, c = _clients(6, seed=1)
    weights = [1, 2, 3, 4, 5, 6]
    rng = np.random.default_rng(3)
    participants = [sorted(rng.choice(6, 3, replace=False).tolist()) for _ in range(SETTINGS["rounds"])]
    kw = dict(beta=0.9, tau=2, server_lr=1.0, participants=participants, **SETTINGS)
    ref = reference_ghbm(a, c, weights, **kw)
    for resume_every in (0, 1, 5):
        ours = package_ghbm(a, c, weights, resume_every=resume_every, **kw)
        np.testing.assert_allclose(np.stack(ours), np.stack(ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("local_momentum", [0.5, 0.9])
def test_ghbm_with_local_momentum_keeps_the_heavy_ball_coefficient_beta(local_momentum):
    """With SGD momentum on the clients (the demo's 0.9), the momentum term still moves a client by
    exactly -beta m_t over J steps: on a client with zero gradient the delta is -beta m_t, and the
    whole run equals the transcription with the same local momentum."""
    a, c = _clients(4, seed=2)
    weights = [1, 1, 1, 1]
    kw = dict(beta=0.9, tau=1, server_lr=1.0, local_momentum=local_momentum, **SETTINGS)
    ref = reference_ghbm(a, c, weights, **kw)
    ours = package_ghbm(a, c, weights, **kw)
    np.testing.assert_allclose(np.stack(ours), np.stack(ref), rtol=1e-10, atol=1e-10)

    flat = _Quadratic(np.zeros(DIM), np.zeros(DIM))  # zero gradient: only the momentum term moves it
    m = {"w": torch.linspace(-1.0, 1.0, DIM, dtype=torch.float64)}
    opts = ClientOptions(local_steps=8, local_lr=0.2, momentum=local_momentum)
    heavy_ball = {"heavy_ball": {"beta": 0.9, "momentum": m}}
    start = {"w": torch.zeros(DIM, dtype=torch.float64)}
    delta = client_update(flat, start, _Batches(), opts, client_config=heavy_ball).delta
    torch.testing.assert_close(delta["w"], -0.9 * m["w"], rtol=1e-12, atol=1e-12)


def test_ghbm_with_local_momentum_converges_where_the_published_algorithm_does():
    """beta 0.9 at server lr 1 with the clients' momentum 0.9: a heavy ball with coefficient 0.9
    converges on these quadratics; a momentum term routed through the clients' momentum buffer
    (coefficient 3.2) diverges."""
    a, c = _clients(4, seed=4)
    weights = [1] * 4
    kw = dict(beta=0.9, tau=1, server_lr=1.0, local_lr=0.02, local_steps=8, local_momentum=0.9, rounds=40)
    optimum = (a * c).sum(0) / a.sum(0)  # the minimiser of the mean of the quadratics
    ours = package_ghbm(a, c, weights, **kw)
    assert np.isfinite(ours[-1]).all()
    assert np.linalg.norm(ours[-1] - optimum) < 0.1 * np.linalg.norm(optimum)
