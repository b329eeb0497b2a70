"""The parts of an answer's uncertainty and its calibrated probability of being right (asymvlm.confidence),
and the retrieval distribution computed in the top-k's streamed pass (asymvlm.retrieval).

References are float64 and dense: the whole (Q, N) log-likelihood matrix, torch.softmax, a
Newton-Raphson transcription of L2-regularised logistic regression.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from asymvlm.confidence import (
    Calibrator,
    ConfidenceModel,
    Familiarity,
    answer_features,
    fit_confidence,
    retrieval_labels,
    tail_p_value,
)
from asymvlm.distributions import PowerSpherical, VonMisesFisher
from asymvlm.errors import ArtefactError, ConfigError, InputError
from asymvlm.heads import TextHead
from asymvlm.model import AsymVLM
from asymvlm.retrieval import ImageIndex, OnlineSoftmax, TextIndex


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def dense_posterior(logp: torch.Tensor):
    """float64 log-partition, entropy and probabilities of softmax over the last axis."""
    logz = torch.logsumexp(logp, dim=1)
    p = torch.exp(logp - logz.unsqueeze(1))
    ent = -(p * torch.where(p > 0, torch.log(p), torch.zeros_like(p))).sum(1)
    return logz, ent, p


# ----------------------------------------------------------------------------------------------
# the streamed retrieval distribution
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [1, 3, 17])
def test_online_softmax_equals_dense(chunks):
    g = torch.Generator().manual_seed(chunks)
    logits = torch.randn(6, 101, generator=g, dtype=torch.float64) * torch.tensor(
        [0.1, 1, 10, 100, 1e3, 1e4]
    ).double().unsqueeze(1)
    logits[0, 5] = -math.inf  # a -inf logit drops out
    acc = OnlineSoftmax(6)
    for part in torch.tensor_split(logits, chunks, dim=1):
        acc.update(part)
    logz, ent, _ = dense_posterior(logits)
    assert torch.allclose(acc.log_partition, logz, rtol=1e-12, atol=1e-9)
    assert torch.allclose(acc.entropy, ent, rtol=1e-9, atol=1e-9)


def test_online_softmax_increasing_maxima_rescale():
    # each chunk holds a new maximum: every rescaling path is taken
    logits = torch.arange(40, dtype=torch.float64).reshape(1, 40) * 3.0
    acc = OnlineSoftmax(1)
    for s in range(0, 40, 4):
        acc.update(logits[:, s : s + 4])
    logz, ent, _ = dense_posterior(logits)
    assert torch.allclose(acc.log_partition, logz) and torch.allclose(acc.entropy, ent, atol=1e-12)
    # uniform logits: entropy log N
    acc = OnlineSoftmax(2)
    acc.update(torch.zeros(2, 7))
    acc.update(torch.zeros(2, 9))
    assert torch.allclose(acc.entropy, torch.full((2,), math.log(16), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("family", [VonMisesFisher, PowerSpherical])
@pytest.mark.parametrize(("backend", "scan"), [("exact", "float32"), ("exact", "bfloat16"), ("faiss", "float32")])
def test_image_index_posterior_equals_dense_reference(family, backend, scan):
    if backend == "faiss":
        pytest.importorskip("faiss")
    gallery = unit(1003, 16, seed=1)
    kappa = torch.tensor([0.5, 5.0, 50.0, 500.0, 5000.0])
    q = family(unit(5, 16, seed=2), kappa)
    index = ImageIndex(gallery, chunk_size=100, query_block=2, backend=backend, scan_dtype=scan)
    res = index.search(q, k=4)
    q64 = family(q.loc.double(), kappa.double())
    logp = q64.log_prob(gallery.double().unsqueeze(1)).T  # (Q, N) float64
    logz, ent, p = dense_posterior(logp)
    # float32 cosines times kappa: the logits are good to ~kappa * 1e-7 nats. The bf16 scan sums
    # the rows outside its candidate window from bf16 scores (each logit within kappa * 2^-8 |cos|,
    # or kappa * 2^-8 |cos| / (1 + cos) for Power Spherical; errors of both signs averaging over the
    # gallery): measured 2e-4 (vMF) to 2.6e-3 nats (PS, kappa 50, d = 16) here; tolerance 5e-3
    atol = 1e-4 if scan == "float32" else 5e-3
    assert torch.allclose(res.log_partition, logz, rtol=1e-6, atol=atol)
    assert torch.allclose(res.entropy.double(), ent, atol=atol)
    ref_p = p.gather(1, res.indices)
    assert torch.allclose(res.posterior.double(), ref_p, rtol=1e-3, atol=1e-5)
    # the hits are the dense top-k
    assert torch.equal(res.indices[:, 0], logp.argmax(1))
    # posterior off: nothing computed, same hits
    off = ImageIndex(gallery, chunk_size=100, backend=backend, scan_dtype=scan).search(q, k=4, posterior=False)
    assert off.posterior is None and off.entropy is None and torch.equal(off.indices, res.indices)


@pytest.mark.parametrize("family", ["vmf", "ps"])
def test_text_index_posterior_equals_dense_reference(family):
    loc = unit(300, 12, seed=3)
    kappa = torch.rand(300, generator=torch.Generator().manual_seed(4)) * 60 + 0.1
    index = TextIndex(loc, kappa, family, chunk_size=64, query_block=3)
    images = unit(7, 12, seed=5)
    res = index.search(images, k=5)
    dist = index._dist(0, 300)
    cls = type(dist)
    d64 = cls(loc.double(), kappa.double())
    logp = torch.stack([d64.log_prob(x) for x in images.double()])  # (Q, M)
    logz, ent, p = dense_posterior(logp)
    assert torch.allclose(res.log_partition, logz, rtol=1e-6, atol=1e-4)
    assert torch.allclose(res.entropy.double(), ent, atol=1e-4)
    assert torch.allclose(res.posterior.double(), p.gather(1, res.indices), rtol=1e-3, atol=1e-6)


def test_posterior_temperature_is_kappa():
    """Frozen direction: a vague text spreads, a specific text with a clear winner does not, a
    specific text among near-duplicates spreads over them."""
    gallery = unit(500, 8, seed=6)
    target = gallery[0]
    crowded = torch.nn.functional.normalize(target + 0.01 * unit(5, 8, seed=7), dim=-1)
    g2 = torch.cat([gallery, crowded])
    index_clear, index_crowd = ImageIndex(gallery), ImageIndex(g2)
    vague = VonMisesFisher(target.unsqueeze(0), torch.tensor([1.0]))
    sharp = VonMisesFisher(target.unsqueeze(0), torch.tensor([2000.0]))
    h_vague = float(index_clear.search(vague, k=1).entropy)
    h_sharp = float(index_clear.search(sharp, k=1).entropy)
    h_crowd = float(index_crowd.search(sharp, k=1).entropy)
    assert h_vague > math.log(500) - 0.5  # nearly uniform
    assert h_sharp < 0.05  # one winner
    assert h_crowd > math.log(3)  # the near-duplicates share the mass


def test_to_dict_carries_probabilities_and_entropy():
    gallery = unit(30, 8, seed=8)
    res = ImageIndex(gallery, ids=[f"i{j}" for j in range(30)]).search(
        VonMisesFisher(gallery[:2], torch.tensor([10.0, 100.0])), k=3
    )
    d = res.to_dict()["queries"]
    assert d[0]["hits"][0]["probability"] == pytest.approx(float(res.posterior[0, 0]))
    assert d[1]["entropy"] == pytest.approx(float(res.entropy[1]))
    json.dumps(d)


# ----------------------------------------------------------------------------------------------
# unfamiliarity
# ----------------------------------------------------------------------------------------------
def test_familiarity_score_is_the_soft_cosine_distance():
    x = unit(400, 10, seed=9)
    fam = Familiarity.fit(x, components=8, seed=0)
    assert fam.means.shape == (8, 10) and torch.allclose(fam.means.norm(dim=1), torch.ones(8), atol=1e-5)
    assert math.isclose(float(torch.logsumexp(fam.log_weights.double(), 0)), 0.0, abs_tol=1e-6)
    y = unit(20, 10, seed=10)
    ref = 1 - torch.logsumexp(fam.kappa * (y.double() @ fam.means.double().T) + fam.log_weights.double(), 1) / fam.kappa
    assert torch.allclose(fam.score(y).double(), ref, atol=1e-5)
    # about 1 - max cosine, never below it (log sum_k pi_k e^{kappa c_k} <= kappa max_k c_k)
    assert bool((fam.score(y).double() >= 1 - (y.double() @ fam.means.double().T).max(1).values - 1e-5).all())
    # the reference is sorted, the percentile and p-value read off it
    assert bool((fam.reference[1:] >= fam.reference[:-1]).all())
    u = fam.reference[len(fam.reference) // 2 : len(fam.reference) // 2 + 1]
    assert 40 <= float(fam.percentile(u)) <= 60
    assert float(fam.p_value(torch.tensor([-1e9]))) == pytest.approx(1.0)
    # the bulk: the conformal p-value; beyond the 90% quantile an exponential tail, decreasing
    ref = fam.reference
    n = ref.numel()
    mid = ref[n // 3 : n // 3 + 1]
    assert float(fam.p_value(mid)) == pytest.approx((1 + int((ref >= mid).sum())) / (n + 1))
    far = torch.tensor([float(ref[-1]) + 0.1, float(ref[-1]) + 0.5])
    pf = fam.p_value(far)
    assert float(pf[0]) < 1 / (n + 1) and float(pf[1]) < float(pf[0]) * 0.1
    t = ref[n - int(0.1 * n) - 1]
    lam = float((ref[n - int(0.1 * n) :] - t).mean())
    assert float(pf[1]) == pytest.approx((int(0.1 * n) + 1) / (n + 1) * math.exp(-(float(far[1]) - float(t)) / lam))


def test_familiarity_flags_an_unseen_region():
    # training texts on one cap of the sphere, unfamiliar ones on the opposite cap
    base = torch.zeros(32)
    base[0] = 1
    near = torch.nn.functional.normalize(base + 0.25 * unit(2000, 32, seed=11), dim=-1)
    far = torch.nn.functional.normalize(-base + 0.25 * unit(200, 32, seed=12), dim=-1)
    fam = Familiarity.fit(near[:1500], seed=1)
    u_in, u_out = fam.score(near[1500:]), fam.score(far)
    assert float(u_out.min()) > float(u_in.max())
    assert float(fam.percentile(u_out).min()) == 100.0


def test_familiarity_bad_input():
    with pytest.raises(InputError, match="unit"):
        Familiarity.fit(torch.randn(50, 4) * 3)
    with pytest.raises(InputError, match="NaN"):
        Familiarity.fit(torch.full((5, 4), float("nan")))
    with pytest.raises(ConfigError, match="components"):
        Familiarity.fit(unit(50, 4), components=500)
    fam = Familiarity.fit(unit(50, 4), components=2)
    with pytest.raises(InputError, match=r"\(N, 4\)"):
        fam.score(unit(3, 5))


# ----------------------------------------------------------------------------------------------
# the calibrator
# ----------------------------------------------------------------------------------------------
def newton_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Reference: Newton-Raphson on the L2-penalised (not on the intercept) logistic log-loss."""
    n, f = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    pen = np.diag([l2] * f + [0.0])
    for _ in range(100):
        p = 1 / (1 + np.exp(-xa @ theta))
        grad = xa.T @ (p - y) + pen @ theta
        hess = xa.T @ (xa * (p * (1 - p))[:, None]) + pen
        theta = theta - np.linalg.solve(hess, grad)
    return theta


