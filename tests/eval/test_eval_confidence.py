"""asymvlm.eval.confidence: the per-level confidence report, its checks, and where it is used
(asymvlm-eval, training). References: eval's metric functions on scores recomputed here from the
search and the density directly."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from asymvlm.confidence import ConfidenceModel, Familiarity, fit_confidence
from asymvlm.eval.benchmark import EvalData
from asymvlm.eval.confidence import (
    check_uncertainty,
    confidence_report,
    confidence_table,
    fit_model_confidence,
    positives_for,
)
from asymvlm.eval.uncertainty import error_auroc, expected_calibration_error, ood_auroc, selective_report
from asymvlm.heads import TextHead
from asymvlm.model import AsymVLM
from asymvlm.retrieval import ImageIndex


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def levelled_data(n=200, seed=0, dim=16):
    """Two levels: level 1 captions sit near their image, level 0 far from it (vague)."""
    images = unit(n, dim, seed=seed)
    idx = torch.arange(n).repeat(2)
    noise = torch.cat([torch.full((n,), 1.5), torch.full((n,), 0.6)])
    text = torch.nn.functional.normalize(images[idx] + noise.unsqueeze(1) * unit(2 * n, dim, seed=seed + 1), dim=-1)
    levels = torch.cat([torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64)])
    return EvalData(images, text, idx, levels=levels)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    head = TextHead(dim=16, hidden_dims=(32,), residual=True, init_concentration=15.0)
    with torch.no_grad():
        head.mlp[-1].weight.normal_(0, 0.3)  # concentrations that differ per text
    return AsymVLM(head)


def test_positives_for_each_kind_of_ground_truth():
    images = unit(4, 8)
    own = EvalData(images, images[[0, 1, 2, 3]], torch.tensor([0, 1, 2, 3]))
    pos, label = positives_for(own)
    assert label == "own image" and torch.equal(pos, torch.eye(4, dtype=torch.bool))
    same = EvalData(images, images[[0, 1, 2, 3]], torch.tensor([0, 1, 2, 3]), captions=["a", "b", "a", "c"])
    pos, label = positives_for(same)
    assert label.startswith("caption identity")
    assert pos[0].tolist() == [True, False, True, False] and pos[2].tolist() == [True, False, True, False]
    consistent = torch.tensor([[0, 1, 0, 0]] * 4, dtype=torch.bool)
    pos, label = positives_for(EvalData(images, images, torch.arange(4), consistent=consistent))
    assert label.startswith("consistent") and pos[0].tolist() == [True, True, False, False]  # own image included


def test_confidence_report_equals_direct_computation(model):
    val, test = levelled_data(seed=0), levelled_data(seed=10)
    conf = fit_model_confidence(model, val.text_embeddings, val)
    rep = confidence_report(model, test, confidence=conf, keep_outcomes=True)
    # the reference: search, parts and outcomes recomputed here
    res = ImageIndex(test.image_embeddings).search(model.encode_text(test.text_embeddings), k=1)
    correct = res.indices[:, 0] == test.text_image_index
    u = conf.familiarity.score(test.text_embeddings)
    ref = conf.assess(1 / res.uncertainty.double(), res.entropy, res.posterior[:, 0], 200, test.text_embeddings)
    assert torch.equal(rep["outcomes"]["correct"], correct)
    assert torch.allclose(rep["outcomes"]["p_correct"], ref.p_correct)
    assert rep["label"] == "own image" and rep["gallery_size"] == 200
    for level, mask in (("all", torch.ones(400, dtype=torch.bool)), ("1", test.levels == 1), ("0", test.levels == 0)):
        row = rep["levels"][level]
        y = correct[mask]
        assert row["count"] == int(mask.sum()) and row["accuracy"] == pytest.approx(float(y.double().mean()))
        s = row["scores"]
        assert s["1/kappa"]["error_auroc"] == pytest.approx(error_auroc(res.uncertainty[mask], y))
        assert s["unfamiliarity"]["aurc"] == pytest.approx(selective_report(u[mask], y)["aurc"])
        assert s["retrieval_entropy"]["error_auroc"] == pytest.approx(error_auroc(res.entropy[mask], y))
        p = ref.p_correct[mask]
        assert s["1 - p_correct"]["ece"] == pytest.approx(expected_calibration_error(p.clamp(0, 1), y))
        assert s["1 - p_correct"]["error_auroc"] == pytest.approx(error_auroc(1 - p, y))
        assert s["rank_oracle"]["error_auroc"] == 1.0  # own image: rank 0 is a hit, by definition
        assert s["rank_oracle"]["aurc"] == pytest.approx(s["rank_oracle"]["oracle_aurc"])
    # the parts tell hits from misses on these data (vague level-0 captions miss)
    assert rep["levels"]["all"]["scores"]["1 - p_correct"]["error_auroc"] > 0.8
    table = confidence_table(rep)
    assert "caption level 1" in table and "rank_oracle" in table and "ECE" in table
    s1 = rep["levels"]["1"]["scores"]["1 - p_correct"]
    assert f"L1 {s1['error_auroc']:.3f} / {s1['ece']:.3f}" in table  # every level on one line
    assert f"per level, R@1: L0 {rep['levels']['0']['accuracy']:.3f}" in table
    assert "negative is good" in table  # the legend with the sign conventions
    json.dumps({k: v for k, v in rep.items() if k != "outcomes"})


def test_ood_auroc_of_the_parts(model):
    cap = torch.zeros(16)
    cap[0] = 1
    images = torch.nn.functional.normalize(cap + 0.4 * unit(150, 16, seed=3), dim=-1)
    text = torch.nn.functional.normalize(images + 0.3 * unit(150, 16, seed=4), dim=-1)
    data = EvalData(images, text, torch.arange(150))
    conf = fit_model_confidence(model, text, data)
    far = torch.nn.functional.normalize(-cap + 0.4 * unit(80, 16, seed=5), dim=-1)
    rep = confidence_report(model, data, confidence=conf, ood_texts=far)
    o = rep["ood"]
    assert o["count_in"] == 150 and o["count_out"] == 80
    u_in, u_out = conf.familiarity.score(text), conf.familiarity.score(far)
    assert o["auroc"]["unfamiliarity"] == pytest.approx(ood_auroc(u_in.double(), u_out.double())) == 1.0
    assert o["auroc"]["1 - p_correct"] > 0.95 and o["mean_p_correct_out"] < 0.05


def test_uncalibrated_report_says_so(model):
    data = levelled_data(n=60)
    rep = confidence_report(model, data, confidence=ConfidenceModel(Familiarity.fit(data.text_embeddings)))
    assert "1 - p_correct" not in rep["levels"]["all"]["scores"] and rep["calibration"]["source"] is None
    assert "uncalibrated" in confidence_table(rep)


def test_check_uncertainty_warns_when_inverted_against_level_and_success():
    n = 400
    levels = torch.arange(4).repeat_interleave(n // 4)
    data = EvalData(unit(n, 8), unit(n, 8), torch.arange(n), levels=levels)
    correct = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5
    jitter = 1e-3 * torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    good = 1.0 / (1.0 + levels.double()) + jitter  # level 0 (vaguest) most uncertain
    assert check_uncertainty(good, correct, data) == []
    inverted = check_uncertainty(-good, correct, data)
    assert len(inverted) == 1 and "inverted against caption ambiguity" in inverted[0]
    assert inverted[0].endswith("(against caption level)")
    # retrieval success among the most specific captions
    top = levels == 3
    unc = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ok = unc > 0.5  # the uncertain ones succeed: inverted
    unc[~top] = 1.0 / (1.0 + levels[~top].double())
    msgs = check_uncertainty(unc, ok, data)
    assert any("inverted against retrieval success" in m and "(most specific level)" in m for m in msgs)
    # caption frequency stands in for ambiguity when texts repeat (a text true of many images)
    caps = [f"c{i % 50}" if i < 200 else f"unique {i}" for i in range(n)]
    data2 = EvalData(unit(n, 8), unit(n, 8), torch.arange(n), captions=caps)
    freq_inverted = torch.tensor([1.0 if i >= 200 else 0.0 for i in range(n)]) + 0.01 * unc
    msgs = check_uncertainty(freq_inverted, torch.ones(n, dtype=torch.bool), data2)
    assert len(msgs) == 1 and msgs[0].endswith("(against caption frequency)")


def test_fit_model_confidence_logs_and_records_inverted_uncertainty(caplog):
    data = levelled_data(n=300, seed=2)
    # a head whose concentration is the inverse of specificity: 1/kappa small for vague captions
    head = TextHead(dim=16, hidden_dims=(4,), residual=True, init_concentration=5.0)
    model = AsymVLM(head)
    vague_first = torch.cat([torch.full((300,), 200.0), torch.full((300,), 2.0)])

    class Inverted(AsymVLM):
        def encode_text(self, texts, **kw):
            q = super().encode_text(texts, **kw)
            return type(q)(q.loc, vague_first[: q.loc.shape[0]].to(q.loc.dtype))

    inv = Inverted(head)
    with caplog.at_level(logging.WARNING, logger="asymvlm.eval.confidence"):
        conf = fit_model_confidence(inv, data.text_embeddings, data)
    assert any("inverted against caption ambiguity" in r.getMessage() for r in caplog.records)
    assert any("inverted" in w for w in conf.calibrator.info["warnings"])
    assert model is not None


def test_confidence_report_rejects_nothing_silently(model):
    data = levelled_data(n=50)
    with pytest.raises(Exception, match="NaN|inf"):
        bad = EvalData(data.image_embeddings, data.text_embeddings * math.nan, data.text_image_index)
        confidence_report(model, bad)


# ----------------------------------------------------------------------------------------------
# asymvlm-eval and training
# ----------------------------------------------------------------------------------------------
def test_eval_cli_confidence_on_a_cache(tmp_path, model, capsys):
    from asymvlm.cache import write_cache
    from asymvlm.eval.cli import main

    for name, seed in (("test", 20), ("val", 30)):
        d = levelled_data(n=120, seed=seed)
        write_cache(tmp_path / name, d.image_embeddings, d.text_embeddings, d.text_image_index)
    own = levelled_data(n=120, seed=40)  # the model's own calibration split and training texts
    model.confidence = fit_confidence(
        model, own.image_embeddings, own.text_embeddings, own.text_image_index, train_texts=own.text_embeddings
    )
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        model.confidence = None
    out = tmp_path / "out"
    rc = main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "test"), "--calibration_cache",
               str(tmp_path / "val"), "--output_dir", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    rep = doc["confidence"]["m"]
    assert rep["calibration"]["source"].startswith("a calibration split of 240 captions")
    assert {"1/kappa", "retrieval_entropy", "top_surprise", "unfamiliarity", "1 - p_correct", "rank_oracle"} <= set(
        rep["levels"]["all"]["scores"]
    )
    assert (out / "risk_coverage-m.png").stat().st_size > 1000 and (out / "reliability-m.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "does it know when its answer is right" in printed and "Sign conventions" in printed
    # the model's own calibrator, and none
    assert main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "test"), "--calibration", "model",
                 "--output_dir", str(out)]) == 0  # fmt: skip
    source = json.loads((out / "metrics.json").read_text())["confidence"]["m"]["calibration"]["source"]
    assert source == "the model's own calibrator (a validation split of 240 captions)"
    assert main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "test"), "--calibration", "none",
                 "--output_dir", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["confidence"]["m"]["calibration"]["source"] is None
    # user errors are one line
    capsys.readouterr()
    rc = main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "test"), "--ood_texts", str(tmp_path / "x"),
               "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--ood_texts needs the models' encoder" in err
    rc = main(["--model", str(tmp_path / "m"), "--cache", str(tmp_path / "test"), "--calibration", "split",
               "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--calibration split needs --calibration_cache" in err
    rc = main(["--model", str(tmp_path / "m"), "--calibration", "sometimes"])
    assert rc == 2 and "invalid choice" in capsys.readouterr().err


def test_training_saves_the_density_and_calibrator(tmp_path, synthetic_cache):
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    cache = synthetic_cache(tmp_path / "cache", 200, dim=16)
    common = dict(cache_dir=str(cache), max_steps=5, batch_size=64, hidden_dims=[16], save_every=0, log_with="none",
                  progress=False, eval_every=-1)  # fmt: skip
    m1 = AsymVLM.from_pretrained(train(TrainConfig.from_dict({**common, "output_dir": str(tmp_path / "a")})))
    assert m1.confidence is not None and m1.confidence.familiarity is not None and m1.confidence.calibrator is None
    assert m1.confidence.familiarity.count == 400  # every training text (no held-out split)
    cfg = {**common, "output_dir": str(tmp_path / "b"), "eval_fraction": 0.25, "eval_every": 0}
    m2 = AsymVLM.from_pretrained(train(TrainConfig.from_dict(cfg)))
    assert m2.confidence.calibrator is not None and m2.confidence.calibrator.info["gallery_size"] == 50
    assert m2.confidence.familiarity.count == 300
    m3 = AsymVLM.from_pretrained(train(TrainConfig.from_dict({**common, "output_dir": str(tmp_path / "c"),
                                                              "fit_confidence": False})))  # fmt: skip
    assert m3.confidence is None
