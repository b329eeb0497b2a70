"""asymvlm-serve answers "how likely is this answer right": caption owners in the gallery format,
the service's p_correct against an independent recomputation (fit_gallery_calibrator +
ImageIndex.search + ConfidenceModel.assess done here), abstention on p_correct, galleries built
before owners were recorded (uncalibrated), and the HTTP answers and /v1/info."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from asymvlm.confidence import ConfidenceModel, Familiarity, fit_gallery_calibrator  # noqa: E402
from asymvlm.errors import ArtefactError, ConfigError  # noqa: E402
from asymvlm.model import AsymVLM  # noqa: E402
from asymvlm.serve.abstention import Abstention, parse_abstention  # noqa: E402
from asymvlm.serve.app import create_app  # noqa: E402
from asymvlm.serve.gallery import Gallery  # noqa: E402
from asymvlm.serve.indexing import write_gallery  # noqa: E402
from asymvlm.serve.service import RetrievalService, TextQuery  # noqa: E402
from asymvlm.serve.words import reasons_of, verdict_of  # noqa: E402


def served(batch):
    """The service's answers (schema types) as the JSON the API serves them."""
    return [[a.model_dump(exclude_unset=True) for a in answers] for answers in batch]


TEXTS = ["a red circle", "an object", "a big blue square in the top left", "a small green triangle", "a square"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model(serve_assets):
    return AsymVLM.from_pretrained(serve_assets["model_dir"])


@pytest.fixture(scope="module")
def familiar_model(model, serve_assets):
    """The served model carrying a familiarity density (of other ShapeWorld captions), no calibrator."""
    from asymvlm.worlds import shapeworld as sw

    other = sw.generate(60, seed=11, version=2)
    train = model.text_embeddings(list(dict.fromkeys(c for row in other for c in row["captions"])))
    m = copy.deepcopy(model)
    m.confidence = ConfidenceModel(familiarity=Familiarity.fit(train, seed=0))
    return m


@pytest.fixture(scope="module")
def gallery(serve_assets):
    return Gallery.open(serve_assets["gallery_dir"])


@pytest.fixture(scope="module")
def service(model, gallery):
    return RetrievalService(model, gallery, abstain="auto")  # asymvlm-serve's default


@pytest.fixture(scope="module")
def old_gallery(tmp_path_factory, serve_assets):
    """The served gallery as built before caption owners were recorded (captions.safetensors holds
    only the embeddings)."""
    root = tmp_path_factory.mktemp("old") / "g"
    shutil.copytree(serve_assets["gallery_dir"], root)
    t = load_file(root / "captions.safetensors")
    save_file({"embeddings": t["embeddings"]}, root / "captions.safetensors")
    return Gallery.open(root)


def owners_of(data, captions):
    """Reference: the rows of the images whose captions include each caption."""
    return [[i for i, row in enumerate(data) if c in row["captions"]] for c in captions]


def owner_lists(g):
    offsets, rows = g.caption_owners
    return [rows[offsets[c] : offsets[c + 1]].tolist() for c in range(len(offsets) - 1)]


def recompute(model, g, queries, k=5, calibration_captions=2000):
    """p_correct and the parts, without the service: the calibrator fitted on the gallery's captions,
    one search, ConfidenceModel.assess with the captions' sorted 1/kappa as ambiguity reference."""
    cal = fit_gallery_calibrator(
        model, g.index, g.caption_embeddings, *g.caption_owners, max_captions=calibration_captions, seed=0
    )
    emb = model.text_embeddings(queries)
    q = model.encode_text(emb)
    res = g.index.search(q, k=k)
    own = getattr(model, "confidence", None)
    ref = torch.sort(1.0 / model.encode_text(g.caption_embeddings).concentration.double()).values
    conf = ConfidenceModel(None if own is None else own.familiarity, None, ref).assess(
        q.concentration, res.entropy, res.posterior[:, 0], len(g), emb, calibrator=cal
    )
    return cal, res, conf


# ----------------------------------------------------------------------------------------------
# the gallery format
# ----------------------------------------------------------------------------------------------
def test_build_gallery_records_the_images_of_each_caption(gallery, serve_assets):
    offsets, rows = gallery.caption_owners
    assert offsets.dtype == rows.dtype == torch.int64 and offsets.shape == (len(gallery.captions) + 1,)
    assert owner_lists(gallery) == owners_of(serve_assets["data"], gallery.captions)
    assert any(len(o) > 1 for o in owner_lists(gallery))  # a caption shared by several images, indexed once


def test_write_gallery_round_trips_owners(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    caps = ["a", "b", "c"]
    owners = [[3, 0, 3], [5], []]  # unsorted, repeated, and a caption no image carries
    g = write_gallery(tmp_path / "g", emb, captions=caps, caption_embeddings=emb[:3], caption_owners=owners)
    assert owner_lists(g) == [[0, 3], [5], []]
    assert owner_lists(Gallery.open(tmp_path / "g")) == [[0, 3], [5], []]
    assert write_gallery(tmp_path / "h", emb, captions=caps, caption_embeddings=emb[:3]).caption_owners is None
    for bad, msg in [([[0], [1]], "2 captions"), ([[0], [6], []], "outside"), ([[0], [-1], []], "outside")]:
        with pytest.raises(ValueError, match=msg):
            write_gallery(tmp_path / "x", emb, captions=caps, caption_embeddings=emb[:3], caption_owners=bad)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "change,msg",
    [
        (lambda t: t.update(owner_offsets=torch.tensor([0, 2, 1, 3])), "decrease at caption 1"),
        (lambda t: t.update(owner_rows=torch.tensor([0, 3, 6])), "owner row 6 .* outside the gallery's 6 images"),
        (lambda t: t.update(owner_rows=torch.tensor([0, -1, 5])), "owner row -1"),
        (lambda t: t.update(owner_offsets=torch.tensor([1, 2, 3, 3])), "start at 0"),
        (lambda t: t.update(owner_offsets=torch.tensor([0, 2, 3, 4])), "end at the 3 owner rows"),
        (lambda t: t.update(owner_offsets=torch.tensor([0, 2, 3])), r"do not fit 3 captions"),
        (lambda t: t.update(owner_rows=torch.tensor([0, 3, 5], dtype=torch.int32)), "int64"),
        (lambda t: t.pop("owner_rows"), "both 'owner_offsets' and 'owner_rows'"),
    ],
)
def test_corrupt_owners_are_refused_naming_the_file(tmp_path, change, msg):
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    write_gallery(tmp_path / "g", emb, captions=["a", "b", "c"], caption_embeddings=emb[:3],
                  caption_owners=[[0, 3], [5], []])  # fmt: skip
    path = tmp_path / "g" / "captions.safetensors"
    t = dict(load_file(path))
    change(t)
    save_file(t, path)
    with pytest.raises(ArtefactError, match=msg) as err:
        Gallery.open(tmp_path / "g")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_captions_file_is_refused(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    write_gallery(tmp_path / "g", emb, captions=["a", "b"], caption_embeddings=emb[:2], caption_owners=[[0], [1, 2]])
    path = tmp_path / "g" / "captions.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ArtefactError, match="corrupt or truncated") as err:
        Gallery.open(tmp_path / "g")
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# p_correct against an independent recomputation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["plain", "familiarity"])
@pytest.mark.parametrize("kind", ["strings", "embeddings"])
def test_p_correct_equals_an_independent_recomputation(which, kind, model, familiar_model, gallery):
    m = model if which == "plain" else familiar_model
    svc = RetrievalService(m, gallery, abstain="none")
    queries = TEXTS if kind == "strings" else m.text_embeddings(TEXTS)
    [answers] = served(svc.search_text([TextQuery(queries, k=5)]))
    cal, res, conf = recompute(m, gallery, TEXTS)
    assert svc.calibration["source"] == "gallery captions" and svc.calibrator.weights() == pytest.approx(cal.weights())
    assert ("unfamiliarity" in cal.features) == (which == "familiarity")
    assert conf.p_correct is not None
    for i, a in enumerate(answers):
        c = a["confidence"]
        assert c["calibrated"] is True
        assert c["p_correct"] == pytest.approx(float(conf.p_correct[i]), rel=1e-6, abs=1e-9)
        assert c["top_probability"] == pytest.approx(float(res.posterior[i, 0]), rel=1e-5)
        assert c["retrieval_entropy"] == pytest.approx(float(res.entropy[i]), rel=1e-5, abs=1e-7)
        assert c["effective_candidates"] == pytest.approx(float(np.exp(float(res.entropy[i]))), rel=1e-5)
        assert c["ambiguity"] == pytest.approx(a["uncertainty"], rel=1e-6)
        assert c["ambiguity_percentile"] == pytest.approx(float(conf.ambiguity_percentile[i]))
        assert c["ambiguity_percentile"] == pytest.approx(a["uncertainty_percentile"])  # one scale
        if which == "familiarity":
            assert c["unfamiliarity"] == pytest.approx(float(conf.unfamiliarity[i]), rel=1e-5, abs=1e-6)
            assert c["unfamiliarity_percentile"] == pytest.approx(float(conf.unfamiliarity_percentile[i]))
        else:
            assert c["unfamiliarity"] is None and c["unfamiliarity_percentile"] is None
        assert a["verdict"] == ("likely right" if c["p_correct"] >= 0.5 else "uncertain")
        assert a["reasons"] == reasons_of(c)
        assert [h["probability"] for h in a["hits"]] == pytest.approx(res.posterior[i].tolist(), rel=1e-5)


def test_the_library_path_gives_the_same_p_correct(familiar_model, gallery):
    """ImageIndex.search(strings, model=..., calibrator=...) assesses with the model's own
    ConfidenceModel: the same p_correct as the service (ambiguity is placed on another scale)."""
    svc = RetrievalService(familiar_model, gallery, abstain="none")
    [answers] = served(svc.search_text([TextQuery(TEXTS, k=3)]))
    res = gallery.index.search(TEXTS, k=3, model=familiar_model, calibrator=svc.calibrator)
    assert [a["confidence"]["p_correct"] for a in answers] == pytest.approx(res.confidence.p_correct.tolist())


def test_batched_confidence_equals_the_one_by_one_path(service):
    """Within float32 summation-order noise (the retrieval distribution is summed in float32 chunks)."""
    requests = [TextQuery([t], k=2) for t in TEXTS]
    for req, got in zip(requests, served(service.search_text(requests))):
        [alone] = served(service.search_text([req]))
        assert got[0]["confidence"]["p_correct"] == pytest.approx(alone[0]["confidence"]["p_correct"], rel=1e-4)
        assert got[0]["verdict"] == alone[0]["verdict"] and got[0]["reasons"] == alone[0]["reasons"]


def test_info_reports_the_calibration(service, gallery):
    cal = service.info()["calibration"]
    assert cal["source"] == "gallery captions" and cal["gallery_size"] == len(gallery) == 80
    assert cal["count"] == len(gallery.captions) and 0 < cal["base_rate"] < 1
    assert set(cal["weights"]) == {"ambiguity", "retrieval_entropy", "top_surprise"}
    assert cal["seconds"] > 0 and "caption" in cal["label"]
    json.dumps(service.info())


def test_calibration_captions_caps_the_fit_and_zero_turns_it_off(model, gallery):
    few = RetrievalService(model, gallery, calibration_captions=10)
    assert few.info()["calibration"]["count"] == 10
    off = RetrievalService(model, gallery, calibration_captions=0, abstain="auto")
    assert not off.calibrated and "calibration_captions=0" in off.info()["calibration"]["reason"]
    assert off.default_abstain.criterion is None  # auto
    with pytest.raises(ConfigError, match="calibration_captions"):
        RetrievalService(model, gallery, calibration_captions=-1)


def test_the_models_own_calibrator_serves_an_old_gallery(model, gallery, old_gallery):
    fitted = fit_gallery_calibrator(model, gallery.index, gallery.caption_embeddings, *gallery.caption_owners)
    m = copy.deepcopy(model)
    m.confidence = ConfidenceModel(calibrator=fitted)
    svc = RetrievalService(m, old_gallery, abstain="auto")
    assert svc.calibration["source"] == "model" and svc.default_abstain.criterion == "p_correct"
    [answers] = served(svc.search_text([TextQuery(TEXTS, k=3)]))
    _, _, conf = recompute(model, gallery, TEXTS, k=3)
    assert [a["confidence"]["p_correct"] for a in answers] == pytest.approx(conf.p_correct.tolist(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# abstention on p_correct
# ----------------------------------------------------------------------------------------------
def test_p_correct_abstention_is_exactly_below_the_threshold(service):
    p = torch.tensor([0.1, 0.5, 0.49999, 0.9, 0.5000001], dtype=torch.float64)
    rule = Abstention("p_correct", 0.5)
    abstained, stat = rule.decide(torch.zeros(5), torch.ones(5), p)
    assert abstained.tolist() == [True, False, True, False, False] and torch.equal(stat, p)
    with pytest.raises(ConfigError, match="p_correct"):
        rule.decide(torch.zeros(5), torch.ones(5))
    [answers] = served(service.search_text([TextQuery(TEXTS, k=2)]))
    pc = [a["confidence"]["p_correct"] for a in answers]
    t = sorted(pc)[2]  # the middle one sits at the threshold: not below it, kept
    [answers] = served(service.search_text([TextQuery(TEXTS, k=2, abstain=Abstention("p_correct", t))]))
    assert [a["abstained"] for a in answers] == [x < t for x in pc] and sum(x < t for x in pc) == 2
    assert [a["abstention"]["statistic"] for a in answers] == pytest.approx(pc)
    assert all(a["abstention"]["criterion"] == "p_correct" for a in answers)


def test_auto_is_p_correct_half_when_calibrated(service, model, gallery):
    assert service.default_abstain == Abstention("p_correct", 0.5)
    assert RetrievalService(model, gallery).default_abstain == Abstention()  # the Python default: none
    assert RetrievalService(model, gallery, abstain="p_correct:0.8").default_abstain.threshold == 0.8
    assert parse_abstention("p_correct:0.5") == Abstention("p_correct", 0.5)
    assert parse_abstention("auto") == Abstention() and parse_abstention(" AUTO ", calibrated=True).threshold == 0.5
    for bad, msg in [("p_correct:1.5", r"\[0(\.0)?, 1(\.0)?\]"), ("p_correct:q50", "quantile"), ("p_correct", "parse")]:
        with pytest.raises(ConfigError, match=msg):
            parse_abstention(bad)


def test_an_old_gallery_serves_uncalibrated(model, old_gallery, gallery):
    assert old_gallery.caption_owners is None and old_gallery.captions == gallery.captions
    svc = RetrievalService(model, old_gallery, abstain="auto")
    assert not svc.calibrated and svc.default_abstain.criterion is None  # auto -> none
    info = svc.info()["calibration"]
    assert info["source"] is None and "does not record which images carry" in info["reason"]
    [answers] = served(svc.search_text([TextQuery(TEXTS, k=3)]))
    for a in answers:
        assert a["verdict"] is None and a["confidence"]["p_correct"] is None and not a["confidence"]["calibrated"]
        assert a["confidence"]["effective_candidates"] > 0 and a["reasons"] == reasons_of(a["confidence"])
        assert a["abstained"] is False
    with pytest.raises(ConfigError) as err:
        RetrievalService(model, old_gallery, abstain="p_correct:0.5")
    msg = str(err.value)
    assert "\n" not in msg and "asymvlm-index build" in msg and "calibrator" in msg
    with pytest.raises(ConfigError, match="calibrator"):
        svc.search_text([TextQuery(TEXTS, k=1, abstain=Abstention("p_correct", 0.5))])


def test_the_command_line_refuses_p_correct_on_an_old_gallery_in_one_line(serve_assets, old_gallery, capsys):
    from asymvlm.training.serve import main

    argv = ["--model", str(serve_assets["model_dir"]), "--index", str(old_gallery.path), "--abstain", "p_correct:0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "asymvlm-index build" in err and "Traceback" not in err, err


def test_reasons_and_verdicts_in_words():
    assert verdict_of(None) is None and verdict_of(0.5) == "likely right" and verdict_of(0.4999) == "uncertain"
    parts = {"ambiguity_percentile": 92.4, "effective_candidates": 37.4, "unfamiliarity_percentile": 99.74}
    assert reasons_of(parts) == [
        "vague query: more uncertain than 92% of the gallery's captions",
        "about 37 images compete for it",
        "unfamiliar text: stranger than 99.7% of the training texts",
    ]
    calm = {"ambiguity_percentile": 66.6, "effective_candidates": 1.49, "unfamiliarity_percentile": 94.9}
    assert reasons_of(calm) == []
    edge = {"ambiguity_percentile": None, "effective_candidates": 1.5, "unfamiliarity_percentile": 100.0}
    assert reasons_of(edge) == [
        "about 2 images compete for it",
        "unfamiliar text: stranger than all of the training texts",
    ]


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------
def test_http_answers_carry_confidence_and_info_the_calibration(service):
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/search/text", json={"queries": TEXTS[:3], "k": 4})
        assert r.status_code == 200
        [direct] = served(service.search_text([TextQuery(TEXTS[:3], k=4)]))
        for got, want in zip(r.json()["results"], direct):
            assert set(got) >= {"confidence", "verdict", "reasons", "uncertainty", "specificity", "abstained"}
            assert got["confidence"] == pytest.approx(want["confidence"])
            assert got["verdict"] == want["verdict"] and got["reasons"] == want["reasons"]
            assert got["abstention"]["criterion"] == "p_correct" and got["abstention"]["threshold"] == 0.5
            assert got["abstained"] == (want["confidence"]["p_correct"] < 0.5)
            assert all(isinstance(h["probability"], float) for h in got["hits"])
        info = client.get("/v1/info").json()
        assert info["calibration"]["source"] == "gallery captions" and info["abstain"]["criterion"] == "p_correct"
        assert set(info["calibration"]) >= {"label", "gallery_size", "count", "base_rate", "weights", "seconds"}
        always = {"criterion": "p_correct", "threshold": 1}
        r = client.post("/v1/search/text", json={"query": "an object", "k": 2, "abstain": always})
        assert r.status_code == 200 and r.json()["results"][0]["abstained"] is True
        r = client.post("/v1/search/text", json={"query": "a", "abstain": {"criterion": "p_correct", "threshold": 1.5}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "abstain.threshold"
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        parts = set(schema["Confidence"]["properties"])
        assert {"p_correct", "effective_candidates", "unfamiliarity_percentile"} <= parts
        assert {"confidence", "verdict", "reasons"} <= set(schema["TextAnswer"]["properties"])
        assert "p_correct" in json.dumps(schema["AbstainRule"])
        assert "P(right)" in client.get("/static/app.js").text


def test_http_refuses_p_correct_on_an_uncalibrated_service(model, old_gallery):
    with TestClient(create_app(RetrievalService(model, old_gallery))) as client:
        r = client.post("/v1/search/text", json={"query": "a red circle", "k": 2})
        assert r.status_code == 200 and r.json()["results"][0]["verdict"] is None
        assert r.json()["results"][0]["confidence"]["p_correct"] is None
        r = client.post("/v1/search/text", json={"query": "a", "abstain": {"criterion": "p_correct", "threshold": 0.5}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "abstain.criterion"
        assert "calibrated" in r.json()["error"]["message"]
        assert client.get("/v1/info").json()["calibration"]["source"] is None
