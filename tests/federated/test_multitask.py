"""Federated multi-task learning (issue 28): FedEM's E-step, weighted M-step batches and mixture
prediction, MOCHA's relationship term and task covariance, each against a transcription
(autograd of the published objective, scipy's matrix square root, a direct softmax), and both
methods' runs (uploads per component, client-side mixture weights, bit-identical resume).
"""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from asymvlm.batching import IndexBatcher
from asymvlm.errors import ConfigError
from asymvlm.federated.client import CLIENT_TERMS, ClientOptions, build_client_model
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import FederatedData
from asymvlm.federated.multitask import WeightedBatches, responsibilities, task_covariance
from asymvlm.federated.personal_store import ClientStates
from asymvlm.federated.rounds import Federation, run_federated
from asymvlm.heads import HeadConfig
from asymvlm.losses import log_likelihood

HEAD = HeadConfig(dim=8, hidden_dims=(16,), direction="learned")


def _data(clients=4, per=16, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    batchers = []
    for c in range(clients):
        img = torch.nn.functional.normalize(torch.randn(per, dim, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(per, dim, generator=g), dim=-1)
        batchers.append(IndexBatcher(txt, img, torch.arange(per), 8, seed=c))
    return FederatedData(batchers, [per] * clients, dim, None)


def _fed(out, cluster, options, rounds=3, **kw):
    base = dict(
        num_clients=4, rounds=rounds, local_steps=2, local_lr=0.3, local_batch_size=8, progress=False, eval_every=0,
        output_dir=str(out), cluster=cluster, cluster_options=options,
    )  # fmt: skip
    return FederatedArguments(**{**base, **kw})


def test_task_covariance_is_the_normalised_matrix_square_root():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 40))
    ridge = 1e-3 * np.trace(w @ w.T) / 5  # eps relative to the mean squared norm
    root = scipy.linalg.sqrtm(w @ w.T + ridge * np.eye(5)).real
    got = task_covariance(torch.from_numpy(w), eps=1e-3).numpy()
    np.testing.assert_allclose(got, root / np.trace(root), rtol=1e-9, atol=1e-12)


def test_relationship_term_is_the_gradient_of_the_trace_regulariser():
    torch.manual_seed(0)
    k, lam = 4, 0.3
    w = torch.randn(k, 6, dtype=torch.float64)
    omega = task_covariance(w, eps=1e-2)
    inv = torch.linalg.inv(omega)
    # autograd of lam tr(W Omega^-1 W^T), W = columns w_j (here rows of w): lam sum_ij inv_ij w_i . w_j
    wk = w.clone().requires_grad_(True)
    (lam * torch.einsum("ij,id,jd->", inv, wk, wk)).backward()
    c = 2
    p = torch.nn.Parameter(w[c].clone())
    p.grad = torch.zeros_like(p)
    others = sum(inv[c, j] * w[j] for j in range(k) if j != c)
    term = CLIENT_TERMS.build("relationship", lam=lam, self_weight=float(inv[c, c]), others={"w": others})
    term.on_gradient(["w"], [p])
    torch.testing.assert_close(p.grad, wk.grad[c], rtol=1e-12, atol=1e-12)


