"""Selecting lambda (issue 25): a criterion that moves with kappa (likelihood), the error AUROC of
1/kappa, flat-criterion detection (R@1 of heads with a frozen mean direction is the same for every
lambda), ``asymvlm-merge --select_by/--on_flat``, and the demo's federated grid choice."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import special

from asymvlm.cache import EmbeddingCache, write_cache
from asymvlm.errors import ConfigError
from asymvlm.heads import TextHead
from asymvlm.losses import log_likelihood
from asymvlm.merging.api import (
    SELECTION_CRITERIA,
    FlatCriterionError,
    FlatCriterionWarning,
    caption_positives,
    is_flat,
    lambda_search,
    likelihood_metric,
    merge,
    recall_at_1,
    recall_metric,
    retrieval_log_prob,
    uncertainty_metric,
)
from asymvlm.merging.cli import main
from asymvlm.merging.task_vectors import MergeInputError
from asymvlm.model import AsymVLM

SOURCE = {"spec": "open_clip:toy", "fingerprint": "f" * 64, "dim": 8}
GRID = [0.0, 0.5, 1.0, 2.0]


def frozen_head(seed=0):
    torch.manual_seed(seed)
    return TextHead(dim=8, hidden_dims=(16,), direction="frozen", residual=True, init_concentration=5.0)


def perturbed(head, seed, scale=0.3):
    h = frozen_head()
    h.load_state_dict(head.state_dict())
    with torch.no_grad():
        for p in h.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return h


@pytest.fixture()
def frozen_heads(tmp_path):
    """A saved base head with a frozen mean direction and two experts fine-tuned from it (perturbed)."""
    from asymvlm.io import tensor_fingerprint

    base = frozen_head()
    AsymVLM(base, encoder_source=dict(SOURCE), logit_scale=1.0).save_pretrained(tmp_path / "base")
    lineage = {"init_from": str(tmp_path / "base"), "init_from_fingerprint": tensor_fingerprint(base.state_dict())}
    paths = []
    for i in range(2):
        expert = AsymVLM(perturbed(base, 10 + i), encoder_source=dict(SOURCE), logit_scale=1.0, lineage=lineage)
        paths.append(expert.save_pretrained(tmp_path / f"ft{i}"))
    return tmp_path / "base", paths


def captioned_cache(path, n_images=12, seed=0, dim=8):
    """Two captions per image; caption strings repeat across images (caption k of image i is shared
    by images i and i + 1 for even i), so identical captions name several correct images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    idx = torch.arange(n_images).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[idx] + 0.4 * torch.randn(2 * n_images, dim, generator=g), dim=-1)
    captions = []
    for i in range(n_images):
        captions += [f"shared {i // 2}", f"own {i}"]
    write_cache(path, img, txt, idx, captions=captions)
    return path


@pytest.fixture()
def val_caches(tmp_path, synthetic_cache):
    return [captioned_cache(tmp_path / "val0", seed=1), synthetic_cache(tmp_path / "val1", 10, seed=2, dim=8)]


def reference_log_p(head, cache_path):
    """Independent float64 transcription: per caption, logsumexp of log q_t(x_i) over its correct
    images (own image + images of identical caption strings, found by a plain loop) minus
    logsumexp over every image; mean over captions."""
    c = EmbeddingCache.load(cache_path)
    with torch.no_grad():
        ll = log_likelihood(head(c.text_embeddings.float()), c.image_embeddings.float()).double()
    idx = c.text_image_index.tolist()
    values = []
    for t in range(ll.shape[0]):
        if c.captions is None:
            pos = [idx[t]]
        else:
            pos = sorted({idx[u] for u in range(len(idx)) if c.captions[u] == c.captions[t]})
        values.append(float(torch.logsumexp(ll[t, pos], 0) - torch.logsumexp(ll[t], 0)))
    return float(np.mean(values)), values


def vmf_log_density(head, text, images):
    """log q_t(x_i) of a vMF in float64 from scipy's Bessel function (no asymvlm code)."""
    with torch.no_grad():
        loc, kappa = head.loc_concentration(text.float())
    loc, kappa = loc.double().numpy(), kappa.double().numpy()
    d = loc.shape[1]
    v = d / 2 - 1
    log_c = v * np.log(kappa) - (d / 2) * np.log(2 * np.pi) - (np.log(special.ive(v, kappa)) + kappa)
    return torch.from_numpy(log_c[:, None] + kappa[:, None] * (loc @ images.double().numpy().T))