def test_logistic_calibrator_equals_newton_reference():
    rng = np.random.default_rng(0)
    n = 600
    a, b = rng.normal(size=n), rng.normal(size=n) * 3 + 1
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.8 * a - 0.5 * b + 0.2)))).astype(float)
    cal = Calibrator.fit({"a": torch.from_numpy(a), "b": torch.from_numpy(b)}, torch.from_numpy(y), l2=1.0, by=None)
    assert len(cal.strata) == 1 and cal.by is None
    xs = np.stack([(a - a.mean()) / a.std(), (b - b.mean()) / b.std()], 1)
    ref = newton_logistic(xs, y, 1.0)
    m = cal.strata[0]
    assert np.allclose(m.coef, ref[:2], atol=1e-4) and math.isclose(m.intercept, ref[2], abs_tol=1e-4)
    p = cal.predict({"a": torch.from_numpy(a), "b": torch.from_numpy(b)}).numpy()
    assert np.allclose(p, 1 / (1 + np.exp(-(np.hstack([xs, np.ones((n, 1))]) @ ref))), atol=1e-5)
    # the penalised optimum: predicted total equals observed total (intercept unpenalised)
    assert math.isclose(p.sum(), y.sum(), rel_tol=1e-4)
    assert cal.weights()["a"] > 0 > cal.weights()["b"]