def test_weighted_batches_draw_rows_in_proportion_to_their_weights():
    b = _data(clients=1, per=16).batchers[0]
    weights = torch.zeros(16, dtype=torch.float64)
    weights[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    wb = WeightedBatches(b, weights, seed=5)
    counts = torch.zeros(16)
    for i in range(2000):
        batch = wb.batch(i)
        counts += torch.bincount(batch["ids"], minlength=16).float()  # ids = image rows = caption rows here
    assert counts[4:].sum() == 0
    freq = counts[:4] / counts.sum()
    torch.testing.assert_close(freq.double(), weights[:4] / 10, atol=0.01, rtol=0)
    assert torch.equal(wb.batch(3)["ids"], WeightedBatches(b, weights, seed=5).batch(3)["ids"])


def test_fedem_responsibilities_are_the_posterior_over_components():
    b = _data(clients=1).batchers[0]
    model = build_client_model(HEAD, seed=0)
    comps = [build_client_model(HEAD, seed=s).get_params() for s in (1, 2, 3)]
    pi = torch.tensor([0.2, 0.5, 0.3])
    got = responsibilities(model, comps, pi, b, chunk=5)
    logp = []
    for params in comps:  # the transcription: each component's density of each caption's own image
        model.set_params(params)
        with torch.no_grad():
            q = model.head(b.text)
            logp.append(log_likelihood(q, b.images).diagonal().double())
    ref = torch.softmax(torch.log(pi.double()) + torch.stack(logp, 1), dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_fedem_uploads_one_update_per_component_and_keeps_its_weights(tmp_path, monkeypatch):
    from asymvlm.federated import rounds

    uploads = []
    real = rounds.Federation.validate

    def spy(self, state, results):
        uploads.append([(r.client, r.group) for r in results])
        return real(self, state, results)

    monkeypatch.setattr(rounds.Federation, "validate", spy)
    state, _ = run_federated(_fed(tmp_path / "em", "fedem", '{"components": 3}'), _data(), head=HEAD)
    assert uploads[0] == [(c, m) for c in range(4) for m in range(3)]
    assert len(state.extra["models"]) == 3
    store = ClientStates(tmp_path / "em" / "clients")
    for c in range(4):
        pi = store.load(c, upto=3)["pi"]
        assert pi.shape == (3,) and abs(float(pi.sum()) - 1) < 1e-5 and bool((pi > 0).all())


@pytest.mark.parametrize("method,options", [("fedem", '{"components": 2}'), ("mocha", '{"lam": 0.01}')])
def test_multitask_runs_resume_bit_identically(method, options, tmp_path):
    full, _ = run_federated(_fed(tmp_path / "full", method, options, 4), _data(), head=HEAD)
    run_federated(_fed(tmp_path / "cut", method, options, 4), _data(), head=HEAD, stop_after=2)
    back, _ = run_federated(_fed(tmp_path / "cut", method, options, 4, resume=True), _data(), head=HEAD)
    for a, b in zip(full.extra["models"], back.extra["models"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "mocha":  # Omega re-estimated from the task models after every round
        assert torch.equal(full.extra["omega"], back.extra["omega"])
        keys = sorted(full.extra["models"][0])
        w = torch.stack([torch.cat([m[k].double().reshape(-1) for k in keys]) for m in full.extra["models"]])
        torch.testing.assert_close(full.extra["omega"], task_covariance(w, 1e-2))
        mean = {k: torch.stack([m[k] for m in full.extra["models"]]).mean(0) for k in keys}
        assert all(torch.equal(full.params[k], mean[k]) for k in keys)


def test_fedem_clients_are_evaluated_as_mixtures(tmp_path, synthetic_cache):
    from asymvlm.config import DataArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.training.client_eval import client_evaluator

    cache = synthetic_cache(tmp_path / "c", 48)
    fed = _fed(tmp_path / "ev", "fedem", '{"components": 2}', 2, client_test_fraction=0.25, eval_every=1)
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    head = HeadConfig(dim=16, hidden_dims=(16,), direction="learned")
    state, model = run_federated(fed, data, head=head, evaluate_client=client_evaluator(data.tests))
    rec = [json.loads(x) for x in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()][-1]
    got = rec["client_metrics"]["cluster"]["1"]["R@1"]
    # the transcription: rank the pooled test images by log sum_m pi_m p_m(x | t)
    pi = ClientStates(tmp_path / "ev" / "clients").load(1, upto=2)["pi"]
    per = []
    for m, params in enumerate(state.extra["models"]):
        model.set_params(params)
        with torch.no_grad():
            q = model.head(data.tests.texts[1])
        per.append(torch.log(pi[m].double()) + log_likelihood(q, data.tests.images).double())
    scores = torch.logsumexp(torch.stack(per), 0)
    own = scores.gather(1, data.tests.image_index[1][:, None])
    assert got == pytest.approx(float(((scores > own).sum(1) == 0).double().mean()), abs=1e-12)


def test_multitask_methods_refuse_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown option"):
        _fed(tmp_path, "mocha", '{"omega": 1}')
    run = Federation.build(_fed(tmp_path / "x", "mocha", ""), _data(), HEAD)
    assert run.cluster.clusterer.on_flower and run.cluster.clusterer.lam == 1e-3
    assert ClientOptions().local_steps == 10  # the defaults MOCHA's clients train with


def test_mocha_bounds_its_curvature_and_refuses_steps_that_diverge(tmp_path):
    w = torch.ones(8, 30, dtype=torch.float64) + 1e-6 * torch.randn(8, 30, dtype=torch.float64)  # nearly one task
    inv = torch.linalg.inv(task_covariance(w, eps=1e-2))
    assert float(torch.linalg.eigvalsh(inv).max()) <= 8 / 1e-2**0.5 * (1 + 1e-9)
    with pytest.raises(ConfigError, match="must be < 2"):
        Federation.build(_fed(tmp_path / "m", "mocha", '{"lam": 1.0}', local_lr=1.0), _data(), HEAD).start({}, None)
