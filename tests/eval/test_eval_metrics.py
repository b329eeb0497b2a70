"""eval metrics against naive references (negative scores, several positives, ties)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from asymvlm.eval.benchmark import EvalData, evaluate, summary_table
from asymvlm.eval.retrieval import positive_ranks, positives_from_index, recall_at_k, retrieval_metrics
from asymvlm.eval.uncertainty import (
    ambiguity_spearman,
    bin_correlations,
    binned_recall,
    error_auroc,
    uncertainty_report,
)
from asymvlm.eval.zeroshot import accuracy, aurc, risk_coverage, selective_accuracy_at


def naive_rank(scores, pos):
    """Pessimistic rank by a full sort: negatives placed before positives on ties."""
    out = []
    for s, p in zip(scores.tolist(), pos.tolist()):
        # sort by (-score, is_positive) so ties put negatives first
        order = sorted(range(len(s)), key=lambda j: (-s[j], p[j]))
        out.append(next(r for r, j in enumerate(order) if p[j]))
    return torch.tensor(out)


def test_positive_ranks_match_a_full_sort_with_negative_scores_and_ties():
    g = torch.Generator().manual_seed(0)
    scores = (torch.randint(-20, 3, (40, 60), generator=g) * 0.5).float()  # negative, many ties
    pos = torch.rand(40, 60, generator=g) < 0.08
    pos[torch.arange(40), torch.randint(0, 60, (40,), generator=g)] = True
    assert torch.equal(positive_ranks(scores, pos, chunk_size=7), naive_rank(scores, pos))


def test_constant_scores_are_not_perfect_recall():
    pos = torch.eye(5, dtype=torch.bool)
    assert recall_at_k(positive_ranks(torch.zeros(5, 5), pos), (1,))["R@1"] == 0.0


def test_retrieval_metrics_both_directions_with_several_captions_per_image():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(30, 10, generator=g) - 5
    index = torch.arange(30) // 3  # three captions per image
    pos = positives_from_index(index, 10)
    m = retrieval_metrics(scores, pos)
    t2i = naive_rank(scores, pos)
    i2t = naive_rank(scores.T, pos.T)  # an image hits if any of its captions is in the top k
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(float((t2i < k).float().mean()))
        assert m[f"i2t_R@{k}"] == pytest.approx(float((i2t < k).float().mean()))
    assert m["t2i_mean_rank"] == pytest.approx(float(t2i.double().mean() + 1))
    assert m["i2t_median_rank"] == pytest.approx(float((i2t.double() + 1).median()))
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match="query 1 has no positive"):
        positive_ranks(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="bool tensor"):
        positive_ranks(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        positive_ranks(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="values in"):
        positives_from_index(torch.tensor([0, 5]), 3)


def test_binned_recall_and_correlations():
    g = np.random.default_rng(0)
    unc = torch.tensor(g.random(103))
    hits = torch.tensor(g.random(103) > unc.numpy())  # more uncertain -> more misses
    b = binned_recall(unc, hits, n_bins=10)
    order = np.argsort(unc.numpy(), kind="stable")
    for i, chunk in enumerate(np.array_split(order, 10)):
        assert b["recall"][i] == pytest.approx(hits.numpy()[chunk].mean())
        assert b["count"][i] == len(chunk)
    corr = bin_correlations(b["recall"])
    idx = np.arange(10)
    assert corr["spearman"] == pytest.approx(scipy.stats.spearmanr(idx, b["recall"]).statistic)
    assert corr["pearson"] == pytest.approx(scipy.stats.pearsonr(idx, b["recall"]).statistic)
    assert corr["spearman"] < 0  # recall falls as uncertainty rises: negative is good
    assert math.isnan(bin_correlations(torch.ones(4))["spearman"])
    rep = uncertainty_report(unc, hits, 5)
    assert len(rep["bin_recall"]) == 5 and 0.5 < rep["error_auroc"] <= 1
    with pytest.raises(ValueError, match="n_bins"):
        binned_recall(unc, hits, n_bins=0)
    with pytest.raises(ValueError, match="NaN"):
        binned_recall(torch.tensor([0.1, float("nan")]), torch.tensor([True, False]))


def test_error_auroc_matches_pair_counting_with_ties():
    g = np.random.default_rng(2)
    unc = np.round(g.random(60), 1)  # many ties
    hits = g.random(60) > 0.4
    miss_u, hit_u = unc[~hits], unc[hits]
    pairs = [(a > b) + 0.5 * (a == b) for a in miss_u for b in hit_u]
    assert error_auroc(torch.tensor(unc), torch.tensor(hits)) == pytest.approx(np.mean(pairs))
    assert math.isnan(error_auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


def test_ambiguity_spearman():
    amb = torch.tensor([192.0, 48, 8, 4, 1, 192, 32, 8, 4, 1])
    unc = 1 / torch.tensor([1.0, 2, 5, 7, 9, 1.5, 2.5, 4, 8, 10])
    assert ambiguity_spearman(unc, amb) == pytest.approx(scipy.stats.spearmanr(unc, amb).statistic)
    assert ambiguity_spearman(unc, amb) > 0.9


def test_risk_coverage_and_aurc_match_naive():
    g = np.random.default_rng(3)
    unc = g.random(50)
    correct = g.random(50) > 0.3
    cov, acc = risk_coverage(torch.tensor(unc), torch.tensor(correct))
    order = np.argsort(unc, kind="stable")
    for k in range(1, 51):
        assert acc[k - 1] == pytest.approx(correct[order[:k]].mean())
        assert cov[k - 1] == pytest.approx(k / 50)
    assert aurc(torch.tensor(unc), torch.tensor(correct)) == pytest.approx(np.mean(1 - acc.numpy()))
    assert selective_accuracy_at(torch.tensor(unc), torch.tensor(correct), 0.5) == pytest.approx(
        correct[order[:25]].mean()
    )
    # an uncertainty that ranks every error last beats a random one
    perfect = np.where(correct, 0.0, 1.0) + 1e-3 * g.random(50)
    assert aurc(torch.tensor(perfect), torch.tensor(correct)) < aurc(torch.tensor(unc), torch.tensor(correct))
    assert accuracy(torch.tensor([1, -1, 2]), torch.tensor([1, 1, 2])) == pytest.approx(2 / 3)


def test_evaluate_reports_clip_and_models_without_mixing_hits():
    from asymvlm.heads import TextHead
    from asymvlm.model import AsymVLM

    torch.manual_seed(0)
    d = 16
    images = torch.nn.functional.normalize(torch.randn(20, d), dim=-1)
    text = torch.nn.functional.normalize(images.repeat_interleave(2, 0) + 0.3 * torch.randn(40, d), dim=-1)
    consistent = torch.zeros(40, 20, dtype=torch.bool)
    consistent[torch.arange(40), torch.arange(40) // 2] = True
    consistent[::2] = True  # every other caption is vague: consistent with everything
    data = EvalData(
        images,
        text,
        torch.arange(40) // 2,
        levels=torch.arange(40) % 2,
        ambiguity=torch.where(torch.arange(40) % 2 == 0, 20.0, 1.0),
        consistent=consistent,
        zero_shot={"shape": (images[:3], ["a", "b", "c"], torch.arange(20) % 3)},
    )
    model = AsymVLM(TextHead(dim=d, hidden_dims=(8,), residual=True, init_concentration=20.0))
    report = evaluate(data, {"vmf": model}, n_bins=4)
    assert set(report) == {"clip", "vmf"}
    clip = report["clip"]
    # a residual head ranks images like CLIP
    assert report["vmf"]["t2i_R@1"] == pytest.approx(clip["t2i_R@1"])
    assert clip["consistent_t2i_R@1_level0"] == 1.0  # vague captions hit trivially under "consistent"
    assert "bin_recall" not in clip and len(report["vmf"]["bin_recall"]) == 4
    assert "uncertainty_ambiguity_spearman" in report["vmf"] and len(report["vmf"]["uncertainty_by_level"]) == 2
    assert 0 <= clip["zeroshot_shape_accuracy"] <= 1
    table = summary_table(report)
    assert "clip" in table and "vmf" in table
