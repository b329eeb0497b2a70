"""One implementation each: eval's zero-shot is asymvlm.zeroshot.zero_shot_classify, and R@1 is
eval's rank-based, pessimistic-tie definition (asymvlm.eval.retrieval.t2i_recall_at_1)."""

from types import SimpleNamespace

import pytest
import torch

from asymvlm.eval import benchmark
from asymvlm.eval.benchmark import EvalData, evaluate
from asymvlm.eval.retrieval import positive_ranks, positives_from_index, recall_at_k, t2i_recall_at_1
from asymvlm.eval.zeroshot import accuracy, aurc, selective_accuracy_at
from asymvlm.heads import TextHead
from asymvlm.model import AsymVLM
from asymvlm.zeroshot import zero_shot_classify


def _half_vectors(n: int, d: int, generator) -> torch.Tensor:
    """Unit vectors with four entries +-1/2 and zeros elsewhere: their dot products are multiples of
    1/4, exact in float32 whatever the summation order, so equal scores are exact ties."""
    out = torch.zeros(n, d)
    for row in range(n):
        cols = torch.randperm(d, generator=generator)[:4]
        out[row, cols] = 0.5 * (2 * torch.randint(0, 2, (4,), generator=generator) - 1).float()
    return out


def _world(seed: int, n: int = 48, d: int = 16, classes: int = 4):
    """Images, captions and class prompts (the last duplicates class 0), all exact +-1/2 vectors."""
    g = torch.Generator().manual_seed(seed)
    images = _half_vectors(n, d, g)
    text = _half_vectors(n, d, g)
    protos = _half_vectors(classes, d, g)
    return images, text, torch.cat([protos, protos[:1]])  # prompts (C + 1, d)


class ExactScores:
    """A duck-typed model with exact log-likelihoods ``kappa * cos`` (kappa 1 or 2, set by the text
    itself): classes with equal scores tie exactly, so tie-breaking is tested, not matmul rounding."""

    adapts_text_tower = False

    def __init__(self, logit_scale: float = 0.0):
        self.logit_scale = logit_scale

    def encode_text(self, emb):
        return SimpleNamespace(loc=emb, concentration=1.0 + (emb[:, 0] > 0).float())

    def log_likelihood(self, q, images):
        return q.concentration[:, None] * (q.loc @ images.T)  # (T, I)


def _model(kind: str, logit_scale: float, d: int = 16):
    if kind == "exact":
        return ExactScores(logit_scale)
    head = TextHead(dim=d, family=kind, hidden_dims=(8,), residual=True, init_concentration=20.0)
    return AsymVLM(head, logit_scale=logit_scale)


MODELS = [
    pytest.param("exact", 0.0, id="exact-ties"),
    pytest.param("vmf", 1.3, id="vmf"),
    pytest.param("ps", -0.7, id="ps"),
    # exp(-60) * log-likelihood ~ 1e-25: every posterior is exactly 1/C while the likelihoods still
    # differ, so an argmax of the posterior (the old eval code) would predict class 0 everywhere
    pytest.param("vmf", -60.0, id="vmf-tied-posteriors"),
]


@pytest.mark.parametrize("kind, logit_scale", MODELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_eval_zero_shot_predictions_are_zero_shot_classify(kind, logit_scale, seed):
    images, text, prompts = _world(seed)
    model = _model(kind, logit_scale)
    names = [f"c{i}" for i in range(prompts.shape[0])]
    core = zero_shot_classify(model, images, prompts, class_names=names)
    if kind == "exact":  # exact ties between classes, the first one wins
        ll = model.log_likelihood(model.encode_text(prompts), images).T  # (I, C)
        assert bool(((ll == ll.max(1, keepdim=True).values).sum(1) > 1).any())
        assert not bool((core.predictions == len(names) - 1).any())  # the duplicate of class 0 never wins
    if logit_scale < -10:  # the case that tells the likelihood argmax from the posterior argmax
        assert bool((core.probabilities == core.probabilities[:, :1]).all()) and bool((core.predictions != 0).any())
    # labelled with the core's predictions, eval scores accuracy 1 exactly when every prediction agrees
    data = EvalData(images, text, torch.arange(images.shape[0]), zero_shot={"t": (prompts, names, core.predictions)})
    report = evaluate(data, {"m": model}, include_clip=False)["m"]
    assert report["zeroshot_t_accuracy"] == 1.0


@pytest.mark.parametrize("kind, logit_scale", MODELS)
def test_eval_zero_shot_metrics_come_from_the_core_result(kind, logit_scale):
    images, text, prompts = _world(2)
    model = _model(kind, logit_scale)
    labels = torch.randint(0, prompts.shape[0], (images.shape[0],), generator=torch.Generator().manual_seed(3))
    names = [f"c{i}" for i in range(prompts.shape[0])]
    data = EvalData(images, text, torch.arange(images.shape[0]), zero_shot={"t": (prompts, names, labels)})
    report = evaluate(data, {"m": model}, include_clip=False)["m"]
    core = zero_shot_classify(model, images, prompts, class_names=names)
    correct = core.predictions == labels
    unc = 1 - core.probabilities.max(1).values
    assert report["zeroshot_t_accuracy"] == accuracy(core.predictions, labels)
    assert report["zeroshot_t_aurc"] == aurc(unc, correct)
    assert report["zeroshot_t_selective_accuracy@50"] == selective_accuracy_at(unc, correct, 0.5)
    assert report["zeroshot_t_aurc_likelihood"] == aurc(-core.log_likelihood, correct)


def test_clip_baseline_zero_shot_is_cosine_through_the_core(monkeypatch):
    images, text, prompts = _world(4)
    cos = images @ prompts.T  # (I, C), exact
    assert bool(((cos == cos.max(1, keepdim=True).values).sum(1) > 1).any())  # exact ties
    first_best = cos.argmax(1)  # the first class wins a tie
    names = [f"c{i}" for i in range(prompts.shape[0])]
    data = EvalData(images, text, torch.arange(images.shape[0]), zero_shot={"t": (prompts, names, first_best)})
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0])
        return zero_shot_classify(*args, **kwargs)

    monkeypatch.setattr(benchmark, "zero_shot_classify", spy)
    model = _model("vmf", 1.0)
    report = evaluate(data, {"m": model})
    assert len(calls) == 2 and calls[1] is model  # the baseline and the model: one classifier for both
    clip = report["clip"]
    assert clip["zeroshot_t_accuracy"] == 1.0
    probs = torch.softmax(100.0 * cos, dim=1)  # CLIP's fixed logit scale
    assert clip["zeroshot_t_aurc"] == aurc(1 - probs.max(1).values, torch.ones(images.shape[0], dtype=torch.bool))
    assert "zeroshot_t_aurc_likelihood" not in clip


