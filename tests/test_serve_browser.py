"""The page in a real browser: headless Chromium (selenium) against a real uvicorn on a free loopback port.

Uploads a Kaggle sample image, waits for the ranked prompts and checks them against `img2prompt search --json`
for the same image; then the keyboard-only path (text search, copy a prompt) and the phone width.
Skips (with the reason) when no Chromium + chromedriver is installed or ../shared is absent. Debian:
`apt-get install -y chromium chromium-driver`.

The screenshot goes to the test's temporary folder; set IMG2PROMPT_SCREENSHOT=docs/serve-screenshot.png to
refresh the one in the docs (a test run does not rewrite tracked files by default).
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import KAGGLE_SAMPLE, REPO, needs_shared, run_cli, shared_absent

pytest.importorskip("fastapi", reason="the serve extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

pytestmark = pytest.mark.slow  # a real browser and a served index

K = 5
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> tuple[str, str]:
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver") or next(
        (path for path in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(path)), None)
    if not browser or not driver:
        pytest.skip("no Chromium and chromedriver found (Debian: apt-get install -y chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def sample_image() -> Path:
    found = sorted((KAGGLE_SAMPLE / "images").glob("*.png"))
    if not found:
        pytest.skip(shared_absent("kaggle-sample/images"))
    return found[0]


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _find_chromium()
    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,820", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager try to download a driver
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server_url(built_index):
    import img2prompt
    from img2prompt.serve import background_server, create_app

    with img2prompt.open_index(built_index, device="cpu") as index:
        with background_server(create_app(index)) as url:  # Host 127.0.0.1: allowed by default
            yield url


def _hits(driver) -> list[dict]:
    from selenium.webdriver.common.by import By

    return [{"rank": int(item.get_attribute("data-rank")), "id": int(item.get_attribute("data-id")),
             "score": float(item.get_attribute("data-score")),
             "prompt": item.find_element(By.CSS_SELECTOR, ".prompt").text}
            for item in driver.find_elements(By.CSS_SELECTOR, "#results li.hit")]


def _screenshot(driver, tmp_path: Path) -> Path:
    """A small PNG (palette-quantised: a page of flat colours loses nothing visible)."""
    from PIL import Image

    target = Path(os.environ.get("IMG2PROMPT_SCREENSHOT") or tmp_path / "serve-screenshot.png")
    target = target if target.is_absolute() else REPO / target
    target.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return target


@needs_shared("kaggle-sample/images")
def test_page_upload_matches_search_json(browser, server_url, built_index, sample_image, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    cli = run_cli("search", built_index, "--image", sample_image, "--k", K, "--json", "--device", "cpu")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)[0]["results"]

    wait = WebDriverWait(browser, 60)
    browser.get(server_url + "/")
    wait.until(lambda d: "prompts" in d.find_element(By.ID, "info").text)
    assert browser.find_element(By.ID, "results-hint").is_displayed()  # the empty panel says what to do
    text_field = browser.find_element(By.ID, "text")  # the placeholder fits its field (not cut)
    assert browser.execute_script("const f = arguments[0], c = document.createElement('canvas').getContext('2d');"
                                  "c.font = getComputedStyle(f).font;"
                                  "return c.measureText(f.placeholder).width <= f.clientWidth;", text_field)
    assert browser.execute_script("return fetch('/favicon.ico').then(r => r.status)") == 200
    k_field = browser.find_element(By.ID, "k")
    k_field.clear()
    k_field.send_keys(str(K))
    browser.find_element(By.ID, "file").send_keys(str(sample_image.resolve()))
    wait.until(lambda d: "best first" in d.find_element(By.ID, "status").text)

    hits = _hits(browser)
    assert [(h["rank"], h["id"], h["prompt"]) for h in hits] == [(r["rank"], r["id"], r["prompt"]) for r in expected]
    assert [h["score"] for h in hits] == pytest.approx([r["score"] for r in expected], abs=1e-6)
    preview = browser.find_element(By.ID, "preview")
    assert preview.is_displayed() and sample_image.name in preview.get_attribute("alt")
    wait.until(lambda d: d.find_element(By.ID, "readable-box").is_displayed())  # interrogate's readable prompt
    readable = run_cli("interrogate", built_index, sample_image, "--json", "--device", "cpu")
    assert browser.find_element(By.ID, "readable").text == json.loads(readable.stdout)[0]["prompt"]
    browser.execute_script("document.activeElement.blur()")  # no focus ring on the k field in the picture
    shot = _screenshot(browser, tmp_path)
    assert shot.stat().st_size < 400_000

    # keyboard only: type a text, Enter; tab to the first Copy button, Enter
    text = browser.find_element(By.ID, "text")
    text.send_keys("a lighthouse in a storm, oil painting", Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "query-label").text.endswith("oil painting")
               and "best first" in d.find_element(By.ID, "status").text)
    assert not browser.find_element(By.ID, "preview").is_displayed()  # the image query's preview is gone
    assert not browser.find_element(By.ID, "results-hint").is_displayed()
    for _ in range(12):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.get_attribute("aria-label") == "Copy prompt 1":
            break
    else:
        pytest.fail("the first Copy button cannot be reached with Tab")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "Prompt copied.")

    # phone width: nothing wider than the screen
    browser.set_window_size(390, 844)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_page_clears_stale_results_shows_time_and_the_stand_in(browser, server_url, sample_image, tmp_path):
    """Issue 33 item 5: a failed upload after a good one leaves no old results and no broken image; each query
    shows its time; the tests' index (a stand-in CLIP) carries the notice."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.set_window_size(1100, 820)
    browser.get(server_url + "/")
    wait.until(lambda d: "prompts" in d.find_element(By.ID, "info").text)
    notice = browser.find_element(By.ID, "stand-in")
    assert notice.is_displayed() and "random weights" in notice.text and "stand-in" in browser.find_element(
        By.ID, "info").text

    browser.find_element(By.ID, "file").send_keys(str(sample_image.resolve()))
    wait.until(lambda d: "best first" in d.find_element(By.ID, "status").text)
    assert _hits(browser)
    timing = browser.find_element(By.ID, "timing").text
    assert timing.startswith("Query time: ") and timing.endswith(" ms") and int(timing.split()[2]) >= 0
    wait.until(lambda d: d.find_element(By.ID, "readable-box").is_displayed())

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert _hits(browser) == []  # the previous image's results are gone
    assert browser.find_element(By.ID, "query-label").text == ""
    assert not browser.find_element(By.ID, "readable-box").is_displayed()
    wait.until(lambda d: not d.find_element(By.ID, "preview").is_displayed())  # no broken-image icon
    assert browser.find_element(By.ID, "timing").text.startswith("Failed after ")
    assert browser.find_element(By.ID, "status").text  # the server's reason is shown

    browser.find_element(By.ID, "text").send_keys("a lighthouse in a storm\n")
    wait.until(lambda d: "best first" in d.find_element(By.ID, "status").text)
    assert _hits(browser) and browser.find_element(By.ID, "timing").text.startswith("Query time: ")