def merged_head(base, fts, lam):
    b = load_file(base / "head.safetensors")
    head = frozen_head()
    head.load_state_dict({k: b[k] + lam * sum(load_file(f / "head.safetensors")[k] - b[k] for f in fts) for k in b})
    return head


# ------------------------------------------------------------------------------------------------
# the likelihood and its positives
# ------------------------------------------------------------------------------------------------
def test_caption_positives_by_identity():
    pos = caption_positives(torch.tensor([0, 1, 2, 2]), 3, ["a dog", "a cat", "a dog", "grass"])
    assert pos.tolist() == [[True, False, True], [False, True, False], [True, False, True], [False, False, True]]
    assert caption_positives(torch.tensor([0, 1]), 2).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="2 captions for 3 caption rows"):
        caption_positives(torch.tensor([0, 1, 1]), 2, ["a", "b"])


def test_likelihood_metric_equals_a_float64_transcription(val_caches):
    head = perturbed(frozen_head(), 3)
    out = likelihood_metric(head, val_caches)(head.state_dict())
    refs = [reference_log_p(head, c)[0] for c in val_caches]
    assert out["log_p"] == pytest.approx(refs, rel=1e-12, abs=1e-12)
    # in chunks that do not divide T (float32 forward passes of other batch sizes: rounding only)
    chunked = likelihood_metric(head, val_caches, chunk_size=7)(head.state_dict())
    assert chunked["log_p"] == pytest.approx(refs, rel=1e-6)
    assert out["score"] == out["mean_log_p"] == pytest.approx(np.mean(refs), rel=1e-12)
    # the same R@1 as the package's one definition
    caches = [EmbeddingCache.load(c) for c in val_caches]
    r1 = [recall_at_1(head, c.text_embeddings, c.image_embeddings, c.text_image_index) for c in caches]
    assert out["R@1"] == r1 and out["mean_R@1"] == pytest.approx(np.mean(r1))
    # and the log-likelihoods themselves agree with scipy's vMF density in float64
    c = caches[0]
    ll = vmf_log_density(head, c.text_embeddings, c.image_embeddings)
    pos = caption_positives(c.text_image_index, c.image_embeddings.shape[0], c.captions)
    scipy_lp = torch.logsumexp(ll.masked_fill(~pos, -math.inf), 1) - torch.logsumexp(ll, 1)
    assert float(scipy_lp.mean()) == pytest.approx(out["log_p"][0], rel=1e-5)


def test_identical_captions_count_as_positives(tmp_path):
    path = captioned_cache(tmp_path / "v", n_images=6)
    c = EmbeddingCache.load(path)
    head = perturbed(frozen_head(), 4)
    images = c.image_embeddings.shape[0]
    with_identity = retrieval_log_prob(
        head, c.text_embeddings, c.image_embeddings, caption_positives(c.text_image_index, images, c.captions)
    )
    own_only = retrieval_log_prob(
        head, c.text_embeddings, c.image_embeddings, caption_positives(c.text_image_index, images)
    )
    shared = torch.tensor(["shared" in s for s in c.captions])
    assert bool((with_identity[shared] > own_only[shared]).all())  # a second correct image adds probability
    torch.testing.assert_close(with_identity[~shared], own_only[~shared], rtol=0, atol=0)
    assert with_identity.tolist() == pytest.approx(reference_log_p(head, path)[1], rel=1e-12)
    with pytest.raises(ValueError, match="has no correct image"):
        retrieval_log_prob(head, c.text_embeddings[:2], c.image_embeddings, torch.zeros(2, images, dtype=torch.bool))


