"""The web page of asymvlm-serve in a real headless browser (Debian's chromium + chromedriver,
driven by selenium): it loads offline, a text query shows result images, the uncertainty bar and its
word render, the verdict badge ("likely right 88%" / "uncertain 3%") and its "why" parts render, an
abstention shows with its reason, an image upload lists captions, and with an API key the page works
through the browser's own credentials. The screenshot is checked structurally (elements present,
visible, not blank), never pixel by pixel.

Chromium is installed by ``make browser-setup`` (``.ci/run`` runs it and sets
``ASYMVLM_REQUIRE_BROWSER=1``, so in CI a missing browser fails instead of skipping)."""

import os
import shutil

import pytest

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("ASYMVLM_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium and chromedriver are required (make browser-setup)")
    pytest.skip("chromium / chromedriver not installed (make browser-setup)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "browser-test-key-0123456789"
WIDTH, HEIGHT = 1200, 1400


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_assets):
    from asymvlm.testing import LoopbackServer

    args = [*serve_assets["args"], "--abstain", "uncertainty:q50", "--no_access_log"]
    with LoopbackServer(args, tmp_path_factory.mktemp("browser-server")) as s:
        yield s


@pytest.fixture(scope="module")
def confident_server(tmp_path_factory, serve_assets):
    """The served model carrying its own confidence (a density of other ShapeWorld captions, and a
    calibrator that says 0.9 whatever the parts), served with it (--calibration_captions 0) and the
    default abstention (auto: p_correct:0.5): a familiar text is "likely right", a strange one is
    withheld because it is unfamiliar (its P(right) scaled down by the density's conformal p-value)."""
    import torch

    from asymvlm.confidence import Calibrator, ConfidenceModel, Familiarity
    from asymvlm.model import AsymVLM
    from asymvlm.testing import LoopbackServer
    from asymvlm.worlds import shapeworld as sw

    root = tmp_path_factory.mktemp("confident")
    model = AsymVLM.from_pretrained(serve_assets["model_dir"])
    other = sw.generate(200, seed=11, version=2)
    with torch.no_grad():
        train = model.text_embeddings(list(dict.fromkeys(c for row in other for c in row["captions"])))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(200, generator=gen, dtype=torch.float64)
    calibrator = Calibrator.fit({"ambiguity": noise}, torch.arange(200) % 10 != 0, info={"label": "hand-made"})
    model.confidence = ConfidenceModel(familiarity=Familiarity.fit(train, seed=0), calibrator=calibrator)
    model_dir = model.save_pretrained(root / "model")
    args = ["--model", str(model_dir), "--index", str(serve_assets["gallery_dir"]), "--calibration_captions", "0",
            "--no_access_log"]  # fmt: skip
    with LoopbackServer(args, root / "server") as s:
        yield s


def vaguest_and_most_specific(url: str, gallery_captions: list[str]) -> tuple[str, str]:
    import httpx

    res = httpx.post(url + "/v1/distribution", json={"texts": gallery_captions[:32]}, timeout=30).json()["results"]
    ordered = sorted(res, key=lambda r: r["uncertainty"])
    return ordered[-1]["text"], ordered[0]["text"]


def wait(driver, predicate, timeout=30):
    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def search(driver, text: str, n: int = 12):
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(text)
    driver.execute_script("document.getElementById('results').replaceChildren()")  # wait for the new answer
    driver.find_element(By.ID, "search-button").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img")) == n)
    # every thumbnail really loaded (decoded, non-zero size)
    wait(
        driver,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        ),
    )


def test_the_page_searches_shows_uncertainty_and_abstains(browser, server, serve_assets, tmp_path):
    from asymvlm.serve.gallery import Gallery

    captions = Gallery.open(serve_assets["gallery_dir"]).captions
    vague, specific = vaguest_and_most_specific(server.url, captions)
    browser.get(server.url + "/")
    wait(browser, lambda d: "images" in d.find_element(By.ID, "model-info").text)
    assert "80 images" in browser.find_element(By.ID, "model-info").text
    assert browser.find_elements(By.CSS_SELECTOR, "#examples button.example")

    search(browser, specific)
    bar = browser.find_element(By.CSS_SELECTOR, "#uncertainty-bar .fill")
    assert bar.size["width"] > 0 and bar.is_displayed()
    assert browser.find_element(By.ID, "specificity").text.lower() in ("specific", "moderate", "vague")
    assert not browser.find_element(By.ID, "abstained-banner").is_displayed()
    specific_width = bar.size["width"]
    check_verdict(browser, server.url, specific)  # the gallery is calibrated on its own captions

    search(browser, vague)
    banner = browser.find_element(By.ID, "abstained-banner")
    wait(browser, lambda d: banner.is_displayed())
    assert banner.text.startswith("Withheld: its uncertainty") and "threshold" in banner.text
    assert "abstained" in browser.find_element(By.ID, "results").get_attribute("class")
    assert browser.find_element(By.ID, "specificity").text.lower() == "vague"
    assert bar.size["width"] > specific_width  # the vaguer query fills more of the bar

    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    check_screenshot(browser, shot)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no failed requests, no CSP violations, no script errors


def answer_of(url: str, query: str) -> dict:
    import httpx

    return httpx.post(url + "/v1/search/text", json={"query": query, "k": 12}, timeout=30).json()["results"][0]


