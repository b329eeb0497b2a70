"""Drift diagnostics (asymvlm.federated.diagnostics) against closed forms on quadratic clients
F_k(w) = 1/2 ||w - w_k*||^2, against torch's cosine_similarity, and in the simulator."""

import json

import numpy as np
import pytest
import torch

from asymvlm.batching import IndexBatcher
from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError, InputError
from asymvlm.federated.client import build_client_model, client_loss
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.diagnostics import (
    client_drift,
    delta_cosines,
    diagnostics_series,
    gradient_dissimilarity,
    model_gradient,
    plot_diagnostics,
    round_diagnostics,
)
from asymvlm.federated.rounds import run_federated
from asymvlm.heads import HeadConfig

HEAD = HeadConfig(hidden_dims=(16,), direction="learned")


# ----------------------------------------------------------------------------------------------
# quadratic clients: every quantity has a closed form
# ----------------------------------------------------------------------------------------------
def _optima(k=5, d=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, d)), rng.uniform(0.5, 3.0, size=k)


def _quadratic_grads(w, optima):
    """grad F_k(w) = w - w_k*, through autograd on F_k, split into two named parameters."""
    grads = []
    for star in optima:
        x = torch.tensor(w, dtype=torch.float64, requires_grad=True)
        loss = 0.5 * (x - torch.tensor(star)).pow(2).sum()
        (g,) = torch.autograd.grad(loss, x)
        grads.append({"a": g[:3].float(), "b": g[3:].reshape(2, -1).float()})
    return grads


def test_gradient_dissimilarity_is_the_closed_form_on_quadratic_clients():
    """G^2 = sum_k p_k ||w_k* - sum_j p_j w_j*||^2, whatever w (numpy, float64)."""
    optima, n = _optima()
    p = n / n.sum()
    closed = float(np.sum(p * np.sum((optima - p @ optima) ** 2, axis=1)))
    rng = np.random.default_rng(1)
    for w in (np.zeros(7), rng.normal(size=7) * 10, optima[0]):
        # float32 gradients of float64 optima: agree to float32's precision
        assert gradient_dissimilarity(_quadratic_grads(w, optima), n) == pytest.approx(closed, rel=1e-6)
    # the definition by hand in float64 (no float32 round trip), with unnormalised weights
    g = [{"w": torch.tensor(np.zeros(7) - s)} for s in optima]
    assert gradient_dissimilarity(g, n * 3) == pytest.approx(closed, rel=1e-12)
    # identical clients: no dissimilarity; equal weights by default in round_diagnostics
    same = [{"w": torch.ones(3)}] * 4
    assert gradient_dissimilarity(same, [1, 2, 3, 4]) == 0.0
    eq = round_diagnostics([], grads=g)["gradient_dissimilarity"]
    assert eq == pytest.approx(float(np.mean(np.sum((optima - optima.mean(0)) ** 2, axis=1))), rel=1e-12)


def test_gradient_dissimilarity_rejects_bad_inputs():
    with pytest.raises(InputError, match="one weight per client"):
        gradient_dissimilarity([{"w": torch.ones(2)}], [1, 1])
    with pytest.raises(InputError, match="not all zero"):
        gradient_dissimilarity([{"w": torch.ones(2)}], [0])
    with pytest.raises(InputError, match="client 1 has keys"):
        gradient_dissimilarity([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1, 1])
    with pytest.raises(InputError, match="at least one client"):
        gradient_dissimilarity([], [])


def _local_sgd(w, star, lr, steps):
    """``steps`` SGD steps on F_k from w (autograd, float64)."""
    x = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (x - torch.tensor(star)).pow(2).sum()).backward()
        opt.step()
    return x.detach()


def test_client_drift_is_the_closed_form_and_grows_with_local_steps():
    """theta_k = w_k* + (1 - eta)^t (w - w_k*): drift (1 - (1 - eta)^t) ||w - w_k*||, growing in t."""
    optima, _ = _optima()
    w, lr = np.random.default_rng(2).normal(size=7), 0.3
    previous = np.zeros(len(optima))
    for t in (1, 2, 5, 10, 30):
        thetas = [_local_sgd(w, s, lr, t) for s in optima]
        for th, s in zip(thetas, optima):
            np.testing.assert_allclose(th.numpy(), s + (1 - lr) ** t * (w - s), rtol=1e-12, atol=1e-12)
        drift = np.array(client_drift([{"w": th} for th in thetas], {"w": torch.tensor(w)}))
        closed = (1 - (1 - lr) ** t) * np.linalg.norm(w - optima, axis=1)
        np.testing.assert_allclose(drift, closed, rtol=1e-12)
        assert np.all(drift > previous)
        previous = drift
        rd = round_diagnostics([{"w": th - torch.tensor(w)} for th in thetas])  # the deltas
        np.testing.assert_allclose(list(rd["drift"].values()), closed, rtol=1e-12)
        assert rd["drift_max"] == pytest.approx(closed.max()) and rd["drift_mean"] == pytest.approx(closed.mean())


