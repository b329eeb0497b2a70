"""asymvlm-serve: every endpoint against references computed without the service, dynamic batching
against the one-by-one path, bad input, the API key, CORS, the read-only gallery, a real uvicorn
process on loopback, and the asymvlm-index / asymvlm-serve command lines."""

import asyncio
import base64
import hashlib
import io
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from asymvlm.model import AsymVLM  # noqa: E402
from asymvlm.serve.abstention import Abstention, parse_abstention  # noqa: E402
from asymvlm.serve.app import create_app  # noqa: E402
from asymvlm.serve.config import ServeConfig  # noqa: E402
from asymvlm.serve.gallery import Gallery  # noqa: E402
from asymvlm.serve.indexing import build_gallery, write_gallery  # noqa: E402
from asymvlm.serve.service import RetrievalService, TextQuery  # noqa: E402

KEY = "k3y-for-tests-0123456789abcdef"


def served(batch):
    """The service's answers (schema types) as the JSON the API serves them."""
    return [[a.model_dump(exclude_unset=True) for a in answers] for answers in batch]


def build(serve_assets, out, *flags: str) -> int:
    """``asymvlm-index build --model <the served model> --out <out> <flags>``."""
    from asymvlm.serve.cli import index_main

    return index_main(["build", "--model", str(serve_assets["model_dir"]), "--out", str(out), "--no_progress", *flags])


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # references below compute with the model's head
        yield


@pytest.fixture(scope="module")
def service(serve_assets):
    model = AsymVLM.from_pretrained(serve_assets["model_dir"])
    return RetrievalService(model, Gallery.open(serve_assets["gallery_dir"]))


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def captions_of(data) -> list[str]:
    return list(dict.fromkeys(c for row in data for c in row["captions"]))


def mid_rank_percentile(reference: np.ndarray, u: float) -> float:
    """numpy transcription: (#below + #at-or-below) / 2n * 100."""
    return 100.0 * ((reference < u).sum() + (reference <= u).sum()) / (2 * reference.size)


# ----------------------------------------------------------------------------------------------
# the gallery
# ----------------------------------------------------------------------------------------------
def test_gallery_holds_what_the_encoder_computes(serve_assets):
    g = Gallery.open(serve_assets["gallery_dir"])
    data, model = serve_assets["data"], serve_assets["model"]
    assert len(g) == 80 and g.ids == [str(i) for i in data["image_id"]]
    ref = model.encoder.encode_image([im.convert("RGB") for im in data["image"]])
    torch.testing.assert_close(g.index.embeddings.float(), ref, atol=1e-3, rtol=0)  # stored as float16
    assert g.captions == captions_of(data)  # distinct captions, first-seen order
    torch.testing.assert_close(g.caption_embeddings, model.text_embeddings(g.captions), atol=1e-6, rtol=0)
    from PIL import Image

    thumb = Image.open(io.BytesIO(g.thumbnail(5)))
    assert thumb.format == "PNG" and np.array_equal(np.asarray(thumb.convert("RGB")), np.asarray(data[5]["image"]))
    assert g.row_of("5") == 5 and g.row_of("../../etc/passwd") is None and g.row_of("80") is None