# ---------------------------------------------------------------------------------------------
# R@1
# ---------------------------------------------------------------------------------------------
def _brute_force_r1(scores, index):
    hits = [
        all(scores[t, index[t]] > scores[t, j] for j in range(scores.shape[1]) if j != index[t])
        for t in range(scores.shape[0])
    ]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("seed", range(4))
def test_t2i_recall_at_1_is_the_rank_based_metric(seed):
    g = torch.Generator().manual_seed(seed)
    texts, num_images = 30, 7
    scores = torch.randint(-3, 3, (texts, num_images), generator=g).float()  # negative, many ties
    index = torch.randint(0, num_images, (texts,), generator=g)  # several texts per image
    ranks = positive_ranks(scores, positives_from_index(index, num_images))
    r1 = t2i_recall_at_1(scores, index)
    assert r1 == recall_at_k(ranks, (1,))["R@1"]
    assert r1 == t2i_recall_at_1(scores, index, num_images)
    assert r1 == pytest.approx(_brute_force_r1(scores, index))


def test_t2i_recall_at_1_counts_a_tied_negative_against_the_positive():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [-1.0, -2.0, -3.0]])
    index = torch.tensor([0, 1, 0])
    argmax_r1 = float((scores.argmax(1) == index).float().mean())  # first index wins every tie
    assert argmax_r1 == 1.0
    assert t2i_recall_at_1(scores, index) == pytest.approx(1 / 3)


def test_t2i_recall_at_1_of_constant_scores_is_zero():
    index = torch.tensor([0, 0, 1, 2, 2])
    assert t2i_recall_at_1(torch.zeros(5, 3), index) == 0.0
    assert t2i_recall_at_1(torch.full((5, 3), -7.0), index) == 0.0
    assert float((torch.zeros(5, 3).argmax(1) == index).float().mean()) > 0  # argmax would not say 0


def test_t2i_recall_at_1_texts_sharing_an_image():
    # five captions of image 1: each is its own query with image 1 as its only positive
    scores = torch.tensor([[0.1, 0.8, 0.2]] * 4 + [[0.9, 0.8, 0.2]])
    assert t2i_recall_at_1(scores, torch.ones(5, dtype=torch.int64)) == pytest.approx(0.8)


def test_t2i_recall_at_1_rejects_bad_arguments():
    scores = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="num_images"):
        t2i_recall_at_1(scores, torch.tensor([0, 1, 2]), num_images=5)
    with pytest.raises(ValueError, match="text_image_index"):
        t2i_recall_at_1(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text_image_index"):
        t2i_recall_at_1(scores, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="scores"):
        t2i_recall_at_1(torch.zeros(3), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# doctests of the five folders: collected once each, imported under their installed names
# ---------------------------------------------------------------------------------------------
def test_doctests_run_once_under_the_installed_module_names():
    """The root conftest.py: each doctest once (even with an explicit --doctest-modules), named by
    file path, its module imported as asymvlm.<folder>.<module>, never as a second copy by path."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import json, sys, pytest\n"
        "class Ids:\n"
        "    def pytest_collection_modifyitems(self, items):\n"
        "        self.ids = [i.nodeid for i in items]\n"
        "ids = Ids()\n"
        "rc = pytest.main(['-q', '-p', 'no:cacheprovider', '--doctest-modules', 'eval/retrieval.py', "
        "'eval/zeroshot.py', 'training/config.py'], plugins=[ids])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'eval', 'training', 'federated', 'merging'})\n"
        "print('RESULT', json.dumps({'rc': int(rc), 'ids': ids.ids, 'bad': bad}))\n"
    )
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["rc"] == 0, run.stdout[-3000:]
    assert result["bad"] == []  # no eval.retrieval / training.config copies next to the installed modules
    ids = result["ids"]
    assert len(ids) == len(set(ids))
    assert "eval/retrieval.py::asymvlm.eval.retrieval.t2i_recall_at_1" in ids
    assert "training/config.py::asymvlm.training.config" in ids
    assert all(i.split("::")[1].startswith(("asymvlm.eval.", "asymvlm.training.")) for i in ids)
