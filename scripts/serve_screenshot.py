"""The README's picture of `pipeline serve`: two stages of a real run answering side by side.

    python scripts/serve_screenshot.py runs/quickstart docs/serve.png \
        "Where does Lerzezer live?" "What work does Lerzezer do?"

Starts `pipeline serve RUN` on a free local port, opens its page in headless Chromium (Debian's
chromium + chromium-driver, as tests/test_serve.py uses), compares sft with dpo greedily, sends each
message, waits for both replies, saves the picture and stops the server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir, out, messages = argv[0], argv[1], argv[2:]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", run_dir, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # the server imports torch before it listens
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,760"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        wait = WebDriverWait(browser, 120)
        try:
            browser.get(url + "/")
            wait.until(lambda b: "dpo" in [o.get_attribute("value") for o in Select(b.find_element(By.ID, "model-b")).options])
            Select(browser.find_element(By.ID, "model-a")).select_by_value("sft")
            Select(browser.find_element(By.ID, "model-b")).select_by_value("dpo")
            for field, value in {"temperature": "0", "max_tokens": "48", "seed": "0"}.items():
                browser.find_element(By.ID, field).clear()
                browser.find_element(By.ID, field).send_keys(value)
            done = ".turn.assistant[data-state=done]"
            for turn, message in enumerate(messages, start=1):
                browser.find_element(By.ID, "message").send_keys(message)
                browser.find_element(By.ID, "send").click()
                wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, done)) == 2 * turn)
            browser.save_screenshot(out)
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
