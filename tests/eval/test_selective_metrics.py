"""Calibration, selective prediction, OOD and direction metrics against plain-python references."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from asymvlm.eval.plots import plot_reliability, plot_risk_coverage
from asymvlm.eval.uncertainty import (
    LEGEND,
    error_auroc,
    expected_calibration_error,
    ood_auroc,
    reliability_curve,
    selective_report,
    uncertainty_direction,
)
from asymvlm.eval.zeroshot import aurc, selective_accuracy_at


# ---------------------------------------------------------------------------------------------
# an independent transcription of the binning and of ECE (Guo et al. 2017; Nixon et al. 2019)
# ---------------------------------------------------------------------------------------------
def naive_edges(p, n_bins, strategy):
    if strategy == "uniform":
        return [i / n_bins for i in range(n_bins + 1)]
    s = sorted(p)  # quantiles with linear interpolation between order statistics
    edges = []
    for i in range(n_bins + 1):
        pos = i * (len(s) - 1) / n_bins
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        edges.append(s[lo] + (pos - lo) * (s[hi] - s[lo]))
    return edges


def naive_curve(p, c, n_bins, strategy):
    """[(mean p, mean c, count)] per non-empty bin; bins [e_i, e_i+1), the last one closed."""
    edges = naive_edges(p, n_bins, strategy)
    rows = []
    for i in range(n_bins):
        last = i == n_bins - 1
        members = [
            j for j in range(len(p)) if edges[i] <= p[j] and (p[j] < edges[i + 1] or (last and p[j] <= edges[-1]))
        ]
        if members:
            rows.append(
                (sum(p[j] for j in members) / len(members), sum(c[j] for j in members) / len(members), len(members))
            )
    return rows, edges


def naive_ece(p, c, n_bins, strategy):
    rows, _ = naive_curve(p, c, n_bins, strategy)
    return sum(n / len(p) * abs(acc - conf) for conf, acc, n in rows)


def _random_case(seed, n=257, ties=False):
    g = np.random.default_rng(seed)
    p = g.random(n)
    p[:3] = [0.0, 1.0, 1.0]  # the ends of [0, 1]; 1.0 belongs to the last bin
    if ties:
        p = np.round(p, 1)  # many ties, several exactly on uniform edges (0.3 == 3 / 10)
    # even seeds overconfident everywhere; odd seeds a flat accuracy: underconfident low bins,
    # overconfident high ones (gaps of both signs)
    c = g.random(n) < (p**1.5 if seed % 2 == 0 else 0.6)
    return p, c


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [1, 2, 7, 10, 15, 40])
@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, False), (3, True), (4, True)])
def test_ece_and_reliability_curve_match_a_plain_transcription(strategy, n_bins, seed, ties):
    p, c = _random_case(seed, ties=ties)
    rows, edges = naive_curve(p.tolist(), c.astype(float).tolist(), n_bins, strategy)
    curve = reliability_curve(torch.tensor(p), torch.tensor(c), n_bins, strategy)
    assert curve["edges"].dtype == torch.float64 and curve["confidence"].dtype == torch.float64
    np.testing.assert_allclose(curve["edges"].numpy(), edges, rtol=0, atol=1e-12)
    assert curve["count"].tolist() == [n for _, _, n in rows]
    np.testing.assert_allclose(curve["confidence"].numpy(), [r[0] for r in rows], rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve["accuracy"].numpy(), [r[1] for r in rows], rtol=0, atol=1e-12)
    ece = expected_calibration_error(p, c, n_bins, strategy)  # numpy input works too
    assert ece == pytest.approx(naive_ece(p.tolist(), c.tolist(), n_bins, strategy), abs=1e-12)
    n = curve["count"].sum().double()  # int64 / int64 would be float32 in torch
    from_curve = float((curve["count"] / n * (curve["accuracy"] - curve["confidence"]).abs()).sum())
    assert ece == pytest.approx(from_curve, abs=1e-12)
    assert int(n) == len(p)


def test_quantile_bins_hold_equal_counts_without_ties():
    g = np.random.default_rng(5)
    p = g.random(103)
    c = g.random(103) < p
    for n_bins in (2, 3, 7, 10, 103):
        count = reliability_curve(p, c, n_bins, "quantile")["count"]
        assert count.sum() == 103 and len(count) == n_bins
        assert count.max() - count.min() <= 1


def test_ece_hand_checked_cases():
    # perfectly calibrated: 1 of 4 right at 0.25, 3 of 4 right at 0.75
    p = [0.25] * 4 + [0.75] * 4
    c = [1, 0, 0, 0, 1, 1, 1, 0]
    for strategy in ("uniform", "quantile"):
        assert expected_calibration_error(p, c, 10, strategy) == pytest.approx(0.0, abs=1e-15)
    # a constant probability: ECE = |p - accuracy| whatever the binning
    c = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
    for n_bins in (1, 3, 15):
        for strategy in ("uniform", "quantile"):
            assert expected_calibration_error([0.9] * 10, c, n_bins, strategy) == pytest.approx(0.2, abs=1e-12)
    # bin membership on the edges: 1.0 in the last bin, 0.3 in [0.3, 0.4), 0.0 in the first
    curve = reliability_curve([0.0, 0.3, 1.0], [0, 1, 1], n_bins=10)
    assert curve["bin"].tolist() == [0, 3, 9]
    assert curve["edges"][3] == 0.3
    # gaps of opposite signs add up: |1 - 0.2| and |0 - 0.8|, half the items each
    assert expected_calibration_error([0.2, 0.2, 0.8, 0.8], [1, 1, 0, 0], n_bins=5) == pytest.approx(0.8)
    # an overconfident classifier: 0.9 claimed, 0.5 observed
    assert expected_calibration_error(torch.full((6,), 0.9), torch.tensor([1, 0] * 3)) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "probability, correct, kwargs, match",
    [
        ([0.1, float("nan")], [1, 0], {}, "probability contains NaN"),
        ([0.1, 0.2], [1, float("inf")], {}, "correct contains NaN or inf"),
        ([0.1, 1.2], [1, 0], {}, r"probability must be in \[0, 1\], got 1.2 at index 1"),
        ([-0.1, 0.2], [1, 0], {}, r"probability must be in \[0, 1\]"),
        ([0.1, 0.2, 0.3], [1, 0], {}, "probability has 3 entries, correct 2"),
        ([], [], {}, "probability is empty"),
        ([0.1, 0.2], [1, 2], {}, "correct must be 0/1 or bool, got 2.0 at index 1"),
        ([0.1, 0.2], [1, 0], {"strategy": "equal"}, "unknown strategy 'equal'; valid: quantile, uniform"),
        ([0.1, 0.2], [1, 0], {"n_bins": 0}, "n_bins must be an integer >= 1"),
        ([0.1, 0.2], [1, 0], {"n_bins": 2.5}, "n_bins must be an integer >= 1"),
    ],
)
def test_calibration_bad_input_raises_a_helpful_error(probability, correct, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probability, correct, **kwargs)
    with pytest.raises(ValueError, match=match):
        reliability_curve(probability, correct, **kwargs)


# ---------------------------------------------------------------------------------------------
# AUROCs against scipy's Mann-Whitney U
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many ties
def test_ood_auroc_is_mann_whitney_u_over_pairs(seed, decimals):
    g = np.random.default_rng(seed)
    s_in, s_out = g.normal(0, 1, 70), g.normal(0.7, 1.3, 45)
    if decimals is not None:
        s_in, s_out = np.round(s_in, decimals), np.round(s_out, decimals)
    u = scipy.stats.mannwhitneyu(s_out, s_in).statistic
    assert ood_auroc(s_in, s_out) == pytest.approx(u / (70 * 45), abs=1e-12)
    assert ood_auroc(torch.tensor(s_in), torch.tensor(s_out)) == pytest.approx(u / (70 * 45), abs=1e-12)
    assert ood_auroc(s_out, s_in) == pytest.approx(1 - u / (70 * 45), abs=1e-12)  # swapping mirrors it
    assert ood_auroc([0.0, 1.0], [0.0, 1.0]) == 0.5 and ood_auroc([0.0], [1.0]) == 1.0
    with pytest.raises(ValueError, match="score_out is empty"):
        ood_auroc(s_in, [])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_auroc_is_unchanged_mann_whitney_u(seed):
    g = np.random.default_rng(seed)
    unc = np.round(g.random(90), 1)
    hits = g.random(90) > unc  # uncertain captions miss more
    u = scipy.stats.mannwhitneyu(unc[~hits], unc[hits]).statistic
    expected = u / ((~hits).sum() * hits.sum())
    assert error_auroc(torch.tensor(unc), torch.tensor(hits)) == pytest.approx(expected, abs=1e-12)
    assert error_auroc(unc, hits.astype(np.float64)) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(error_auroc(torch.tensor([0.1, 0.2]), torch.tensor([False, False])))


# ---------------------------------------------------------------------------------------------
# selective report
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_selective_report_reuses_aurc_and_selective_accuracy(seed):
    g = np.random.default_rng(seed)
    n = 60 + seed
    correct = g.random(n) > 0.35
    unc = np.round(g.random(n), 2)
    rep = selective_report(torch.tensor(unc), torch.tensor(correct), coverages=(0.5, 0.8, 1.0))
    assert list(rep) == [
        "error_auroc",
        "aurc",
        "oracle_aurc",
        "selective_accuracy@50",
        "selective_accuracy@80",
        "selective_accuracy@100",
    ]
    assert all(type(v) is float for v in rep.values())  # JSON-ready
    u, c = torch.tensor(unc), torch.tensor(correct)
    assert rep["aurc"] == aurc(u, c)
    assert rep["error_auroc"] == error_auroc(u, c)
    for cov in (0.5, 0.8, 1.0):
        assert rep[f"selective_accuracy@{int(round(100 * cov))}"] == selective_accuracy_at(u, c, cov)
    assert rep["selective_accuracy@100"] == pytest.approx(correct.mean())
    # the closed-form oracle is the AURC of the ideal order, and no order beats it
    cf = torch.tensor(correct, dtype=torch.float64)
    assert rep["oracle_aurc"] == pytest.approx(aurc(-cf, cf), abs=1e-12)
    for _ in range(20):
        assert rep["oracle_aurc"] <= aurc(torch.tensor(g.random(n)), c) + 1e-12
    assert selective_report(unc, correct)["oracle_aurc"] == rep["oracle_aurc"]  # numpy input, default coverages


def test_selective_report_edge_cases():
    assert selective_report([0.3, 0.1], [True, True])["oracle_aurc"] == 0.0
    assert selective_report([0.3, 0.1], [False, False])["oracle_aurc"] == 1.0
    with pytest.raises(ValueError, match="selective_accuracy@50.*twice"):
        selective_report([0.1, 0.2], [1, 0], coverages=(0.5, 0.501))
    with pytest.raises(ValueError, match="uncertainty has 2 entries, correct 3"):
        selective_report([0.1, 0.2], [1, 0, 1])
    with pytest.raises(ValueError, match="coverage must be in"):
        selective_report([0.1, 0.2], [1, 0], coverages=(0.0,))


# ---------------------------------------------------------------------------------------------
# the direction check
# ---------------------------------------------------------------------------------------------
def _check_lines(warnings):
    for w in warnings:
        assert w.startswith("uncertainty") and "\n" not in w and "good direction" in w


def test_uncertainty_direction_retrieval_success():
    g = np.random.default_rng(0)
    unc = g.random(1000)
    good = unc < np.median(unc)  # certain captions succeed
    assert uncertainty_direction(unc, correct=good) == []
    inverted = uncertainty_direction(unc, correct=~good)
    _check_lines(inverted)
    assert len(inverted) == 1 and inverted[0].startswith("uncertainty is inverted against retrieval success")
    assert "error AUROC 0.00 over 1,000 captions" in inverted[0]
    assert "above 0.5 = uncertain captions fail more" in inverted[0]
    # flat: a constant uncertainty (AUROC exactly 0.5) at any size, and one that does not move over
    # enough captions to tell (two null standard errors within flat)
    flat = uncertainty_direction(np.full(1000, 0.2), correct=good)
    _check_lines(flat)
    assert len(flat) == 1 and flat[0].startswith("uncertainty is flat against retrieval success: error AUROC 0.50")
    interleaved = np.arange(4000.0), np.tile([True, False, False, True], 1000)  # AUROC exactly 0.5
    assert error_auroc(*interleaved) == 0.5
    assert uncertainty_direction(*interleaved)[0].startswith("uncertainty is flat against retrieval success")
    # 1,000 captions cannot show flatness to within 0.03 (2 x SE = 0.037): nothing is said
    assert uncertainty_direction(interleaved[0][:1000], interleaved[1][:1000]) == []
    # the threshold: a weak but good uncertainty is flat only when flat exceeds its distance from 0.5
    n = 20000
    unc, good = g.random(n), g.random(n) < 0.5
    weak = np.where(good, 0.0, 1.0) * (g.random(n) < 0.1) + g.random(n)
    gap = error_auroc(weak, good) - 0.5  # misses got more uncertain: the good direction
    se = np.sqrt((n + 1) / (12 * good.sum() * (~good).sum()))
    assert 2 * se + 0.01 < gap < 0.2
    assert uncertainty_direction(weak, correct=good, flat=gap + 0.01)[0].startswith("uncertainty is flat")
    assert uncertainty_direction(weak, correct=good, flat=gap - 0.01) == []
    # a slightly inverted one within flat of 0.5 is flat, not inverted
    assert uncertainty_direction(weak, correct=~good, flat=gap + 0.01)[0].startswith("uncertainty is flat")
    inv = uncertainty_direction(weak, correct=~good, flat=gap - 0.01)  # the same uncertainty, inverted
    assert len(inv) == 1 and inv[0].startswith("uncertainty is inverted")
    # an inversion within sampling noise is not reported: 60 captions, AUROC 0.4 (2 x SE = 0.15)
    small = np.linspace(0, 1, 60)
    noisy = np.random.default_rng(0).random(60) < 0.3 + 0.4 * small  # uncertain ones succeed more often
    assert 0.35 < error_auroc(small, noisy) < 0.45 and uncertainty_direction(small, correct=noisy) == []
    assert uncertainty_direction(np.tile(small, 40), correct=np.tile(noisy, 40))[0].startswith("uncertainty is inv")
    # skipped: too few captions, one class
    g2 = np.random.default_rng(0)
    unc = g2.random(1000)
    good = unc < np.median(unc)
    assert uncertainty_direction(unc[:19], correct=~good[:19]) == []
    assert uncertainty_direction(unc[:19], correct=~good[:19], min_count=5) != []
    assert uncertainty_direction(unc, correct=np.ones(1000, dtype=bool)) == []


def test_uncertainty_direction_ambiguity():
    g = np.random.default_rng(1)
    unc = g.random(300)
    level = np.digitize(unc, [0.25, 0.5, 0.75])  # a caption level: higher = vaguer
    assert uncertainty_direction(unc, ambiguity=level) == []
    inverted = uncertainty_direction(unc, ambiguity=-level)
    _check_lines(inverted)
    assert len(inverted) == 1
    assert inverted[0].startswith("uncertainty is inverted against caption ambiguity: Spearman rho -0.9")
    assert "over 300 captions" in inverted[0] and "positive = vaguer captions get more uncertainty" in inverted[0]
    big = g.random(40000)
    unrelated = g.permutation(np.digitize(big, [0.25, 0.5, 0.75]))
    rho = scipy.stats.spearmanr(big, unrelated).statistic
    warnings = uncertainty_direction(big, ambiguity=unrelated, flat=abs(rho) + 0.01)
    assert len(warnings) == 1 and warnings[0].startswith("uncertainty is flat against caption ambiguity")
    # 300 captions cannot tell a flat rho from a weak one (2 x SE = 0.116): nothing is said
    shuffled = np.random.default_rng(101).permutation(level)
    assert abs(scipy.stats.spearmanr(unc, shuffled).statistic) < 0.03
    assert uncertainty_direction(unc, ambiguity=shuffled) == []
    assert uncertainty_direction(unc, ambiguity=shuffled, flat=0.12)[0].startswith("uncertainty is flat")
    assert uncertainty_direction(np.ones(300), ambiguity=level)[0].startswith("uncertainty is flat")
    # skipped: constant ambiguity, too few captions
    assert uncertainty_direction(unc, ambiguity=np.full(300, 3.0)) == []
    assert uncertainty_direction(unc[:10], ambiguity=-level[:10]) == []
    # both checks at once, each reported
    both = uncertainty_direction(unc, correct=unc > 0.5, ambiguity=-level)
    assert [w.split(":")[0] for w in both] == [
        "uncertainty is inverted against retrieval success",
        "uncertainty is inverted against caption ambiguity",
    ]
    with pytest.raises(ValueError, match="uncertainty has 300 entries, ambiguity 10"):
        uncertainty_direction(unc, ambiguity=level[:10])
    with pytest.raises(ValueError, match="flat must be in"):
        uncertainty_direction(unc, ambiguity=level, flat=0.6)


def test_legend_states_every_sign_convention():
    lines = LEGEND.splitlines()
    assert len(lines) >= 8
    for metric, good in [
        ("bin Spearman / Pearson", "negative is good"),
        ("error AUROC", "above 0.5 is good"),
        ("ambiguity Spearman", "positive is good"),
        ("ECE", "lower is good"),
        ("AURC", "oracle AURC is the floor"),
        ("OOD AUROC", "above 0.5 is good"),
        ("selective accuracy", "higher is good"),
    ]:
        assert any(line.strip().startswith(metric) and good in line for line in lines), metric


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot_risk_coverage_and_reliability_write_pngs(tmp_path):
    g = np.random.default_rng(0)
    correct = g.random(200) > 0.3
    curves = {"1/kappa": (g.random(200), correct), "entropy": (torch.tensor(np.where(correct, 0.2, 0.8)), correct)}
    out = plot_risk_coverage(curves, tmp_path / "rc.png", title="risk")
    assert out == tmp_path / "rc.png"
    w, h = _png_size(out)
    assert 300 <= w <= 1500 and 200 <= h <= 1500
    prob = g.random(200)
    out = plot_reliability(prob, g.random(200) < prob, str(tmp_path / "rel.png"), n_bins=10)
    w, h = _png_size(out)
    assert 300 <= w <= 1500 and 300 <= h <= 1500


def test_plots_reject_empty_input(tmp_path):
    with pytest.raises(ValueError, match="curves is empty"):
        plot_risk_coverage({}, tmp_path / "rc.png")
    with pytest.raises(ValueError, match="must be non-empty"):
        plot_risk_coverage({"a": ([], [])}, tmp_path / "rc.png")
    with pytest.raises(ValueError, match="probability is empty"):
        plot_reliability([], [], tmp_path / "rel.png")
    assert list(tmp_path.iterdir()) == []
