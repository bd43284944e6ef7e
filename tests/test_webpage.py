"""End to end in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium)
uploads a real X-ray to the web page of a live server and must see the prediction, bars, notice and overlay.

The test runs `drive` in a subprocess: the venv's Python when it has Selenium, else the system Python with
Debian's `python3-selenium` (so CI needs only Debian packages for the browser part).
"""

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"


def drive(url: str, image: str, chromium: str, chromedriver: str) -> dict:
    """Open the page, pick `image` in the file input, wait for the result; what the page shows, as a dict."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        browser.get(url)
        notice = browser.find_element(By.ID, "notice")
        picker = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].hidden = false;", picker)
        picker.send_keys(image)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "prediction").text.strip())
        wait.until(lambda b: b.execute_script(
            "const o = document.getElementById('overlay'); return (o.complete && o.naturalWidth > 0) || "
            "document.getElementById('overlay-caption').textContent.includes('unavailable');"))
        return {
            "notice": notice.text, "notice_visible": notice.is_displayed(),
            "prediction": browser.find_element(By.ID, "prediction").text,
            "bars": [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")],
            "status": browser.find_element(By.ID, "status").text,
            "preview_width": browser.execute_script("return document.getElementById('preview').naturalWidth"),
            "overlay_width": browser.execute_script("return document.getElementById('overlay').naturalWidth"),
            "overlay_caption": browser.find_element(By.ID, "overlay-caption").text,
            "version": browser.find_element(By.ID, "version").text,
        }
    finally:
        browser.quit()


def _python_with_selenium() -> str | None:
    for exe in (sys.executable, "/usr/bin/python3"):
        if exe and Path(exe).exists() and subprocess.run([exe, "-c", "import selenium"],
                                                         capture_output=True).returncode == 0:
            return exe
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    uvicorn = pytest.importorskip("uvicorn")
    from test_serve import tiny_checkpoint

    from bonefrac.serve.app import create_app
    from bonefrac.serve.settings import Settings

    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("model") / "ckpt")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Settings(model=str(ckpt))), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


def test_upload_in_headless_chromium_shows_the_result(server):
    python = _python_with_selenium()
    if not (CHROMIUM and Path(CHROMEDRIVER).exists() and python):
        pytest.skip("needs chromium, chromium-driver and selenium (apt-get install chromium chromium-driver "
                    "python3-selenium)")
    image = sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))[0]
    code = inspect.getsource(drive) + "\nimport json, sys\nprint(json.dumps(drive(*sys.argv[1:])))\n"
    proc = subprocess.run([python, "-c", code, server, str(image), CHROMIUM, CHROMEDRIVER],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shown["notice_visible"] and "not a diagnosis" in shown["notice"].lower()
    assert shown["prediction"].split(" ")[0] in ("no_fracture", "fracture"), shown
    assert len(shown["bars"]) == 2 and all("%" in b for b in shown["bars"]), shown
    assert shown["preview_width"] > 0 and shown["status"] == "Done." and shown["version"].startswith("resnet10t")
    assert shown["overlay_width"] > 0 or "unavailable" in shown["overlay_caption"], shown

