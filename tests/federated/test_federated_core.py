"""asymvlm.federated.core: aggregators and server optimizers against numpy transcriptions.

References: the published formulas (Reddi et al. 2021 Algorithm 2 for FedAdam/FedYogi/FedAdagrad;
Hsu et al. 2019 for FedAvgM; Yin et al. 2018 for median/trimmed mean; Blanchard et al. 2017 for
Krum) and Flower's strategies where they differ (transcribed as equations; which of our
parameters reproduce which is stated in each test).
"""

import math
import weakref

import numpy as np
import pytest
import scipy.stats
import torch

from asymvlm.federated.core import (
    ClientUpdateError,
    ClippedMean,
    CoordinateMedian,
    Krum,
    Sum,
    TrimmedMean,
    WeightedMean,
    apply_updates,
    chain,
    check_delta,
    flatten_state,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_yogi,
    trace,
    unflatten_state,
    validate_deltas,
)

SHAPES = {"a": (3, 4), "b": (5,), "c": ()}


def clients(k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g, dtype=dtype) for n, s in SHAPES.items()} for _ in range(k)]


def np_tree(tree):
    return {k: v.double().numpy() for k, v in tree.items()}


def close(a, b, rtol=1e-6, atol=1e-7):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], dtype=np.float64), b[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------------------------------------
# aggregators
# ------------------------------------------------------------------------------------------
def test_weighted_mean_matches_flower_aggregate():
    deltas, n = clients(5), [10, 3, 7, 1, 9]
    got = WeightedMean()(deltas, n).delta
    # Flower aggregate(): sum_k n_k w_k / sum_k n_k
    ref = {k: sum(nk * d[k].double().numpy() for nk, d in zip(n, deltas)) / sum(n) for k in SHAPES}
    close(got, ref)
    uniform = WeightedMean("uniform")(deltas, n).delta
    close(uniform, {k: np.mean([d[k].double().numpy() for d in deltas], axis=0) for k in SHAPES})
    capped = WeightedMean("capped", cap=5)(deltas, n).delta
    cw = [min(x, 5) for x in n]
    close(capped, {k: sum(c * d[k].double().numpy() for c, d in zip(cw, deltas)) / sum(cw) for k in SHAPES})
    same = [deltas[0]] * 4  # identical deltas average to themselves
    close(WeightedMean()(same, [1, 2, 3, 4]).delta, np_tree(deltas[0]))


def test_weighted_mean_streams_one_client_at_a_time():
    alive = weakref.WeakSet()
    peak = {"n": 0}

    class Lazy(dict):
        def __init__(self, seed):
            super().__init__({k: None for k in SHAPES})
            self.seed = seed

        def __getitem__(self, key):  # CPython frees by reference count: the WeakSet is exact
            peak["n"] = max(peak["n"], len(alive))
            t = torch.full(SHAPES[key], float(self.seed))
            alive.add(t)
            return t

    res = WeightedMean("uniform")([Lazy(s) for s in range(20)], None).delta
    assert float(res["a"][0, 0]) == pytest.approx(np.mean(range(20)))
    assert peak["n"] <= 3  # the accumulators of earlier keys + this key's accumulator, never 20 copies


def test_sum_median_trimmed_mean_against_numpy_and_scipy():
    deltas = clients(7, seed=1)
    close(Sum()(deltas).delta, {k: sum(d[k].double().numpy() for d in deltas) for k in SHAPES})
    stacked = {k: np.stack([d[k].double().numpy() for d in deltas]) for k in SHAPES}
    close(CoordinateMedian()(deltas).delta, {k: np.median(v, axis=0) for k, v in stacked.items()})
    close(CoordinateMedian()(deltas[:6]).delta, {k: np.median(v[:6], axis=0) for k, v in stacked.items()})
    for beta in (0.0, 0.1, 0.2, 0.3):
        close(TrimmedMean(beta)(deltas).delta, {k: scipy.stats.trim_mean(v, beta, axis=0) for k, v in stacked.items()})
    with pytest.raises(ValueError, match="leaves no clients"):
        TrimmedMean(0.5)(deltas)


def naive_krum(deltas, n, f, to_keep):
    flat = [np.concatenate([d[k].double().numpy().ravel() for k in SHAPES]) for d in deltas]
    k = len(flat)
    m = max(1, k - f - 2)
    scores = []
    for i in range(k):
        dist = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(k) if j != i)
        scores.append(sum(dist[:m]))
    keep = sorted(range(k), key=lambda i: (scores[i], i))[:to_keep]
    w = np.array([n[i] for i in keep], dtype=np.float64)
    return keep, {key: sum(wi * deltas[i][key].double().numpy() for wi, i in zip(w, keep)) / w.sum() for key in SHAPES}


@pytest.mark.parametrize("f,to_keep", [(0, 1), (2, 1), (2, 3), (1, 5)])
def test_krum_and_multikrum_match_the_definition(f, to_keep):
    deltas, n = clients(8, seed=2), [3, 1, 4, 1, 5, 9, 2, 6]
    res = Krum(num_malicious=f, to_keep=to_keep)(deltas, n)
    keep, ref = naive_krum(deltas, n, f, to_keep)
    assert res.info["selected"] == keep
    close(res.delta, ref, rtol=1e-5)


def test_clipped_mean():
    deltas = clients(4, seed=3)
    res = ClippedMean(max_norm=1.0, weighting="uniform")(deltas)
    norms = [math.sqrt(sum(float((d[k].double() ** 2).sum()) for k in SHAPES)) for d in deltas]
    ref = {k: np.mean([min(1, 1 / nm) * d[k].double().numpy() for nm, d in zip(norms, deltas)], axis=0) for k in SHAPES}
    close(res.delta, ref)
    assert res.info["norms"] == pytest.approx(norms)