def test_uncertainty_metric_is_the_error_auroc_of_inverse_kappa(val_caches):
    head = perturbed(frozen_head(), 5)
    out = uncertainty_metric(head, val_caches)(head.state_dict())
    for value, path in zip(out["error_AUROC"], val_caches):
        c = EmbeddingCache.load(path)
        with torch.no_grad():
            q = head(c.text_embeddings.float())
            ll = log_likelihood(q, c.image_embeddings.float())
        own = ll.gather(1, c.text_image_index[:, None]).squeeze(1)
        others = ll.scatter(1, c.text_image_index[:, None], -math.inf)
        miss = (others >= own[:, None]).any(1).numpy()  # a tie with another image is a miss
        u = (1 / q.concentration).double().numpy()
        # P(u_miss > u_hit) + P(tie) / 2, by brute force over pairs
        pairs = [(a > b) + 0.5 * (a == b) for a in u[miss] for b in u[~miss]]
        assert value == pytest.approx(float(np.mean(pairs)), rel=1e-12)
    assert out["score"] == pytest.approx(np.mean(out["error_AUROC"]))


# ------------------------------------------------------------------------------------------------
# flat detection and ties in lambda_search
# ------------------------------------------------------------------------------------------------
def test_is_flat_and_the_tie_rule():
    assert is_flat([0.3, 0.3, 0.3]) and is_flat([1.0, float("nan"), 1.0]) and is_flat([-1e6, -1e6 + 1e-4])
    assert not is_flat([0.3, 0.3 + 1e-6]) and not is_flat([0.3]) and not is_flat([0.3, float("nan")])
    assert is_flat([0.3, 0.31], tol=0.05)
    with pytest.raises(ConfigError, match="flat_tol must be a finite number >= 0"):
        is_flat([1.0], tol=-1)
    base, taus = {"w": torch.zeros(1)}, [{"w": torch.ones(1)}]

    # tied best scores, not flat: the first in grid order wins, whatever the order
    def metric(p):
        return float(p["w"][0] >= 1)

    res = lambda_search(base, taus, [1.0, 0.0, 2.0], metric)
    assert [c["score"] for c in res.curve] == [1.0, 0.0, 1.0] and res.best_lam == 1.0 and not res.flat
    assert lambda_search(base, taus, [2.0, 0.0, 1.0], metric).best_lam == 2.0
    with pytest.raises(ConfigError, match=r"on_flat='ignore' is not one of \['error', 'warn'\]"):
        lambda_search(base, taus, [1.0], lambda p: 1.0, on_flat="ignore")


def test_flat_r1_of_frozen_heads_is_an_error_naming_the_criterion(frozen_heads, val_caches):
    base, fts = frozen_heads
    model = AsymVLM.from_pretrained(base, load_encoder=False)
    b = load_file(base / "head.safetensors")
    taus = [{k: load_file(f / "head.safetensors")[k] - b[k] for k in b} for f in fts]
    metric = recall_metric(model.head, val_caches)
    with pytest.raises(FlatCriterionError) as err:
        lambda_search(b, taus, GRID, metric, criterion="r1")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "the selection criterion r1 (mean normalised R@1) is flat over lambda in [0.0, 0.5, 1.0, 2.0]" in message
    assert "every lambda scores" in message and "frozen mean direction" in message
    assert "--select_by likelihood" in message and "--on_flat warn" in message
    with pytest.warns(FlatCriterionWarning, match="is flat over lambda") as caught:
        res = lambda_search(b, taus, GRID, metric, criterion="r1", on_flat="warn")
    assert len(caught) == 1 and len(str(caught[0].message).splitlines()) == 1
    assert res.flat and res.best_lam == GRID[0] and res.criterion == "r1" and res.warning == str(caught[0].message)
    assert len({c["score"] for c in res.curve}) == 1
    # merge: nothing written on the error; with on_flat="warn" the report and the card say flat
    with pytest.raises(FlatCriterionError, match="select by likelihood"):
        merge(base, fts, base.parent / "m", "task_arithmetic", lam_grid=GRID, val=val_caches)
    assert not (base.parent / "m").exists()
    with pytest.warns(FlatCriterionWarning):
        rep = merge(base, fts, base.parent / "m", "task_arithmetic", lam_grid=GRID, val=val_caches, on_flat="warn")
    search = json.loads((base.parent / "m" / "merge.json").read_text())["lambda_search"]
    assert search["flat"] is True and search["criterion"] == "r1" and search["best_lam"] == GRID[0]
    assert rep["lam"] == GRID[0] and any("is flat over lambda" in w for w in rep["warnings"])
    from huggingface_hub import ModelCard

    recipe = ModelCard.load(base.parent / "m" / "README.md").data.to_dict()["asymvlm"]["recipe"]
    assert recipe["lambda_selected_by"] == "r1" and recipe["lambda_curve_flat"] is True


