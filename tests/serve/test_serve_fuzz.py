"""Fuzzing asymvlm-serve: a few thousand malformed requests (hypothesis) — wrong methods, paths, content
types, JSON of every shape, raw bytes, broken multipart — and no answer is a 5xx; then a few hundred
through a real uvicorn process on loopback, which must still be up and healthy afterwards."""

import json
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from asymvlm.model import AsymVLM  # noqa: E402
from asymvlm.serve.app import create_app  # noqa: E402
from asymvlm.serve.config import ServeConfig  # noqa: E402
from asymvlm.serve.gallery import Gallery  # noqa: E402
from asymvlm.serve.service import RetrievalService  # noqa: E402

PATHS = [
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/v1/info",
    "/v1/search/text",
    "/v1/search/image",
    "/v1/search/image/upload",
    "/v1/classify",
    "/v1/classify/upload",
    "/v1/distribution",
    "/v1/thumbnails/3",
    "/static/app.js",
]
KEYS = [
    "query",
    "queries",
    "k",
    "abstain",
    "criterion",
    "threshold",
    "embedding",
    "embeddings",
    "classes",
    "text",
    "texts",
    "file",
]
DIM = 32


def _png() -> bytes:
    """A valid 2 x 2 RGB PNG, so deep form fields reach their parser."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), "red").save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(
        ["a red circle", "", " ", "\ud800", "x" * 1200, "../../etc/passwd", "uncertainty", "likelihood", "p_correct"]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)
vectors = st.one_of(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=DIM, max_size=DIM),
    st.lists(st.floats(min_value=-1, max_value=1), min_size=0, max_size=40),
    st.just([1.0] + [0.0] * (DIM - 1)),
)
abstain_rules = st.fixed_dictionaries(  # text queries' abstention, p_correct included
    {"criterion": st.sampled_from(["uncertainty", "likelihood", "p_correct", None, "entropy"])},
    optional={"threshold": st.one_of(scalars, st.floats(min_value=-0.5, max_value=1.5))},
)
plausible = st.one_of(  # bodies close to valid ones, so the deep paths are reached
    st.fixed_dictionaries(
        {"query": scalars}, optional={"k": scalars, "abstain": st.one_of(json_values, abstain_rules)}
    ),
    st.fixed_dictionaries(
        {"query": st.sampled_from(["a red circle", "an object"]), "abstain": abstain_rules},
        optional={"k": st.integers(min_value=-2, max_value=90)},
    ),
    st.fixed_dictionaries({"queries": st.lists(scalars, max_size=40)}, optional={"k": scalars}),
    st.fixed_dictionaries({"embedding": vectors}, optional={"k": scalars}),
    st.fixed_dictionaries({"embeddings": st.lists(vectors, max_size=4)}, optional={"k": scalars}),
    st.fixed_dictionaries(
        {"embedding": vectors, "classes": st.lists(scalars, max_size=6)},
        optional={"criterion": scalars, "threshold": scalars},
    ),
    st.fixed_dictionaries({"texts": st.lists(scalars, max_size=5)}),
)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = draw(
        st.one_of(
            st.sampled_from(PATHS),
            st.sampled_from(PATHS).map(lambda p: p + "/" + "x"),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz/._-%0123456789", max_size=30).map(lambda s: "/" + s),
            st.text(max_size=20).map(lambda s: "/v1/thumbnails/" + quote(s.encode("utf-8", "replace"), safe="/")),
        )
    )
    kind = draw(st.sampled_from(["json", "plausible", "raw", "multipart", "deep", "none"]))
    headers = {}
    content = None
    files = data = None
    if kind in ("json", "plausible"):
        body = draw(json_values if kind == "json" else plausible)
        content = json.dumps(body).encode()
        headers["content-type"] = draw(
            st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
        )
    elif kind == "raw":
        content = draw(st.binary(max_size=300))
        headers["content-type"] = draw(
            st.sampled_from(
                ["application/json", "multipart/form-data", "image/png", "multipart/form-data; boundary=zz", ""]
            )
        )
    elif kind == "deep":  # JSON nested past Python's recursion limit, as a body or in a form field
        depth = draw(st.sampled_from([1100, 5000, 100_000]))
        open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        nested = open_ * depth + "1" + close * depth
        if draw(st.booleans()):
            content = nested.encode()
            headers["content-type"] = "application/json"
        else:
            files = {"file": ("x.png", PNG, "image/png")}
            data = {draw(st.sampled_from(["classes", "k", "threshold", "criterion"])): nested}
    elif kind == "multipart":
        payload = draw(st.one_of(st.binary(max_size=200), st.just(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)))
        files = {draw(st.sampled_from(["file", "image", "f"])): ("x.png", payload, "image/png")}
        data = draw(
            st.dictionaries(
                st.sampled_from(["k", "classes", "criterion", "threshold", "zz"]), st.text(max_size=20), max_size=3
            )
        )
    return method, path, headers, content, files, data


@pytest.fixture(scope="module")
def fuzz_client(serve_assets):
    service = RetrievalService(
        AsymVLM.from_pretrained(serve_assets["model_dir"]), Gallery.open(serve_assets["gallery_dir"])
    )
    with TestClient(create_app(service, ServeConfig(max_batch=16)), raise_server_exceptions=False) as c:
        yield c


def send(client, request):
    method, path, headers, content, files, data = request
    if files is not None and method in ("POST", "PUT", "PATCH"):
        return client.request(method, path, files=files, data=data)
    return client.request(method, path, headers=headers, content=content if method not in ("GET", "HEAD") else None)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_no_malformed_request_gets_a_5xx(fuzz_client, request):
    r = send(fuzz_client, request)
    assert r.status_code < 500, (request, r.status_code, r.text[:300])
    if (
        r.status_code >= 400
        and r.headers.get("content-type", "").startswith("application/json")
        and request[0] != "HEAD"
    ):
        err = r.json()["error"]
        assert set(err) == {"status", "field", "message"} and err["message"], err


@pytest.mark.parametrize("depth", [1100, 100_000])
def test_json_nested_too_deeply_is_one_4xx_naming_the_field(fuzz_client, depth):
    """Defect 5 of issue 26: ``classes`` nested 100,000 deep was an HTTP 500 (RecursionError)."""
    nested = "[" * depth + "]" * depth
    r = fuzz_client.post("/v1/classify/upload", files={"file": ("x.png", PNG, "image/png")}, data={"classes": nested})
    assert r.status_code == 422 and r.json()["error"]["field"] == "classes", r.text
    assert "nested too deeply" in r.json()["error"]["message"]
    for path in ("/v1/search/text", "/v1/search/image", "/v1/classify", "/v1/distribution"):
        for body in (nested, '{"query": ' + nested + "}", '{"embedding": ' + nested + "}"):
            r = fuzz_client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code in (400, 422), (path, r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["field"] == "body" and "nested too deeply" in err["message"], err


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, serve_assets):
    import httpx

    from asymvlm.testing import LoopbackServer

    args = [*serve_assets["args"], "--no_access_log", "--head_timeout_s", "2"]
    with LoopbackServer(args, tmp_path_factory.mktemp("fuzz-server")) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield server, client


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_a_real_server_answers_malformed_requests_with_4xx(real_server, request):
    r = send(real_server[1], request)
    assert r.status_code < 500, (request, r.status_code, r.text[:300])


def test_the_real_server_is_up_and_right_after_fuzzing(real_server):
    import socket

    server, client = real_server
    # raw protocol abuse: garbage, and a body shorter than its Content-Length
    for raw in (b"GARBAGE\r\n\r\n", b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{}"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            s.recv(1024)
    assert client.get("/healthz").json() == {"status": "ok"} and server.proc.poll() is None
    ok = client.post("/v1/search/text", json={"query": "a red circle", "k": 3})
    assert ok.status_code == 200 and len(ok.json()["results"][0]["hits"]) == 3


def test_a_client_trickling_its_request_head_is_disconnected(real_server):
    """Issue 26: slow clients were never timed out (uvicorn resets its keep-alive timer on every byte).
    With --head_timeout_s 2, a head sent a byte every 0.25 s is cut off."""
    import socket
    import time

    server, client = real_server
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    start = time.monotonic()
    closed = False
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # reset by the server
                closed = True
                break
            s.settimeout(0.25)
            try:
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
    assert closed and time.monotonic() - start < 10
    assert client.get("/healthz").json() == {"status": "ok"}