def test_validation_names_client_and_key():
    ref = clients(1)[0]
    good = clients(1, seed=9)[0]
    check_delta(ref, good, "ok")
    bad_shape = {**good, "a": torch.zeros(4, 3)}
    with pytest.raises(ClientUpdateError, match=r"client 'c7': 'a' has shape \(4, 3\)"):
        check_delta(ref, bad_shape, "c7")
    with pytest.raises(ClientUpdateError, match="dtype torch.float64"):
        check_delta(ref, {**good, "b": good["b"].double()}, 3)
    with pytest.raises(ClientUpdateError, match=r"keys differ .*missing \['c'\]"):
        check_delta(ref, {"a": good["a"], "b": good["b"]}, 3)
    nan = {**good, "c": torch.tensor(float("nan"))}
    ok, rejected = validate_deltas(ref, [good, nan, good], ["x", "y", "z"])
    assert ok == [0, 2] and rejected[0][0] == "y" and "NaN" in rejected[0][1]


# ------------------------------------------------------------------------------------------
# server optimizers
# ------------------------------------------------------------------------------------------
def run(tx, params, deltas_per_round, **info):
    state = tx.init(params)
    for d in deltas_per_round:
        step, state = tx.update(d, state, params, **info)
        params = apply_updates(params, step)
    return params, state


def np_adaptive(params, rounds, kind, eta, b1, b2, tau, correction=None):
    """Reddi et al. 2021 Algorithm 2 (m, v from 0); correction(t) multiplies eta if given."""
    w = np_tree(params)
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, delta in enumerate(rounds, 1):
        d = np_tree(delta)
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * d[k]
            if kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d[k] ** 2
            elif kind == "yogi":
                v[k] = v[k] - (1 - b2) * d[k] ** 2 * np.sign(v[k] - d[k] ** 2)
            else:
                v[k] = v[k] + d[k] ** 2
            lr = eta * (correction(t) if correction else 1.0)
            w[k] = w[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    return w


@pytest.fixture
def rounds():
    return clients(5, seed=4, dtype=torch.float64)


@pytest.fixture
def params():
    return clients(1, seed=5, dtype=torch.float64)[0]


def test_fedadam_paper_and_flower(params, rounds):
    paper = np_adaptive(params, rounds, "adam", 0.1, 0.9, 0.99, 1e-9)
    close(run(chain(scale_by_adam(0.9, 0.99, 1e-9), scale(0.1)), params, rounds)[0], paper, rtol=1e-12)
    # Flower's FedAdam: eta * sqrt(1 - b2^(r+1)) / (1 - b1^(r+1)), rounds r from 1
    flower = np_adaptive(
        params,
        rounds,
        "adam",
        0.1,
        0.9,
        0.99,
        1e-9,
        correction=lambda r: math.sqrt(1 - 0.99 ** (r + 1)) / (1 - 0.9 ** (r + 1)),
    )
    tx = chain(scale_by_adam(0.9, 0.99, 1e-9, bias_correction=True, bias_correction_offset=1), scale(0.1))
    close(run(tx, params, rounds)[0], flower, rtol=1e-12)
    kingma = np_adaptive(
        params, rounds, "adam", 0.1, 0.9, 0.99, 1e-9, correction=lambda t: math.sqrt(1 - 0.99**t) / (1 - 0.9**t)
    )
    close(
        run(chain(scale_by_adam(0.9, 0.99, 1e-9, bias_correction=True), scale(0.1)), params, rounds)[0],
        kingma,
        rtol=1e-12,
    )


def test_fedyogi_and_fedadagrad_paper_equals_flower(params, rounds):
    # Flower's FedYogi/FedAdagrad have no bias correction and start v at 0: identical to the paper here
    yogi = np_adaptive(params, rounds, "yogi", 1e-2, 0.9, 0.99, 1e-3)
    close(run(chain(scale_by_yogi(0.9, 0.99, 1e-3), scale(1e-2)), params, rounds)[0], yogi, rtol=1e-12)
    ada = np_adaptive(params, rounds, "adagrad", 0.1, 0.0, 0.0, 1e-9)
    close(run(chain(scale_by_adagrad(eps=1e-9), scale(0.1)), params, rounds)[0], ada, rtol=1e-12)


def test_fedavgm_matches_flower(params, rounds):
    # Flower: g = w - avg (= -delta); v = g in round 1 else mu v + g; w <- w - lr v
    mu, lr = 0.9, 0.7
    w = np_tree(params)
    v = None
    for d in rounds:
        g = {k: -x for k, x in np_tree(d).items()}
        v = g if v is None else {k: mu * v[k] + g[k] for k in g}
        w = {k: w[k] - lr * v[k] for k in w}
    close(run(chain(trace(mu), scale(lr)), params, rounds)[0], w, rtol=1e-12)
    nesterov = run(chain(trace(mu, nesterov=True), scale(lr)), params, rounds)[0]
    assert not np.allclose(nesterov["a"].numpy(), w["a"])


def test_fedavg_is_identity_step(params, rounds):
    out, _ = run(scale(1.0), params, rounds)
    close(out, {k: params[k].numpy() + sum(d[k].numpy() for d in rounds) for k in SHAPES}, rtol=1e-12)


def test_state_roundtrips_through_flatten(params, rounds):
    tx = chain(trace(0.5), scale_by_adam(), scale(0.1))
    _, state = run(tx, params, rounds)
    tensors, skeleton = flatten_state(state)
    import json

    back = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    a, _ = tx.update(rounds[0], state, params)
    b, _ = tx.update(rounds[0], back, params)
    for k in a:
        assert torch.equal(a[k], b[k])
    with pytest.raises(TypeError, match="cannot checkpoint"):
        flatten_state({"x": object()})