def test_likelihood_moves_where_r1_is_flat_and_selects_its_argmax(frozen_heads, val_caches):
    base, fts = frozen_heads
    out = base.parent / "m"
    rep = merge(base, fts, out, "task_arithmetic", lam_grid=GRID, val=val_caches, select_by="likelihood")
    search = json.loads((out / "merge.json").read_text())["lambda_search"]
    curve = search["curve"]
    assert search["criterion"] == "likelihood" and search["flat"] is False and "expert_R@1" not in rep
    assert [c["lam"] for c in curve] == GRID
    assert len({c["mean_R@1"] for c in curve}) == 1  # R@1 cannot move (frozen direction) ...
    scores = [c["score"] for c in curve]
    assert max(scores) - min(scores) > 1e-3  # ... the likelihood does
    for c in curve:  # each point re-computed independently
        head = merged_head(base, fts, c["lam"])
        assert c["log_p"] == pytest.approx([reference_log_p(head, v)[0] for v in val_caches], rel=1e-9)
    assert rep["lam"] == search["best_lam"] == GRID[int(np.argmax(scores))]
    assert search["best_score"] == max(scores)
    merged = AsymVLM.from_pretrained(out, load_encoder=False).head.state_dict()
    for k, v in merged_head(base, fts, rep["lam"]).state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-6)


def test_error_auroc_selection_and_bad_selection_options(frozen_heads, val_caches):
    base, fts = frozen_heads
    rep = merge(base, fts, base.parent / "e", "ties", density=0.5, lam_grid=GRID, val=val_caches,
                select_by="error_auroc")  # fmt: skip
    curve = rep["lambda_search"]["curve"]
    finite = [c for c in curve if math.isfinite(c["score"])]
    assert rep["lam"] == max(finite, key=lambda c: c["score"])["lam"] and not rep["lambda_search"]["flat"]
    assert sorted(SELECTION_CRITERIA) == ["error_auroc", "likelihood", "r1"]
    out = base.parent / "never"
    with pytest.raises(ConfigError, match=r"unknown selection criterion 'recall'; choose one of \['error_auroc'"):
        merge(base, fts, out, "ties", lam_grid=GRID, val=val_caches, select_by="recall")
    with pytest.raises(ConfigError, match="on_flat='quiet' is not one of"):
        merge(base, fts, out, "ties", lam_grid=GRID, val=val_caches, on_flat="quiet")
    with pytest.raises(MergeInputError, match="--select_by/--on_flat choose lambda on --lam_grid"):
        merge(base, fts, out, "ties", select_by="likelihood")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# asymvlm-merge
# ------------------------------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asymvlm-merge: error: "), err
    return lines[0]


def test_cli_select_by_likelihood_end_to_end(frozen_heads, val_caches, capsys):
    base, fts = frozen_heads
    common = ["--base", str(base), "--inputs", *map(str, fts), "--method", "task_arithmetic",
              "--lam_grid", ",".join(map(str, GRID)), "--val", *map(str, val_caches), "--no-progress"]  # fmt: skip
    assert main([*common, "--select-by", "likelihood", "--output_dir", str(base.parent / "m")]) == 0
    out = capsys.readouterr().out
    rep = json.loads((base.parent / "m" / "merge.json").read_text())
    assert "selecting lambda by likelihood on 2 validation cache(s)" in out and "mean R@1" in out
    assert f"best lam {rep['lam']} (score " in out and "by likelihood)" in out
    assert rep["lambda_search"]["criterion"] == "likelihood" and rep["lambda_search"]["flat"] is False
    # the default criterion (r1) on these heads: a one-line error that says what to do; nothing written
    assert main([*common, "--output_dir", str(base.parent / "r1")]) == 2
    line = one_error_line(capsys)
    assert "r1 (mean normalised R@1) is flat over lambda" in line and "--select_by likelihood" in line
    assert not (base.parent / "r1").exists()
    # --on_flat warn: one warning line, the first lambda, flat in the report
    assert main([*common, "--on_flat", "warn", "--output_dir", str(base.parent / "w")]) == 0
    captured = capsys.readouterr()
    warned = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(warned) == 1 and warned[0].startswith("asymvlm-merge: warning: the selection criterion r1"), warned
    assert "flat: every lambda scored the same" in captured.out
    assert json.loads((base.parent / "w" / "merge.json").read_text())["lambda_search"]["flat"] is True