def test_gallery_build_is_atomic_and_refuses_foreign_folders(tmp_path, serve_assets):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not written by asymvlm"):
        build_gallery(serve_assets["model"], serve_assets["data"].select(range(4)), foreign, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    class Boom(Exception):
        pass

    class Exploding:  # a dataset whose 3rd image cannot be read
        column_names = ["image"]

        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 2:
                raise Boom("unreadable image")
            return {"image": serve_assets["data"][i]["image"]}

    target = tmp_path / "g"
    with pytest.raises(Boom):
        build_gallery(serve_assets["model"], Exploding(), target, progress=False, batch_size=1)
    assert not target.exists() and not any(p.name.startswith(".g.tmp") for p in tmp_path.iterdir())


def test_a_faiss_gallery_answers_as_the_exact_one(tmp_path, serve_assets, service):
    pytest.importorskip("faiss")
    flags = ["--images", "shapeworld:2", "--num_images", "80", "--seed", "3", "--backend", "faiss"]
    assert build(serve_assets, str(tmp_path / "f"), *flags) == 0
    g = Gallery.open(tmp_path / "f")
    assert g.meta["backend"] == "faiss" and g.index.backend == "faiss" and (tmp_path / "f/images/faiss.index").is_file()
    assert g.index._faiss_index is not None  # read from disk (memory-mapped), not rebuilt
    exact = Gallery.open(tmp_path / "f", backend="exact")
    q = service.model.encode_text(["a red circle", "an object", "a big blue square in the top left"])
    a, b = g.index.search(q, k=9), exact.index.search(q, k=9)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
    idx = tmp_path / "f/images/faiss.index"
    idx.write_bytes(idx.read_bytes()[:100])
    with pytest.raises(Exception, match="not a readable FAISS index"):
        Gallery.open(tmp_path / "f")


def test_gallery_rejects_corrupt_files(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    write_gallery(tmp_path / "g", emb, ids=list("abcdef"), thumbnails=[b"x" * (i + 1) for i in range(6)])
    thumbs = tmp_path / "g" / "thumbnails.safetensors"
    thumbs.write_bytes(thumbs.read_bytes()[:-3])  # truncated
    with pytest.raises(Exception, match="thumbnails"):
        Gallery.open(tmp_path / "g")
    with pytest.raises(Exception, match="distinct ids"):
        write_gallery(tmp_path / "h", emb, ids=list("abcaef"))
    assert not (tmp_path / "h").exists()
    write_gallery(tmp_path / "h", emb, ids=list("abcdef"))
    index_json = tmp_path / "h" / "images" / "index.json"
    index_json.write_text(index_json.read_text().replace('"d"', '"a"'))
    with pytest.raises(Exception, match="not unique"):
        Gallery.open(tmp_path / "h")
    with pytest.raises(Exception, match="no asymvlm gallery"):
        Gallery.open(tmp_path)


# ----------------------------------------------------------------------------------------------
# endpoints against references
# ----------------------------------------------------------------------------------------------
def test_text_search_matches_a_float64_reference(client, service):
    q_text = ["a red circle", "a big blue square in the top left", "an object"]
    r = client.post("/v1/search/text", json={"queries": q_text, "k": 7})
    assert r.status_code == 200
    model, g = service.model, service.gallery
    q = model.encode_text(q_text)
    mu, kappa = q.loc.double(), q.concentration.double()
    x = g.index.embeddings.double()
    cos = mu @ x.T  # (3, 80)
    from asymvlm.distributions import VonMisesFisher

    # vMF log-density C_d(kappa) exp(kappa mu^T x), in float64, at the stored (float16) image vectors
    ll = (VonMisesFisher(mu, kappa).log_normalizer.unsqueeze(1) + kappa.unsqueeze(1) * cos).T  # (80, 3)
    ref_unc = np.sort((1 / service.caption_index.concentration.double()).numpy())
    for i, ans in enumerate(r.json()["results"]):
        assert ans["query"] == q_text[i]
        rows = [h["row"] for h in ans["hits"]]
        assert rows == torch.argsort(cos[i], descending=True)[:7].tolist()
        assert [h["id"] for h in ans["hits"]] == [g.id_of(j) for j in rows]
        np.testing.assert_allclose([h["score"] for h in ans["hits"]], ll[rows, i].numpy(), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose([h["cosine"] for h in ans["hits"]], cos[i, rows].numpy(), atol=1e-5)
        assert ans["concentration"] == pytest.approx(float(kappa[i]), rel=1e-6)
        assert ans["uncertainty"] == pytest.approx(1 / float(kappa[i]), rel=1e-6)
        assert ans["uncertainty_percentile"] == pytest.approx(mid_rank_percentile(ref_unc, 1 / float(kappa[i])))
        word = {True: "specific", False: None}[ans["uncertainty_percentile"] <= 100 / 3] or (
            "moderate" if ans["uncertainty_percentile"] <= 200 / 3 else "vague"
        )
        assert ans["specificity"] == word
        assert ans["abstained"] is False and ans["abstention"]["criterion"] is None
        assert all(h["thumbnail"] == f"/v1/thumbnails/{h['id']}" for h in ans["hits"])


def test_text_search_abstains_by_the_rule_given(client, service):
    texts = ["a red circle", "an object", "a small green triangle in the bottom right"]
    unc = (1 / service.model.encode_text(texts).concentration.double()).tolist()
    t = sorted(unc)[1]  # between the most and the least uncertain
    r = client.post(
        "/v1/search/text", json={"queries": texts, "k": 3, "abstain": {"criterion": "uncertainty", "threshold": t}}
    )
    got = r.json()["results"]
    assert [a["abstained"] for a in got] == [u > t for u in unc] and sum(u > t for u in unc) == 1
    assert all(a["abstention"]["criterion"] == "uncertainty" and a["abstention"]["threshold"] == t for a in got)
    assert [a["abstention"]["statistic"] for a in got] == pytest.approx(unc)
    best = [a["hits"][0]["score"] for a in got]
    cut = sorted(best)[1]
    r = client.post(
        "/v1/search/text", json={"queries": texts, "k": 3, "abstain": {"criterion": "likelihood", "threshold": cut}}
    )
    assert [a["abstained"] for a in r.json()["results"]] == [b < cut for b in best]
    r = client.post("/v1/search/text", json={"query": "an object", "k": 3, "abstain": None})
    assert r.json()["results"][0]["abstention"]["criterion"] is None


def test_the_default_rule_is_a_quantile_of_the_captions(serve_assets, service):
    ref = torch.sort(1 / service.caption_index.concentration.double()).values
    rule = parse_abstention("uncertainty:q75", ref)
    assert rule.threshold == pytest.approx(float(np.quantile(ref.numpy(), 0.75))) and rule.quantile == 75
    svc = RetrievalService(service.model, service.gallery, abstain="uncertainty:q75")
    answers = served(svc.search_text([TextQuery(service.gallery.captions, k=1)]))[0]
    frac = np.mean([a["abstained"] for a in answers])
    assert abs(frac - 0.25) <= 1 / len(answers) + 1e-9  # a quarter of the captions lie above their q75
    for bad, msg in [
        ("uncertainty", "cannot parse"),
        ("entropy:1", "cannot parse"),
        ("likelihood:q5", "quantile"),
        ("uncertainty:qx", "quantile"),
        ("uncertainty:q101", r"\[0, 100\]"),
        ("uncertainty:-1", ">= 0"),
    ]:
        with pytest.raises(Exception, match=msg):
            parse_abstention(bad, ref)


def test_image_search_by_embedding_and_upload_matches_brute_force(client, service, serve_assets):
    data = serve_assets["data"]
    x = service.model.encode_image([data[11]["image"]])  # (1, d)
    r = client.post("/v1/search/image", json={"embedding": x[0].tolist(), "k": 5})
    assert r.status_code == 200
    hits = r.json()["results"][0]["hits"]
    q = service.model.encode_text(torch.as_tensor(service.gallery.caption_embeddings))
    from asymvlm.distributions import VonMisesFisher

    ll = VonMisesFisher(q.loc.double(), q.concentration.double()).log_prob(x.double())  # (M,)
    assert [h["id"] for h in hits] == [service.gallery.captions[j] for j in torch.argsort(ll, descending=True)[:5]]
    np.testing.assert_allclose([h["score"] for h in hits], torch.sort(ll, descending=True).values[:5], rtol=1e-5)
    assert all(h["uncertainty"] == pytest.approx(1 / float(q.concentration[h["row"]]), rel=1e-5) for h in hits)
    up = client.post(
        "/v1/search/image/upload", files={"file": ("s.png", png_bytes(data[11]["image"]), "image/png")}, data={"k": "5"}
    )
    assert up.status_code == 200 and [h["id"] for h in up.json()["results"][0]["hits"]] == [h["id"] for h in hits]


def test_classify_equals_zero_shot_classify(client, service, serve_assets):
    from asymvlm.zeroshot import zero_shot_classify

    data = serve_assets["data"]
    classes = ["a red object", "a blue object", "a green object", "a circle"]
    x = service.model.encode_image([data[i]["image"] for i in range(4)])
    ref = zero_shot_classify(service.model, x, classes, criterion="probability", threshold=0.4).to_dict()
    r = client.post("/v1/classify", json={"embeddings": x.tolist(), "classes": classes, "threshold": 0.4})
    assert r.status_code == 200
    got = r.json()
    assert got["criterion"] == "probability" and got["threshold"] == 0.4
    for a, b in zip(got["images"], ref["images"]):
        assert (a["label"], a["abstained"], a["best_label"]) == (b["label"], b["abstained"], b["best_label"])
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
    up = client.post(
        "/v1/classify/upload",
        files={"file": ("x.png", png_bytes(data[2]["image"]), "image/png")},
        data={"classes": json.dumps(classes), "threshold": "0.4"},
    )
    assert up.status_code == 200 and up.json()["images"][0]["label"] == ref["images"][2]["label"]


def test_distribution_is_the_models(client, service):
    texts = ["a red circle", "an object"]
    r = client.post("/v1/distribution", json={"texts": texts})
    q = service.model.encode_text(texts).to_dict()
    for i, d in enumerate(r.json()["results"]):
        assert d["text"] == texts[i] and d["family"] == "vmf" and d["dim"] == q["dim"]
        np.testing.assert_allclose(d["mu"], q["mu"][i], atol=1e-7)
        assert d["kappa"] == pytest.approx(q["kappa"][i]) and d["uncertainty"] == pytest.approx(1 / q["kappa"][i])
    assert client.post("/v1/distribution", json={"text": "a red circle"}).json()["results"][0][
        "kappa"
    ] == pytest.approx(q["kappa"][0])


def test_thumbnails_health_metrics_docs_and_page(client, service):
    g = service.gallery
    r = client.get("/v1/thumbnails/17")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == g.thumbnail(17)
    assert client.get("/healthz").json() == {"status": "ok"} and client.get("/readyz").json() == {"ready": True}
    info = client.get("/v1/info").json()
    assert info["gallery"] == {"size": 80, "captions": len(g.captions), "thumbnails": True, "source": "shapeworld:2"}
    assert info["examples"] and set(info["examples"]) <= set(g.captions) and info["limits"]["max_k"] == 100
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/search/text", json={"query": "a red circle", "k": 2})
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    ok = [s for s in fams["asymvlm_requests"].samples if s.labels.get("route") == "/v1/search/text"]
    assert any(s.labels["status"] == "200" and s.value >= 1 for s in ok)
    assert any(s.name.endswith("_count") and s.value >= 1 for s in fams["asymvlm_request_duration_seconds"].samples)
    assert any(
        s.labels.get("kind") == "search_text" and s.name.endswith("_count") for s in fams["asymvlm_batch_size"].samples
    )
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/search/text",
        "/v1/search/image",
        "/v1/search/image/upload",
        "/v1/classify",
        "/v1/classify/upload",
        "/v1/distribution",
        "/v1/thumbnails/{image_id}",
        "/healthz",
        "/readyz",
    ):
        assert path in schema["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/v1/search/text" in docs.text and "cdn" not in docs.text.lower()
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("/", "/static/app.js", "/static/style.css"):
        body = client.get(asset).text
        assert "http://" not in body and "https://" not in body, f"{asset} reaches outside (must work offline)"
    assert client.get("/static/../../pyproject.toml").status_code == 404


def test_readiness_is_503_until_warm(service):
    app = create_app(service)
    c = TestClient(app)  # no lifespan: the model is not warmed up
    assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------------------------
# dynamic batching
# ----------------------------------------------------------------------------------------------
QUERIES = [
    "a red circle",
    "a blue square",
    "an object",
    "a small green triangle",
    "a big red object in the top left",
    "a green object",
    "a square",
    "a big blue circle in the bottom right",
    "a triangle",
    "a small object",
]


def test_batched_results_equal_the_one_by_one_path(service):
    """The same requests through one batched forward and one forward each: the same ids in the same
    order; scores within float32 summation-order noise (atol 1e-4 on log-likelihoods of ~1e2)."""
    requests = [TextQuery([t], k=3 + i % 5) for i, t in enumerate(QUERIES)]
    batched = served(service.search_text(requests))
    for req, got in zip(requests, batched):
        [alone] = served(service.search_text([req]))
        assert [h["id"] for h in got[0]["hits"]] == [h["id"] for h in alone[0]["hits"]]
        np.testing.assert_allclose(
            [h["score"] for h in got[0]["hits"]], [h["score"] for h in alone[0]["hits"]], atol=1e-4
        )
        assert got[0]["uncertainty"] == pytest.approx(alone[0]["uncertainty"], rel=1e-6)


def test_concurrent_http_requests_share_forwards_and_answer_as_alone(service):
    """Concurrent requests (16 client threads) through the batched app and through an app answering
    one request per forward (max_batch=1): the same answers; fewer forwards than queries."""
    from concurrent.futures import ThreadPoolExecutor

    def run(config):
        app = create_app(service, config)
        with TestClient(app) as c, ThreadPoolExecutor(16) as pool:
            jobs = [("/v1/search/text", {"query": t, "k": 4}) for t in QUERIES * 3]
            jobs += [("/v1/distribution", {"text": t}) for t in QUERIES[:4]]
            answers = list(pool.map(lambda job: c.post(job[0], json=job[1]).json()["results"][0], jobs))
        samples = app.state.metrics.batch.collect()[0].samples
        count = sum(s.value for s in samples if s.name.endswith("_count") and s.labels["kind"] == "search_text")
        total = sum(s.value for s in samples if s.name.endswith("_sum") and s.labels["kind"] == "search_text")
        return answers, count, total

    batched, count, total = run(ServeConfig(max_batch=64, max_wait_ms=20))
    alone, count1, total1 = run(ServeConfig(max_batch=1, max_wait_ms=0))
    assert total == total1 == 3 * len(QUERIES)
    assert count < total and count1 == total1  # batched: fewer forwards than queries; alone: one each
    for b, a in zip(batched, alone):
        if "hits" in b:
            assert [h["id"] for h in b["hits"]] == [h["id"] for h in a["hits"]]
            np.testing.assert_allclose([h["score"] for h in b["hits"]], [h["score"] for h in a["hits"]], atol=1e-4)
        else:
            np.testing.assert_allclose(b["mu"], a["mu"], atol=1e-6)


def test_a_failing_request_does_not_fail_its_batch():
    from concurrent.futures import ThreadPoolExecutor

    from asymvlm.serve.batching import DynamicBatcher

    calls = []

    def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    async def main():
        b = DynamicBatcher(fn, max_batch=8, max_wait_s=0.05, executor=ThreadPoolExecutor(1))
        out = await asyncio.gather(*(b.submit(s) for s in ["a", "bad", "c"]), return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(main())
    assert out[0] == "A" and out[2] == "C" and isinstance(out[1], ValueError)
    assert calls[0] == ["a", "bad", "c"] and ["a"] in calls and ["c"] in calls


def test_batches_respect_max_batch_and_the_queue_bound():
    from concurrent.futures import ThreadPoolExecutor

    from asymvlm.serve.batching import DynamicBatcher, Overloaded

    sizes = []

    async def main():
        b = DynamicBatcher(
            lambda xs: [x for x in xs],
            max_batch=4,
            max_wait_s=0.02,
            executor=ThreadPoolExecutor(1),
            max_queue=6,
            on_batch=lambda units, waited: sizes.append(units),
        )
        ok = await asyncio.gather(*(b.submit(i) for i in range(6)))
        tasks = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await b.submit(99)
        await asyncio.gather(*tasks)
        await b.close()
        return ok

    assert asyncio.run(main()) == list(range(6))
    assert max(sizes) <= 4 and sum(sizes) == 12


# ----------------------------------------------------------------------------------------------
# bad input: 4xx naming the field
# ----------------------------------------------------------------------------------------------
BAD_JSON = [
    ("/v1/search/text", {"query": ""}, 422, "query"),
    ("/v1/search/text", {"query": "   "}, 422, "query"),
    ("/v1/search/text", {"query": "x" * 1001}, 422, "query"),
    ("/v1/search/text", {"query": "a\x00b"}, 422, "query"),
    ("/v1/search/text", {"query": 5}, 422, "query"),
    ("/v1/search/text", {"query": "a", "k": 0}, 422, "k"),
    ("/v1/search/text", {"query": "a", "k": -3}, 422, "k"),
    ("/v1/search/text", {"query": "a", "k": 81}, 422, "k"),  # above the gallery
    ("/v1/search/text", {"query": "a", "k": 101}, 422, "k"),  # above the configured maximum
    ("/v1/search/text", {"query": "a", "k": "5"}, 422, "k"),
    ("/v1/search/text", {"query": "a", "k": 2.5}, 422, "k"),
    ("/v1/search/text", {"query": "a", "k": True}, 422, "k"),
    ("/v1/search/text", {"queries": []}, 422, "queries"),
    ("/v1/search/text", {"queries": ["a"] * 33}, 422, "queries"),
    ("/v1/search/text", {"queries": ["a", ""]}, 422, "queries.1"),
    ("/v1/search/text", {"query": "a", "queries": ["b"]}, 422, "body"),
    ("/v1/search/text", {}, 422, "body"),
    ("/v1/search/text", {"query": "a", "kk": 3}, 422, "kk"),
    ("/v1/search/text", {"query": "a", "abstain": {"criterion": "entropy", "threshold": 1}}, 422, "abstain.criterion"),
    ("/v1/search/text", {"query": "a", "abstain": {"criterion": "uncertainty"}}, 422, "abstain.threshold"),
    (
        "/v1/search/text",
        {"query": "a", "abstain": {"criterion": "uncertainty", "threshold": -1}},
        422,
        "abstain.threshold",
    ),
    ("/v1/search/text", [1, 2], 422, "body"),
    ("/v1/search/image", {"embedding": [1.0, 0.0]}, 422, "embedding"),  # wrong dimension
    ("/v1/search/image", {"embedding": [0.5] * 32}, 422, "embedding"),  # not unit
    ("/v1/search/image", {"embedding": [0.0] * 32}, 422, "embedding"),
    ("/v1/search/image", {"embedding": ["a"] * 32}, 422, "embedding.0"),
    ("/v1/search/image", {"embeddings": []}, 422, "embeddings"),
    ("/v1/search/image", {"embedding": [1.0] + [0.0] * 31, "k": 0}, 422, "k"),
    ("/v1/classify", {"embedding": [1.0] + [0.0] * 31, "classes": []}, 422, "classes"),
    ("/v1/classify", {"embedding": [1.0] + [0.0] * 31, "classes": ["a", "a"]}, 422, "classes"),
    ("/v1/classify", {"embedding": [1.0] + [0.0] * 31, "classes": ["a", ""]}, 422, "classes.1"),
    ("/v1/classify", {"embedding": [1.0] + [0.0] * 31, "classes": ["a"], "criterion": "nope"}, 422, "criterion"),
    ("/v1/classify", {"embedding": [1.0] + [0.0] * 31, "classes": ["a"], "threshold": 2.0}, 422, "threshold"),
    ("/v1/distribution", {"texts": ["ok", "x" * 5000]}, 422, "texts.1"),
    ("/v1/distribution", {"text": None}, 422, "body"),
]


@pytest.mark.parametrize("path,body,status,field", BAD_JSON, ids=[f"{p}-{i}" for i, (p, *_rest) in enumerate(BAD_JSON)])
def test_bad_json_is_a_4xx_naming_the_field(client, path, body, status, field):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"].startswith(field.split(".")[0]), err


def test_malformed_bodies_uploads_and_ids(client, serve_assets):
    raw = lambda path, content, ctype="application/json": client.post(
        path, content=content, headers={"content-type": ctype}
    )  # noqa: E731
    r = raw("/v1/search/text", b"{not json")
    assert r.status_code == 422 and "invalid JSON" in r.json()["error"]["message"]
    r = raw("/v1/search/image", b'{"embedding": [NaN' + b", 0.0" * 31 + b"]}")
    assert r.status_code == 422 and r.json()["error"]["field"] == "embedding.0"
    r = raw("/v1/search/text", b'{"query": "a"}', "text/plain")
    assert r.status_code == 422
    r = raw("/v1/search/text", b" " * (1 << 20 + 1))
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    up = lambda files, data=None: client.post("/v1/search/image/upload", files=files, data=data)  # noqa: E731
    good = png_bytes(serve_assets["data"][0]["image"])
    for files, status, field in [
        ({"file": ("a.txt", b"hello world", "text/plain")}, 415, "file"),
        ({"file": ("a.png", good[: len(good) // 2], "image/png")}, 415, "file"),  # truncated
        ({"file": ("a.png", b"", "image/png")}, 422, "file"),
        ({"other": ("a.png", good, "image/png")}, 422, "file"),
    ]:
        r = up(files)
        assert (r.status_code, r.json()["error"]["field"]) == (status, field), r.text
    r = up({"file": ("a.png", good, "image/png")}, {"k": "many"})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "k")
    r = up({"file": ("a.png", good, "image/png")}, {"kk": "3"})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "kk")
    r = raw("/v1/search/image/upload", good, "image/png")
    assert r.status_code == 415 and r.json()["error"]["field"] == "file"
    from PIL import Image

    huge = io.BytesIO()
    Image.new("1", (8000, 6000)).save(huge, format="PNG")  # 48 Mpx, tiny file
    r = up({"file": ("big.png", huge.getvalue(), "image/png")})
    assert r.status_code == 413 and r.json()["error"]["field"] == "file"
    for bad in (
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e/gallery.json",
        "80",
        "-1",
        "05",
        "1e1",
        "gallery.json",
        "images%2Findex.json",
        "%00",
        "a" * 500,
    ):
        r = client.get(f"/v1/thumbnails/{bad}")
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), bad
    r = client.post("/v1/classify/upload", files={"file": ("a.png", good, "image/png")}, data={"classes": "[1, 2]"})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "classes")


def test_uploads_have_their_own_configurable_limit(service, serve_assets):
    good = png_bytes(serve_assets["data"][0]["image"])
    with TestClient(create_app(service, ServeConfig(max_upload_bytes=len(good) - 1, max_body_bytes=512))) as c:
        r = c.post("/v1/search/image/upload", files={"file": ("a.png", b"\x89PNG" + b"0" * 70000, "image/png")})
        assert r.status_code == 413
        r = c.post("/v1/search/text", json={"query": "a" * 600})
        assert r.status_code == 413 and "512 bytes" in r.json()["error"]["message"]
    with TestClient(create_app(service, ServeConfig(max_k=3, max_queries=2, max_query_chars=5))) as c:
        assert c.post("/v1/search/text", json={"query": "a", "k": 4}).json()["error"]["field"] == "k"
        assert c.post("/v1/search/text", json={"queries": ["a", "b", "c"]}).json()["error"]["field"] == "queries"
        assert c.post("/v1/search/text", json={"query": "abcdef", "k": 1}).json()["error"]["field"] == "query"
    with pytest.raises(Exception, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(Exception, match="16 characters"):
        ServeConfig(api_key="short")


# ----------------------------------------------------------------------------------------------
# security: API key, CORS, read-only gallery
# ----------------------------------------------------------------------------------------------
def _routes(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", []) or []):
            if m in ("GET", "POST"):
                path = r.path.replace("{image_id:path}", "3").replace("{name}", "app.js")
                out.append((m, path))
    return out


def test_an_api_key_guards_every_endpoint_but_health(service):
    app = create_app(service, ServeConfig(api_key=KEY))
    routes = _routes(app)
    assert len(routes) >= 14
    with TestClient(app) as c:
        for method, path in routes:
            for headers in (
                {},
                {"Authorization": "Bearer wrong-key-0123456789abc"},
                {"X-API-Key": KEY[:-1]},
                {"Authorization": "Basic " + base64.b64encode(b"u:nope").decode()},
                {"Authorization": "Basic ###"},
                {"Authorization": KEY},
            ):
                r = c.request(method, path, headers=headers, json={} if method == "POST" else None)
                if path in ("/healthz", "/readyz"):
                    assert r.status_code == 200, path
                else:
                    assert r.status_code == 401, (method, path, headers)
                    assert r.json()["error"]["field"] == "authorization"
            if path not in ("/healthz", "/readyz"):
                for good in (
                    {"Authorization": f"Bearer {KEY}"},
                    {"X-API-Key": KEY},
                    {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()},
                ):
                    r = c.request(method, path, headers=good, json={"query": "a"} if method == "POST" else None)
                    assert r.status_code != 401, (method, path, good)
        assert 'Basic realm="asymvlm"' in c.get("/").headers["www-authenticate"]  # the browser prompts
        assert c.get("/v1/info").headers["www-authenticate"].startswith("Bearer")


def test_api_keys_are_compared_in_constant_time(monkeypatch, service):
    import hmac

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    with TestClient(create_app(service, ServeConfig(api_key=KEY))) as c:
        c.get("/v1/info", headers={"X-API-Key": "x" * 20})
    assert seen and all(b == KEY.encode() for _, b in seen)


def test_cors_is_closed_unless_origins_are_configured(service):
    origin = {"Origin": "https://evil.example"}
    with TestClient(create_app(service)) as c:
        r = c.get("/v1/info", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/search/text", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400
    with TestClient(create_app(service, ServeConfig(cors_origins=("https://ok.example",)))) as c:
        assert c.get("/v1/info", headers={"Origin": "https://ok.example"}).headers["access-control-allow-origin"] == (
            "https://ok.example"
        )
        assert "access-control-allow-origin" not in c.get("/v1/info", headers=origin).headers


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_read_only_gallery_serves_and_stays_unchanged(tmp_path, serve_assets):
    import shutil

    g = tmp_path / "ro"
    shutil.copytree(serve_assets["gallery_dir"], g)
    before = _snapshot(g)
    for p in [*g.rglob("*"), g]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        svc = RetrievalService(serve_assets["model"], Gallery.open(g))
        with TestClient(create_app(svc)) as c:
            assert c.post("/v1/search/text", json={"query": "a red circle", "k": 3}).status_code == 200
            assert c.get("/v1/thumbnails/3").status_code == 200
    finally:
        for p in [g, *g.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert _snapshot(g) == before


def test_a_gallery_of_another_encoder_is_refused(tmp_path, serve_assets):
    emb = torch.nn.functional.normalize(torch.randn(5, serve_assets["model"].dim), dim=-1)
    other = write_gallery(tmp_path / "g", emb, encoder={"spec": "x", "fingerprint": "f" * 64})
    from asymvlm.errors import EncoderMismatchError

    with pytest.raises(EncoderMismatchError, match="another encoder"):
        RetrievalService(serve_assets["model"], other)


def test_abstention_options_are_checked():
    with pytest.raises(Exception, match="unknown abstention criterion"):
        Abstention("entropy", 1.0)
    with pytest.raises(Exception, match="needs a threshold"):
        Abstention("uncertainty", None)


# ----------------------------------------------------------------------------------------------
# command lines and a real server on loopback
# ----------------------------------------------------------------------------------------------
def test_asymvlm_index_builds_image_folders(tmp_path, serve_assets, capsys):
    from asymvlm.serve.cli import index_main

    data = serve_assets["data"]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    lines = []
    for i in range(6):
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        data[i]["image"].save(folder / name)
        lines.append(json.dumps({"file_name": name, "captions": data[i]["captions"][:2]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    assert build(serve_assets, str(tmp_path / "g"), "--images", f"imagefolder:{folder}", "--thumbnail_size", "16") == 0
    g = Gallery.open(tmp_path / "g")
    assert g.ids == [json.loads(x)["file_name"] for x in lines] and len(g.captions) > 0
    from PIL import Image

    assert max(Image.open(io.BytesIO(g.thumbnail(0))).size) == 16 and g.thumbnail_media_type == "image/jpeg"
    with TestClient(create_app(RetrievalService(serve_assets["model"], g))) as c:  # ids with a slash, by URL
        hits = c.post("/v1/search/text", json={"query": "a red circle", "k": 6}).json()["results"][0]["hits"]
        for h in hits:
            assert c.get(h["thumbnail"]).content == g.thumbnail(h["row"])
        assert any("%2F" in h["thumbnail"] for h in hits) and c.get("/v1/thumbnails/sub/img1.png").status_code == 200
    (folder / "metadata.jsonl").unlink()  # a plain folder of images: no captions
    assert build(serve_assets, str(tmp_path / "plain"), "--images", f"imagefolder:{folder}") == 0
    plain = Gallery.open(tmp_path / "plain")
    assert sorted(plain.ids) == sorted(json.loads(x)["file_name"] for x in lines) and plain.captions == []
    assert index_main(["info", str(tmp_path / "plain")]) == 0
    assert '"images": 6' in capsys.readouterr().out
    for argv, msg in [
        (
            ["build", "--model", str(serve_assets["model_dir"]), "--images", "coco:/x", "--out", str(tmp_path / "z")],
            "unknown kind 'coco'",
        ),
        (
            ["build", "--model", str(tmp_path / "nope"), "--images", "shapeworld", "--out", str(tmp_path / "z")],
            "no saved AsymVLM",
        ),
        (
            [
                "build",
                "--model",
                str(serve_assets["model_dir"]),
                "--images",
                "shapeworld:9",
                "--out",
                str(tmp_path / "z"),
            ],
            "unknown ShapeWorld version",
        ),
        (
            [
                "build",
                "--model",
                str(serve_assets["model_dir"]),
                "--images",
                "shapeworld",
                "--out",
                str(tmp_path / "z"),
                "--thumbnail_format",
                "gif",
            ],
            "invalid choice",
        ),
        (["info", str(tmp_path)], "no asymvlm gallery"),
    ]:
        assert index_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "z").exists()


def test_asymvlm_serve_refuses_bad_arguments_in_one_line(tmp_path, serve_assets, capsys):
    from asymvlm.training.serve import main

    short = tmp_path / "key"
    short.write_text("abc\n")
    for argv, msg in [
        ([], "give --model and --index"),
        (["--demo", "--model", "x"], "leave out --model"),
        (["--demo", "--demo_dir", str(tmp_path / "none")], "asymvlm-demo --serve --output_dir"),
        (["--model", str(serve_assets["model_dir"]), "--index", str(tmp_path)], "no asymvlm gallery"),
        (["--model", "m", "--index", "i", "--api_key_file", str(short)], "16 characters"),
        (["--model", "m", "--index", "i", "--api_key_file", str(tmp_path / "none")], "No such file"),
        (["--model", "m", "--index", "i", "--max_batch", "0"], "max_batch"),
        (["--model", "m", "--index", "i", "--port", "70000"], "--port"),
        (["--model", "m", "--index", "i", "--ssl_certfile", "c.pem"], "both --ssl_certfile and --ssl_keyfile"),
        (
            [*serve_assets["args"], "--abstain", "x:1"],
            "cannot parse abstention",
        ),
        (["--nope"], "unrecognized arguments"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err, (argv, err)


def test_a_real_server_on_loopback_writes_nothing_but_its_log(tmp_path, serve_assets, key_file):
    import httpx

    from asymvlm.testing import LoopbackServer

    key = key_file(KEY)
    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for d in (work, home, tmp):
        d.mkdir()
    gallery_before = _snapshot(serve_assets["gallery_dir"])
    model_before = _snapshot(serve_assets["model_dir"])
    log = str(tmp_path / "logs" / "access.log")
    args = ["--model", str(serve_assets["model_dir"]), "--index", str(serve_assets["gallery_dir"]),
            "--abstain", "uncertainty:q50", "--api_key_file", str(key), "--log_file", log]  # fmt: skip
    (tmp_path / "logs").mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(tmp)}
    with LoopbackServer(args, work, env=env) as server:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(server.url + "/v1/info").status_code == 401
        r = httpx.post(
            server.url + "/v1/search/text", json={"queries": ["a red circle", "an object"], "k": 3}, headers=auth
        )
        assert r.status_code == 200 and r.json()["results"][0]["abstention"]["quantile"] == 50.0
        up = httpx.post(
            server.url + "/v1/search/image/upload",
            headers=auth,
            files={"file": ("a.png", png_bytes(serve_assets["data"][4]["image"]), "image/png")},
        )
        assert up.status_code == 200
        assert httpx.get(server.url + "/v1/thumbnails/..%2F..%2Fmodel", headers=auth).status_code == 404
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert "server" not in {k.lower() for k in r.headers}  # no server banner
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["logs/access.log", "secret/key.txt", "work/server.log"], written
    assert "POST /v1/search/text" in (tmp_path / "logs" / "access.log").read_text()
    assert (
        _snapshot(serve_assets["gallery_dir"]) == gallery_before
        and _snapshot(serve_assets["model_dir"]) == model_before
    )


def test_tls_keeps_the_key_off_the_wire(tmp_path, serve_assets, key_file):
    import ssl

    import httpx

    from asymvlm.testing import LoopbackServer, make_certificates

    certs = make_certificates(tmp_path / "certs")
    tls = ["--ssl_certfile", str(certs["cert"]), "--ssl_keyfile", str(certs["key"])]
    args = [*serve_assets["args"], *tls, "--api_key_file", str(key_file(KEY)), "--no_access_log"]
    with LoopbackServer(args, tmp_path / "w", verify=certs["ca"]) as server:
        assert server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        r = httpx.post(
            server.url + "/v1/search/text",
            json={"query": "a red circle", "k": 2},
            verify=ctx,
            headers={"X-API-Key": KEY},
        )
        assert r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port is not answered
            httpx.get(server.url.replace("https", "http") + "/healthz", timeout=5)
        with pytest.raises(httpx.HTTPError):  # nor is a client that does not trust the certificate
            httpx.get(server.url + "/healthz", timeout=5)


@pytest.mark.slow
def test_two_worker_processes_serve_the_same_answers(tmp_path, serve_assets):
    import httpx

    from asymvlm.testing import LoopbackServer

    args = [*serve_assets["args"], "--workers", "2", "--no_access_log"]
    with LoopbackServer(args, tmp_path) as server:
        import psutil

        assert len(psutil.Process(server.proc.pid).children(recursive=True)) >= 2
        answers = {
            json.dumps(
                httpx.post(server.url + "/v1/search/text", json={"query": "a red circle", "k": 5}).json()["results"][0][
                    "hits"
                ]
            )
            for _ in range(8)
        }
        assert len(answers) == 1
    assert os.environ.get("ASYMVLM_SERVE_ARGS") is None


@pytest.mark.slow
def test_the_demo_server_builds_what_it_needs(tmp_path, quick_toy_cache, monkeypatch):
    """asymvlm-demo --quick --output_dir D --serve in an empty folder: the demo's model is trained and the
    ShapeWorld gallery built at start-up, then served; asymvlm-serve --demo --demo_dir D reuses both (it
    never trains)."""
    import httpx

    from asymvlm.testing import LoopbackServer

    demo = tmp_path / "demo-out"
    env = {"ASYMVLM_CACHE": str(quick_toy_cache)}
    demo_serve = [str(Path(sys.executable).with_name("asymvlm-demo")), "--quick", "--output_dir", str(demo), "--serve"]
    monkeypatch.setattr("asymvlm.testing.loopback.serve_command", lambda: demo_serve)  # asymvlm-demo --serve <args>
    with LoopbackServer(["--no_access_log"], tmp_path / "w1", env=env, startup_timeout=600) as server:
        info = httpx.get(server.url + "/v1/info").json()
        assert info["gallery"]["size"] == 1000 and info["gallery"]["source"] == "shapeworld:3"
        # the demo withholds answers more likely wrong than right, calibrated on the gallery's captions
        assert info["abstain"] == {"criterion": "p_correct", "threshold": 0.5}
        assert info["calibration"]["source"] == "gallery captions" and info["calibration"]["gallery_size"] == 1000
        ans = httpx.post(server.url + "/v1/search/text", json={"queries": ["an object", info["examples"][-1]], "k": 5})
        vague, specific = ans.json()["results"]
        assert vague["uncertainty"] > specific["uncertainty"] and vague["reasons"][0].startswith("vague query")
        for a in (vague, specific):  # withheld exactly when P(right) < 0.5 ("right": the best image carries it)
            assert a["abstained"] == (a["confidence"]["p_correct"] < 0.5)
            assert a["verdict"] == ("uncertain" if a["abstained"] else "likely right")
        assert httpx.get(server.url + vague["hits"][0]["thumbnail"]).headers["content-type"] == "image/png"
    built = _snapshot(demo)
    monkeypatch.undo()  # asymvlm-serve again
    with LoopbackServer(["--demo", "--demo_dir", str(demo), "--no_access_log"], tmp_path / "w2", env=env) as server:
        assert httpx.get(server.url + "/readyz").status_code == 200
    assert _snapshot(demo) == built  # nothing rebuilt