def test_delta_cosines_match_torch_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(5)]
    flat = torch.stack([torch.cat([d["a"].reshape(-1), d["b"]]).double() for d in deltas])
    ref = torch.nn.functional.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=-1)
    cos = delta_cosines(deltas)
    assert cos.dtype == torch.float64 and cos.shape == (5, 5)
    torch.testing.assert_close(cos, ref, rtol=1e-12, atol=1e-12)
    rd = round_diagnostics(deltas, clients=[3, 1, 4, 0, 2])
    assert rd["clients"] == ["3", "1", "4", "0", "2"] and list(rd["drift"]) == rd["clients"]
    off = ref[~torch.eye(5, dtype=torch.bool)]
    assert rd["cosine_mean"] == pytest.approx(float(off.mean()), abs=1e-12)
    np.testing.assert_allclose(rd["cosine"], ref.numpy(), atol=1e-12)
    json.dumps(rd, allow_nan=False)  # JSON-able
    # a zero delta: cosine 0 (not NaN); one client: no off-diagonal mean
    z = delta_cosines([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    torch.testing.assert_close(z, torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert round_diagnostics([{"w": torch.ones(2)}])["cosine_mean"] is None
    assert round_diagnostics([{"w": torch.tensor([float("nan"), 1.0])}])["drift_max"] is None


def test_model_gradient_is_the_clients_loss_gradient():
    """Its norm is client_loss's gradient norm over the same batches; the RNG state is untouched."""
    model = build_client_model(HeadConfig(dim=8, hidden_dims=(16,)), seed=0)
    x = torch.nn.functional.normalize(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    data = IndexBatcher(x, x, torch.arange(32), batch_size=8, seed=0)
    params = model.get_params()
    state = torch.random.get_rng_state()
    grad = model_gradient(model, params, data, 3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sorted(grad) == sorted(model.trained_names()) and all(v.dtype == torch.float64 for v in grad.values())
    _, norm = client_loss(model, data, 3, grad=True)
    assert float(torch.cat([v.reshape(-1) for v in grad.values()]).norm()) == pytest.approx(norm, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# in the simulator
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("diagcache") / "c", 60)


def _run(cache, out, *, rounds=2, stop=None, **kw):
    fed = FederatedArguments(
        rounds=rounds, num_clients=4, clients_per_round=3, local_steps=3, local_batch_size=16, output_dir=str(out),
        progress=False, eval_every=0, local_lr=0.2, partition="quantity", **kw,
    )  # fmt: skip
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    return run_federated(fed, data, head=HEAD, stop_after=stop)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_simulator_logs_diagnostics_and_they_do_not_change_the_run(cache, tmp_path):
    on, _ = _run(cache, tmp_path / "on", diagnostics=True)
    off, _ = _run(cache, tmp_path / "off")
    assert all(torch.equal(on.params[k], off.params[k]) for k in off.params)  # they only observe
    recs = [r for r in _records(tmp_path / "on") if "round" in r]
    assert len(recs) == 2
    for r in recs:
        d = r["diagnostics"]
        assert d["clients"] == [str(c) for c in r["sampled"]] and len(d["clients"]) == 3
        assert list(d["drift"]) == d["clients"] and all(v > 0 for v in d["drift"].values())
        assert d["drift_max"] == max(d["drift"].values())
        assert d["gradient_dissimilarity"] > 0 and -1 <= d["cosine_mean"] <= 1
        assert np.allclose(np.diag(d["cosine"]), 1.0)
    assert not any("diagnostics" in r for r in _records(tmp_path / "off"))


def test_diagnostics_may_change_on_resume_and_are_refused_under_dp(cache, tmp_path):
    _run(cache, tmp_path / "part", stop=1)
    resumed, _ = _run(cache, tmp_path / "part", resume=True, diagnostics=True)
    full, _ = _run(cache, tmp_path / "full")
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert ["diagnostics" in r for r in _records(tmp_path / "part") if "round" in r] == [False, True]
    with pytest.raises(ConfigError, match="differential privacy"):
        FederatedArguments(diagnostics=True, dp_noise_multiplier=1.0)


# ----------------------------------------------------------------------------------------------
# the per-round series and their plot
# ----------------------------------------------------------------------------------------------
def _hand_records():
    """Three diagnosed rounds (logged out of order, round 2 logged twice: its last record counts)
    among records without diagnostics, from hand-made deltas through round_diagnostics."""
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-3.0, 0.0])
    g = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])}]
    r1 = round_diagnostics([{"w": a}, {"w": b}, {"w": c}], clients=[0, 1, 2], grads=g + [g[0]])
    r2 = round_diagnostics([{"w": a}, {"w": a}], clients=[0, 2], grads=g)
    r3 = round_diagnostics([{"w": b}], clients=[1])  # one client, no gradients: nulls
    stale = round_diagnostics([{"w": c}], clients=[5])
    return [
        {"round": 1, "diagnostics": r1},
        {"round": 3, "diagnostics": r3},
        {"round": 2, "diagnostics": stale},
        {"round": 2, "diagnostics": r2},
        {"round": 4, "loss": 1.0},
        {"final": True},
    ]


