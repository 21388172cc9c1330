"""The live page of `dimba serve` in a real headless browser: Debian's chromium driven by Selenium through the
system chromedriver (nothing is downloaded). Load the page, type a prompt, start, watch the canvas change over
several steps, see the final text.

Skipped when chromium or chromedriver is not installed (`apt-get install chromium chromium-driver`; the README's
test command and .ci/run install them), unless DIMBA_REQUIRE_BROWSER=1, which CI sets so the test cannot be
skipped there."""

import os
import shutil

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("DIMBA_REQUIRE_BROWSER") != "1":
    pytest.skip("needs Debian's chromium and chromium-driver packages", allow_module_level=True)

# records the states of the canvas the page draws (a MutationObserver: redraws within one task are seen as one)
RECORD = """
window.seen = [];
new MutationObserver(() => window.seen.push({
  masks: (document.getElementById('canvas').textContent.match(/\u2592/g) || []).length,
  text: document.getElementById('canvas').textContent,
  step: document.getElementById('step').textContent,
})).observe(document.getElementById('canvas'), {childList: true, subtree: true, characterData: true});
"""


def open_browser(width=1100, height=900):
    """A headless chromium (the system binary and driver)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser():
    driver = open_browser()
    yield driver
    driver.quit()


def _set(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_page_shows_the_canvas_denoising_then_the_text(browser, serving, masked_run, tmp_path):
    with serving(masked_run, max_steps=64) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "start").is_enabled())  # the model's card is read
        assert "masked family" in browser.find_element(By.ID, "model").text
        controls = {e.get_attribute("data-name") for e in browser.find_elements(By.CSS_SELECTOR, "#sampler [data-name]")}
        assert {"steps", "remasking", "block_length"} <= controls and "eta" not in controls

        _set(browser, "prompt", "ROMEO:")
        _set(browser, "max_tokens", 24)
        _set(browser, "s-steps", 12)
        browser.execute_script(RECORD)
        browser.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert browser.find_element(By.ID, "error").text == ""

        final = browser.find_element(By.ID, "final").text
        assert final.startswith("ROMEO:") and len(final) > len("ROMEO:")
        assert "latency" in browser.find_element(By.ID, "latency").text
        assert "tokens/s" in browser.find_element(By.ID, "rate").text
        seen = browser.execute_script("return window.seen")  # what was drawn while the events arrived
        assert seen[0]["masks"] > 0 and "step " in seen[0]["step"] and "final" not in seen[0]["step"]
        assert "final" in seen[-1]["step"] and seen[-1]["masks"] == 0

        # every step the page received, drawn again through its replay slider: the canvas changes step by step
        slider = browser.find_element(By.ID, "replay")
        drawn = []
        for k in range(int(slider.get_attribute("max")) + 1):
            browser.execute_script("arguments[0].value = arguments[1];"
                                   "arguments[0].dispatchEvent(new Event('input'));", slider, k)
            drawn.append((browser.find_element(By.ID, "step").text, browser.find_element(By.ID, "canvas").text))
        assert [step for step, _ in drawn[:3]] == ["step 1/12", "step 2/12", "step 3/12"]
        masks = [canvas.count("\u2592") for _, canvas in drawn]
        assert len({canvas for _, canvas in drawn}) >= 4 and masks[0] > 0 and masks[-1] == 0
        assert masks == sorted(masks, reverse=True)
        middle = len(drawn) // 2
        browser.execute_script("arguments[0].value = arguments[1];"
                               "arguments[0].dispatchEvent(new Event('input'));", slider, middle)
        assert browser.find_elements(By.CSS_SELECTOR, "#canvas .tok.mask")  # a mid-generation step, masks and all
        assert browser.save_screenshot(str(tmp_path / "mid.png")) and (tmp_path / "mid.png").stat().st_size > 1000


def test_page_shows_a_server_error(browser, serving, masked_run):
    with serving(masked_run, max_steps=64) as (url, _):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "start").is_enabled())
        _set(browser, "prompt", "ROMEO:")
        _set(browser, "s-steps", 65)  # above the server's --max-steps
        browser.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        assert "at most 64" in browser.find_element(By.ID, "error").text