def test_cli_unknown_selection_values_are_one_line_errors(frozen_heads, val_caches, tmp_path, capsys):
    base, fts = frozen_heads
    out = tmp_path / "never"
    common = ["--base", str(base), "--inputs", *map(str, fts), "--lam_grid", "0.5,1", "--val", *map(str, val_caches),
              "--output_dir", str(out)]  # fmt: skip
    assert main([*common, "--select_by", "recall"]) == 2
    line = one_error_line(capsys)
    assert "--select_by" in line and "invalid choice: 'recall'" in line
    assert "'r1'" in line and "'likelihood'" in line and "'error_auroc'" in line
    assert main([*common, "--on_flat", "ignore"]) == 2
    assert "invalid choice: 'ignore'" in one_error_line(capsys)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\ninputs: [{fts[0]}]\noutput_dir: {out}\nselect_by: auroc\n")
    assert main(["--config", str(recipe)]) == 2
    assert "select_by='auroc' is not one of ['r1', 'likelihood', 'error_auroc']" in one_error_line(capsys)
    assert main(["--base", str(base), "--inputs", *map(str, fts), "--select_by", "likelihood",
                 "--output_dir", str(out)]) == 2  # fmt: skip
    assert "--select_by/--on_flat choose lambda on --lam_grid" in one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# the demo's federated grid: R@1 first, ties (a flat grid) broken by the validation likelihood
# ------------------------------------------------------------------------------------------------
def test_demo_grid_choice_breaks_r1_ties_by_likelihood(capsys):
    from asymvlm.training.demo_federated import _choose

    moves = [dict(options={"server_lr": 0.01}, val=0.2, val_log_p=-1.0),
             dict(options={"server_lr": 0.03}, val=0.3, val_log_p=-3.0),
             dict(options={"server_lr": 0.1}, val=0.3, val_log_p=-2.0)]  # fmt: skip
    assert _choose("fedadam", moves) == 2  # the best R@1, tie broken by the likelihood
    assert "warning" not in capsys.readouterr().out
    flat = [dict(options={"server_lr": lr}, val=0.25, val_log_p=lp) for lr, lp in ((0.01, -2.0), (0.03, -1.5),
                                                                                    (0.1, -1.7))]  # fmt: skip
    assert _choose("fedyogi", flat) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "warning: fedyogi: validation R@1 is the same (0.250)" in lines[0]
    assert "lr 0.03" in lines[0]
    same = [dict(options={}, val=0.25, val_log_p=-1.0), dict(options={"server_lr": 0.5}, val=0.25, val_log_p=-1.0)]
    assert _choose("fedavgm", same) == 0  # a complete tie: grid order
    assert _choose("fedavg", [dict(options={}, val=-math.inf, val_log_p=-math.inf)]) == 0


def test_demo_validation_likelihood_is_the_merge_criterion(tmp_path):
    from asymvlm.eval.benchmark import EvalData
    from asymvlm.training.demo_federated import _specific_log_p

    path = captioned_cache(tmp_path / "v", n_images=8)
    c = EmbeddingCache.load(path)
    head = perturbed(frozen_head(), 6)
    # every caption at the top level: the demo's value is the merge criterion on the same data
    data = EvalData(c.image_embeddings, c.text_embeddings, c.text_image_index, levels=torch.ones(16, dtype=torch.int64),
                    captions=list(c.captions))  # fmt: skip
    assert _specific_log_p(head, data) == pytest.approx(likelihood_metric(head, [path])(head.state_dict())["score"])
    # only the most specific level counts
    levels = torch.tensor([0, 1] * 8)
    data = EvalData(c.image_embeddings, c.text_embeddings, c.text_image_index, levels=levels, captions=list(c.captions))
    rows = levels == 1
    own = [s for s, r in zip(c.captions, rows.tolist()) if r]
    pos = caption_positives(c.text_image_index[rows], 8, own)
    expected = float(retrieval_log_prob(head, c.text_embeddings[rows], c.image_embeddings, pos).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _specific_log_p(head, data) == pytest.approx(expected, rel=1e-12)