def test_stratified_calibrator_is_one_newton_fit_per_stratum():
    """The part h means opposite things in vague and in specific strata (as the retrieval entropy does
    for vague captions, whose best image satisfies them, and specific ones): one model over all
    averages the two signs away; one model per stratum learns each."""
    rng = np.random.default_rng(2)
    n = 3000
    amb = rng.normal(size=n)  # the stratifying part
    h = amb + 0.3 * rng.normal(size=n)  # tracks ambiguity across strata
    logit = 1.0 * amb + np.where(amb > 0, -6.0, 6.0) * (h - amb)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    feats = {"ambiguity": torch.from_numpy(amb), "h": torch.from_numpy(h)}
    cal = Calibrator.fit(feats, torch.from_numpy(y), max_strata=4, min_stratum=300)
    assert cal.by == "ambiguity" and len(cal.strata) == 4
    assert np.allclose(cal.edges, np.quantile(amb, [0.25, 0.5, 0.75]))
    group = np.searchsorted(np.asarray(cal.edges), amb, side="right")
    for g, m in enumerate(cal.strata):
        rows = group == g
        x = np.stack([amb[rows], h[rows]], 1)
        xs = (x - x.mean(0)) / x.std(0)
        ref = newton_logistic(xs, y[rows], 1.0)
        assert np.allclose(m.coef, ref[:2], atol=1e-4) and math.isclose(m.intercept, ref[2], abs_tol=1e-4)
        assert m.count == int(rows.sum())
        assert (m.coef[1] < 0) == (g >= 2)  # the stratum's own sign of h (edges[1] is the median, ~0)
    from asymvlm.eval.uncertainty import error_auroc

    one = Calibrator.fit(feats, torch.from_numpy(y), by=None)
    mid = amb > cal.edges[2]  # the most ambiguous stratum: success is decided by h there
    yt = torch.from_numpy(y[mid]).bool()
    strat = error_auroc(1 - cal.predict(feats)[torch.from_numpy(mid)], yt)
    single = error_auroc(1 - one.predict(feats)[torch.from_numpy(mid)], yt)
    assert strat > single + 0.1
    # a stratum short of right or wrong answers is merged into its neighbour
    y2 = y.copy()
    y2[amb < np.quantile(amb, 0.25)] = 0.0  # the lowest quarter: no right answer at all
    c2 = Calibrator.fit({"ambiguity": torch.from_numpy(amb), "h": torch.from_numpy(h)}, torch.from_numpy(y2))
    g2 = np.searchsorted(np.asarray(c2.edges), amb, side="right")
    assert len(c2.strata) < 4
    for g in range(len(c2.strata)):
        assert min(y2[g2 == g].sum(), (1 - y2[g2 == g]).sum()) >= 10