def check_verdict(browser, url: str, query: str) -> dict:
    """The badge says the API's verdict and P(right) in percent, in the verdict's colour."""
    want = answer_of(url, query)
    badge = browser.find_element(By.ID, "verdict")
    assert badge.is_displayed() and want["verdict"] in ("likely right", "uncertain")
    assert badge.text == f"{want['verdict']} {round(100 * want['confidence']['p_correct'])}%"
    colour = badge.value_of_css_property("background-color")
    assert colour == {"likely right": "rgba(229, 243, 234, 1)", "uncertain": "rgba(251, 240, 217, 1)"}[want["verdict"]]
    return want


def open_why(browser) -> dict[str, str]:
    """Open the "why" details; the text of each part by name."""
    why = browser.find_element(By.ID, "why")
    if not why.get_attribute("open"):
        why.find_element(By.TAG_NAME, "summary").click()
    wait(browser, lambda d: d.find_element(By.ID, "why-parts").is_displayed())
    items = browser.find_elements(By.CSS_SELECTOR, "#why-parts li")
    return {li.get_attribute("data-part"): li.text for li in items}


def test_the_page_says_how_likely_an_answer_is_right_and_why(browser, confident_server, tmp_path):
    url = confident_server.url
    browser.get(url + "/")
    wait(browser, lambda d: "images" in d.find_element(By.ID, "model-info").text)
    info = browser.find_element(By.ID, "model-info").text
    assert "P(right) from the model's calibrator" in info and "withholds answers when P(right) < 0.5" in info

    search(browser, "a red circle")  # familiar: the calibrator's 0.9
    want = check_verdict(browser, url, "a red circle")
    assert want["verdict"] == "likely right" and not browser.find_element(By.ID, "abstained-banner").is_displayed()
    parts = open_why(browser)
    c = want["confidence"]
    assert set(parts) == {"ambiguity", "retrieval", "unfamiliarity", "p_correct"}
    assert f"more uncertain than {round(c['ambiguity_percentile'])}% of this gallery's captions" in parts["ambiguity"]
    assert f"about {round(c['effective_candidates'])} images compete for it" in parts["retrieval"]
    assert f"stranger than {round(c['unfamiliarity_percentile'])}% of the training texts" in parts["unfamiliarity"]
    reasons = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#why-reasons li")]
    assert reasons == want["reasons"]

    strange = "photo photo photo photo"  # stranger than every text the density was fitted on
    search(browser, strange)
    want = check_verdict(browser, url, strange)
    assert want["verdict"] == "uncertain" and want["abstained"]
    banner = browser.find_element(By.ID, "abstained-banner")
    wait(browser, lambda d: banner.is_displayed())
    p = want["confidence"]["p_correct"]
    assert banner.text.startswith(f"Withheld: P(right) {p:.2f} is below 0.5 — "), banner.text
    assert "unfamiliar text: stranger than all of the training texts" in banner.text
    assert "abstained" in browser.find_element(By.ID, "results").get_attribute("class")
    parts = open_why(browser)
    assert "stranger than all of the training texts" in parts["unfamiliarity"]
    assert [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#why-reasons li")] == want["reasons"]

    shot = tmp_path / "why.png"
    browser.save_screenshot(str(shot))
    check_screenshot(browser, shot, ("#verdict", "#why", "#abstained-banner", "#results img"))
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def check_screenshot(browser, path, selectors=("#uncertainty-bar", "#abstained-banner", "#results img", "#query")):
    """Structural: the screenshot has the window's size, and the regions of the bar, the banner and
    the first result image are not blank."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB")).astype(float)
    scale = img.shape[1] / browser.execute_script("return window.innerWidth")
    for selector in selectors:
        el = browser.find_element(By.CSS_SELECTOR, selector)
        r = browser.execute_script(
            "const b = arguments[0].getBoundingClientRect(); return [b.x, b.y, b.width, b.height]", el
        )
        x0, y0, w, h = (int(v * scale) for v in r)
        assert w > 4 and h > 4 and y0 + h <= img.shape[0], (selector, r)
        region = img[y0 : y0 + h, x0 : x0 + w]
        assert region.std() > 1.0, f"{selector} looks blank in the screenshot"


def test_the_page_searches_by_uploaded_image(browser, server, serve_assets, tmp_path):
    image = tmp_path / "query.png"
    serve_assets["data"][9]["image"].save(image)
    browser.get(server.url + "/")
    wait(browser, lambda d: "images" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "upload").send_keys(str(image))
    browser.find_element(By.ID, "upload-button").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#caption-results li")) == 8)
    items = browser.find_elements(By.CSS_SELECTOR, "#caption-results li")
    import httpx

    want = httpx.post(
        server.url + "/v1/search/image/upload",
        files={"file": ("q.png", image.read_bytes(), "image/png")},
        data={"k": "8"},
    ).json()["results"][0]["hits"]
    assert [i.find_element(By.CLASS_NAME, "text").text for i in items] == [h["id"] for h in want]
    assert all(i.find_element(By.CSS_SELECTOR, ".bar .fill").size["width"] > 0 for i in items)
    assert browser.find_element(By.ID, "upload-preview").is_displayed()


def test_with_an_api_key_the_page_works_through_the_browsers_credentials(browser, serve_assets, tmp_path, key_file):
    from asymvlm.testing import LoopbackServer

    args = [*serve_assets["args"], "--api_key_file", str(key_file(KEY)), "--no_access_log"]
    with LoopbackServer(args, tmp_path / "srv") as s:
        browser.get(s.url + "/")  # no credentials: a 401 (headless chromium cannot show the prompt)
        assert not browser.find_elements(By.ID, "query") and "asymvlm" not in browser.page_source
        browser.get(f"http://user:{KEY}@127.0.0.1:{s.port}/")  # what the browser's prompt would send
        wait(browser, lambda d: "images" in d.find_element(By.ID, "model-info").text)
        search(browser, "a red circle", n=12)
