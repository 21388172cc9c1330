"""The README's screenshot of the live page: a mid-generation step of `dimba serve`, drawn by headless chromium.

    python bench/serve_screenshot.py MODEL [--prompt "ROMEO:"] [--steps 24] [--max-tokens 48] [--seed 0]
                                     [--at 0.3] [--out docs/serve_page.png]

Serves MODEL on a free loopback port, opens the page in Debian's chromium (Selenium with the system
chromedriver), generates, then moves the page's replay slider to step ``--at`` x steps, so that the picture is the
canvas as it was drawn at that step (masks, the tokens committed at it, confidence as colour), and saves it.
"""

from __future__ import annotations

import argparse
import shutil
import threading

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from dimba.config import SampleConfig
from dimba.serve.server import Options, prepare, url_of


def serve_in_thread(model: str):
    """`dimba serve MODEL` on a free loopback port in a thread: the uvicorn server and its URL."""
    server, sock, _ = prepare(model, SampleConfig(), Options(port=0, threads=1))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    return server, url_of(sock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--at", type=float, default=0.3, help="the step shown, as a fraction of the steps")
    ap.add_argument("--out", default="docs/serve_page.png")
    args = ap.parse_args()
    server, url = serve_in_thread(args.model)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "start").is_enabled())
        for element_id, value in (("prompt", args.prompt), ("max_tokens", args.max_tokens),
                                  ("seed", args.seed), ("s-steps", args.steps)):
            field = driver.find_element(By.ID, element_id)
            field.clear()
            field.send_keys(str(value))
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        slider = driver.find_element(By.ID, "replay")
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
                              slider, max(0, round(args.at * args.steps) - 1))
        print(driver.find_element(By.ID, "step").text)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