def test_diagnostics_series_reads_the_logged_numbers():
    s = diagnostics_series(json.loads(json.dumps(_hand_records())))  # as read back from metrics.jsonl
    assert list(s) == ["rounds", "g2", "drift_mean", "drift_max", "cosine_mean", "cosine_min"]
    assert s["rounds"] == [1, 2, 3]
    # round 1: drifts 1, 2, 3; cosines a.b = 0, a.c = -1, b.c = 0; G^2 of (1,0),(-1,0),(1,0) equal weights
    # mean (1/3, 0): (4/9 + 16/9 + 4/9) / 3 = 8/9
    # round 2: equal deltas (cosine 1), G^2 of (1,0),(-1,0) = 1; round 3: one client, no grads
    assert s["drift_mean"][:2] == pytest.approx([2.0, 1.0]) and s["drift_max"][:2] == [3.0, 1.0]
    assert s["g2"][:2] == pytest.approx([8 / 9, 1.0])
    assert s["cosine_mean"][:2] == pytest.approx([-1 / 3, 1.0]) and s["cosine_min"][:2] == pytest.approx([-1.0, 1.0])
    assert s["drift_mean"][2] == s["drift_max"][2] == 2.0
    assert np.isnan(s["g2"][2]) and np.isnan(s["cosine_mean"][2]) and np.isnan(s["cosine_min"][2])
    # a round without the cosine matrix (more than MAX_COSINE_CLIENTS clients): min unknown
    d = dict(_hand_records()[0]["diagnostics"])
    del d["cosine"]
    assert np.isnan(diagnostics_series([{"round": 7, "diagnostics": d}])["cosine_min"][0])


def test_series_and_plot_need_diagnostics(tmp_path):
    for records in ([], [{"round": 1, "loss": 0.5}, {"final": True}]):
        with pytest.raises(InputError, match="--diagnostics true") as err:
            diagnostics_series(records)
        assert "\n" not in str(err.value)
        with pytest.raises(InputError, match="--diagnostics true"):
            plot_diagnostics(records, tmp_path / "d.png")
    with pytest.raises(InputError, match="no integer 'round'"):
        diagnostics_series([{"diagnostics": {"drift_mean": 1.0}}])
    assert not (tmp_path / "d.png").exists()


def test_plot_diagnostics_writes_a_png(tmp_path):
    from PIL import Image

    path = plot_diagnostics(_hand_records(), tmp_path / "sub" / "diagnostics.png")
    assert path == tmp_path / "sub" / "diagnostics.png" and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
    assert [p.name for p in path.parent.iterdir()] == ["diagnostics.png"]  # no temp file left


def test_plot_diagnostics_of_a_simulated_run(cache, tmp_path):
    from PIL import Image

    from asymvlm.io_read import read_jsonl

    _run(cache, tmp_path / "run", rounds=3, diagnostics=True)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    s = diagnostics_series(records)
    rounds = [r for r in records if "round" in r]
    assert s["rounds"] == [1, 2, 3]
    assert s["g2"] == [r["diagnostics"]["gradient_dissimilarity"] for r in rounds]
    assert s["drift_max"] == [max(r["diagnostics"]["drift"].values()) for r in rounds]
    for r, lo, mean in zip(rounds, s["cosine_min"], s["cosine_mean"]):
        cos = np.array(r["diagnostics"]["cosine"])
        assert lo == pytest.approx(cos[~np.eye(len(cos), dtype=bool)].min()) and -1 <= lo <= mean <= 1
    path = plot_diagnostics(records, tmp_path / "run" / "diagnostics.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 0
