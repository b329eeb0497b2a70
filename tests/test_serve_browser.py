"""The web page of asymvlm-serve in a real headless browser (Debian's chromium + chromedriver,
driven by selenium): it loads offline, a text query shows result images, the uncertainty bar and its
word render, an abstention shows, an image upload lists captions, and with an API key the page works
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
    from asymvlm.serve.loopback import LoopbackServer

    args = [*serve_assets["args"], "--abstain", "uncertainty:q50", "--no_access_log"]
    with LoopbackServer(args, tmp_path_factory.mktemp("browser-server")) as s:
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

    search(browser, vague)
    banner = browser.find_element(By.ID, "abstained-banner")
    wait(browser, lambda d: banner.is_displayed())
    assert banner.text.startswith("Abstained") and "threshold" in banner.text
    assert "abstained" in browser.find_element(By.ID, "results").get_attribute("class")
    assert browser.find_element(By.ID, "specificity").text.lower() == "vague"
    assert bar.size["width"] > specific_width  # the vaguer query fills more of the bar

    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    check_screenshot(browser, shot)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no failed requests, no CSP violations, no script errors


def check_screenshot(browser, path):
    """Structural: the screenshot has the window's size, and the regions of the bar, the banner and
    the first result image are not blank."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB")).astype(float)
    scale = img.shape[1] / browser.execute_script("return window.innerWidth")
    for selector in ("#uncertainty-bar", "#abstained-banner", "#results img", "#query"):
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
    from asymvlm.serve.loopback import LoopbackServer

    args = [*serve_assets["args"], "--api_key_file", str(key_file(KEY)), "--no_access_log"]
    with LoopbackServer(args, tmp_path / "srv") as s:
        browser.get(s.url + "/")  # no credentials: a 401 (headless chromium cannot show the prompt)
        assert not browser.find_elements(By.ID, "query") and "asymvlm" not in browser.page_source
        browser.get(f"http://user:{KEY}@127.0.0.1:{s.port}/")  # what the browser's prompt would send
        wait(browser, lambda d: "images" in d.find_element(By.ID, "model-info").text)
        search(browser, "a red circle", n=12)
