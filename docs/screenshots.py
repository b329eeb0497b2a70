"""Take the README's two screenshots of ``asymvlm-serve --demo`` in headless chromium.

``python docs/screenshots.py [--demo_dir demo-out]`` serves the demo's model and gallery on loopback
(building what is missing, as ``make serve-demo`` does), searches a familiar specific query and a
query about something the world does not hold, and writes ``docs/serve.png`` (the answer, its
"likely right" badge and the parts under "why?") and ``docs/serve-abstain.png`` (the withheld
answer and the reason). Needs Debian's chromium and chromedriver (``make browser-setup``) and selenium.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
QUERIES = {  # the first candidate with the wanted verdict is shown
    "serve.png": ("likely right", ["a big green diamond in the middle right", "a cyan circle", "a red square"]),
    "serve-abstain.png": ("uncertain", ["a photo of a dog on a beach"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo_dir", default="demo-out")
    p.add_argument("--out", default=str(DOCS))
    args = p.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from asymvlm.testing import LoopbackServer

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        print("screenshots: chromium and chromedriver are needed: make browser-setup", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={work}/profile", "--window-size=1200,1100"):  # fmt: skip
            opts.add_argument(flag)
        args_server = ["--demo", "--demo_dir", str(Path(args.demo_dir).resolve()), "--no_access_log"]
        with LoopbackServer(args_server, Path(work) / "server", startup_timeout=1800) as server:
            browser = webdriver.Chrome(service=Service(driver_bin), options=opts)
            try:
                browser.get(server.url + "/")
                wait = WebDriverWait(browser, 60)
                wait.until(lambda d: "images" in d.find_element(By.ID, "model-info").text)
                for name, (verdict, candidates) in QUERIES.items():
                    for query in candidates:
                        box = browser.find_element(By.ID, "query")
                        box.clear()
                        box.send_keys(query)
                        browser.execute_script("document.getElementById('results').replaceChildren()")
                        browser.find_element(By.ID, "search-button").click()
                        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img")) > 0)
                        wait.until(
                            lambda d: d.execute_script(
                                "return [...document.querySelectorAll('#results img')]"
                                ".every(i => i.complete && i.naturalWidth > 0)"
                            )
                        )
                        if browser.find_element(By.ID, "verdict").text.startswith(verdict):
                            break
                    why = browser.find_element(By.ID, "why")
                    if why.is_displayed() and not why.get_attribute("open"):
                        why.find_element(By.TAG_NAME, "summary").click()
                    path = Path(args.out) / name
                    browser.save_screenshot(str(path))
                    print(f"wrote {path} ({query!r}: {browser.find_element(By.ID, 'verdict').text})")
            finally:
                browser.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