def test_isotonic_step_is_monotone_and_calibrates_in_sample():
    rng = np.random.default_rng(1)
    s = rng.normal(size=800)
    y = (rng.random(800) < 1 / (1 + np.exp(-3 * s))).astype(float)
    cal = Calibrator.fit({"s": torch.from_numpy(s)}, torch.from_numpy(y), method="logistic+isotonic")
    p = cal.predict({"s": torch.from_numpy(np.sort(s))}).numpy()
    assert np.all(np.diff(p) >= -1e-12)
    # isotonic regression reproduces the mean outcome in sample
    assert math.isclose(cal.predict({"s": torch.from_numpy(s)}).numpy().mean(), y.mean(), abs_tol=1e-9)


def test_degenerate_calibrator_is_the_base_rate():
    cal = Calibrator.fit({"a": torch.randn(50)}, torch.tensor([True] * 48 + [False] * 2))
    assert "base rate" in cal.strata[0].degenerate
    assert torch.allclose(cal.predict({"a": torch.randn(4)}), torch.full((4,), 49 / 52, dtype=torch.float64))


def test_calibrator_bad_input_and_round_trip():
    with pytest.raises(ConfigError, match="logistic"):
        Calibrator.fit({"a": torch.randn(20)}, torch.ones(20), method="platt")
    with pytest.raises(InputError, match="same non-zero length"):
        Calibrator.fit({"a": torch.randn(20)}, torch.ones(19))
    with pytest.raises(InputError, match="NaN"):
        Calibrator.fit({"a": torch.tensor([float("nan")] * 20)}, torch.ones(20))
    g = torch.Generator().manual_seed(3)
    feats = {"ambiguity": torch.randn(1000, generator=g), "b": torch.randn(1000, generator=g)}
    cal = Calibrator.fit(feats, torch.rand(1000, generator=g) > 0.5, method="logistic+isotonic")
    assert len(cal.strata) == 3
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    x = {"ambiguity": torch.randn(9), "b": torch.randn(9)}
    assert torch.equal(again.predict(x), cal.predict(x))
    with pytest.raises(InputError, match="needs the part"):
        cal.predict({"ambiguity": torch.randn(3)})
    d = cal.to_dict()
    for bad, message in [
        (d | {"strata": [d["strata"][0] | {"coef": [1.0]}] + d["strata"][1:]}, "do not match its 2 features"),
        (d | {"bias": 1}, "unknown calibrator key"),
        (d | {"strata": [d["strata"][0] | {"intercept": "nan"}] + d["strata"][1:]}, "not finite"),
        (d | {"edges": d["edges"][:1]}, "strata, edges and 'by' do not match"),
        (d | {"edges": d["edges"][::-1]}, "increasing"),
        (d | {"by": "nope"}, "do not match"),
        (d | {"strata": "x"}, "stratum must be a JSON object"),
        ([], "must be a JSON object"),
    ]:
        with pytest.raises(ArtefactError, match=message):
            Calibrator.from_dict(bad)


# ----------------------------------------------------------------------------------------------
# fitting on a split, attaching to a model, saving
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    images = unit(300, 16, seed=20)
    # texts near their image, at three noise levels: the noisier, the likelier a miss
    noise = torch.tensor([0.05, 0.4, 1.2]).repeat(100)
    texts = torch.nn.functional.normalize(images + noise.unsqueeze(1) * unit(300, 16, seed=21), dim=-1)
    model = AsymVLM(TextHead(dim=16, hidden_dims=(32,), residual=True, init_concentration=20.0))
    return images, texts, model


def test_fit_confidence_labels_and_features(toy):
    images, texts, model = toy
    conf = fit_confidence(model, images, texts, torch.arange(300), train_texts=texts, label="own image")
    assert conf.calibrator.info["gallery_size"] == 300 and conf.calibrator.info["label"] == "own image"
    assert set(conf.calibrator.features) == {"ambiguity", "retrieval_entropy", "top_surprise", "unfamiliarity"}
    res = ImageIndex(images).search(model.encode_text(texts), k=1)
    correct = retrieval_labels(res.indices[:, 0], torch.arange(300))
    assert conf.calibrator.info["base_rate"] == pytest.approx(float(correct.double().mean()))
    # (Q, N) positives give the same labels as the own-image index
    mask = torch.zeros(300, 300, dtype=torch.bool)
    mask[torch.arange(300), torch.arange(300)] = True
    assert torch.equal(retrieval_labels(res.indices[:, 0], mask), correct)
    # the answers' p_correct: the calibrator on the parts, scaled by the gate's p-value over alpha
    model.confidence = conf
    try:
        out = ImageIndex(images).search(texts, k=2, model=model)
    finally:
        model.confidence = None
    c = out.confidence
    feats = answer_features(1 / out.uncertainty.double(), out.entropy, out.posterior[:, 0], 300, c.unfamiliarity)
    cal = conf.calibrator
    gate = cal.gate_p_value(feats)
    p = cal.predict(feats) * (gate / conf.familiarity_alpha).clamp_max(1)
    assert torch.allclose(c.p_correct, p)
    # the gate: each answer's unfamiliarity among the fitted answers of its stratum
    assert len(cal.gate) == len(cal.strata)
    group = (
        torch.searchsorted(torch.tensor(cal.edges, dtype=torch.float64), feats[cal.by].contiguous(), right=True)
        if cal.by
        else torch.zeros(300, dtype=torch.int64)
    )
    fitted = answer_features(1 / res.uncertainty.double(), res.entropy, res.posterior[:, 0], 300, c.unfamiliarity)
    for g in range(len(cal.strata)):
        rows = group == g
        ref = torch.sort(fitted["unfamiliarity"][rows]).values  # the same texts were the calibration split
        assert torch.allclose(torch.tensor(cal.gate[g], dtype=torch.float64), ref)
        assert torch.allclose(gate[rows], tail_p_value(ref, feats["unfamiliarity"][rows]))
    assert torch.allclose(c.effective_candidates, torch.exp(out.entropy.double()))
    # the model's uncertainty predicts its misses on these texts
    from asymvlm.eval.uncertainty import error_auroc

    assert error_auroc(1 - c.p_correct, correct) > 0.8
    q0 = out.to_dict()["queries"][0]["confidence"]
    assert q0["calibrated"] is True and 0 <= q0["p_correct"] <= 1


def test_uncalibrated_parts_say_so(toy):
    images, texts, model = toy
    model.confidence = ConfidenceModel(Familiarity.fit(texts, seed=0))
    try:
        res = ImageIndex(images).search(texts[:3], k=1, model=model)
    finally:
        model.confidence = None
    assert res.confidence.p_correct is None
    assert res.confidence.calibration["source"] is None and "validation" in res.confidence.calibration["reason"]
    d = res.to_dict()["queries"][0]["confidence"]
    assert d["calibrated"] is False and d["p_correct"] is None and d["unfamiliarity"] is not None


def test_unfamiliar_query_is_not_confidently_right(toy):
    _, _, model = toy
    cap = torch.zeros(16)
    cap[0] = 1.0
    images = torch.nn.functional.normalize(cap + 0.3 * unit(300, 16, seed=22), dim=-1)  # one cap of the sphere
    texts = torch.nn.functional.normalize(images + 0.2 * unit(300, 16, seed=23), dim=-1)
    conf = fit_confidence(model, images, texts, torch.arange(300), train_texts=texts)
    model.confidence = conf
    try:
        far = torch.nn.functional.normalize(-cap + 0.3 * unit(20, 16, seed=24), dim=-1)  # the opposite cap
        res = ImageIndex(images).search(far, k=1, model=model)
    finally:
        model.confidence = None
    assert float(res.confidence.unfamiliarity_percentile.min()) == 100.0
    # scaled by the tail p-value over alpha: far beyond the reference, nearly zero
    u = res.confidence.unfamiliarity
    bound = (conf.familiarity.p_value(u) / conf.familiarity_alpha).clamp_max(1)
    assert float(bound.max()) < 1e-3
    assert bool((res.confidence.p_correct <= bound + 1e-12).all())


def test_confidence_saved_and_loaded_with_the_model(tmp_path, toy):
    images, texts, model = toy
    model.confidence = fit_confidence(model, images, texts, torch.arange(300), train_texts=texts)
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        conf, model.confidence = model.confidence, None
    cfg = json.loads((tmp_path / "m" / "asymvlm_config.json").read_text())
    assert cfg["confidence"] == "confidence.json"
    loaded = AsymVLM.from_pretrained(tmp_path / "m")
    a = ImageIndex(images).search(texts[:10], k=1, model=loaded).confidence
    model.confidence = conf
    try:
        b = ImageIndex(images).search(texts[:10], k=1, model=model).confidence
    finally:
        model.confidence = None
    assert torch.allclose(a.p_correct, b.p_correct) and torch.equal(a.unfamiliarity, b.unfamiliarity)
    # corrupt or inconsistent files are one clear error
    doc = json.loads((tmp_path / "m" / "confidence.json").read_text())
    (tmp_path / "m" / "confidence.json").write_text(json.dumps(doc | {"familiarity_alpha": 2}))
    with pytest.raises(ArtefactError, match="familiarity_alpha"):
        AsymVLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "confidence.json").write_text(json.dumps(doc))
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "m" / "familiarity.safetensors")
    t["familiarity.means"] = t["familiarity.means"] * 2
    save_file(t, tmp_path / "m" / "familiarity.safetensors")
    with pytest.raises(ArtefactError, match="unit"):
        AsymVLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "familiarity.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtefactError):
        AsymVLM.from_pretrained(tmp_path / "m")


def test_confidence_model_checks_alpha():
    with pytest.raises(ConfigError, match="familiarity_alpha"):
        ConfidenceModel(familiarity_alpha=1.5)


@pytest.mark.parametrize("family", [VonMisesFisher, PowerSpherical])
def test_in_place_logits_equal_the_family_log_density(family):
    """The search writes log q(x) - log C over its score buffer: the same numbers as the density's own
    _log_prob_from_cosine, at the antipode and for kappa 0 too."""
    g = torch.Generator().manual_seed(3)
    cos = torch.rand(5, 40, generator=g) * 2 - 1
    cos[:, 0] = -1.0
    cos[:, 1] = 1.0
    kappa = torch.tensor([0.0, 0.5, 5.0, 50.0, 5e3]).unsqueeze(1)
    ref = family._log_prob_from_cosine(cos, kappa, torch.zeros(()))
    buf = cos.clone()
    out = family._unnormalized_log_prob_(buf, kappa)
    assert out.data_ptr() == buf.data_ptr()  # in place: no copy per chunk
    assert torch.equal(out, ref)
