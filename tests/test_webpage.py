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

import numpy as np
import pytest
from PIL import Image

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


def page_checks(urls: str, images: str, chromium: str, chromedriver: str) -> dict:
    """Scenarios a user meets on the page, each recorded (or its failure, as "error: ...") in the returned dict.
    `urls`: JSON {"t014", "neg", "pos"} -> servers whose model's threshold is 0.14, ~1 (every call negative) and
    ~0 (every call positive); `images`: JSON list of image paths, file names chosen by the test."""
    import json
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    urls, images = json.loads(urls), json.loads(images)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(chromedriver), options=opts)
    js = browser.execute_script
    out, logs = {}, []

    def text(element_id):
        return js(f"const e = document.getElementById('{element_id}'); return e ? e.textContent : null;")

    def shown(element_id):
        found = browser.find_elements(By.ID, element_id)
        return bool(found) and found[0].is_displayed()

    def open_page(url):
        browser.get(url)
        picker = browser.find_element(By.ID, "file")
        js("arguments[0].hidden = false;", picker)  # the old page hid the input: Selenium needs it in the DOM
        return picker

    def upload(picker, path):
        js("arguments[0].value = '';", picker)  # else the same file twice in a row fires no change event
        picker.send_keys(path)

    def done(name=None, timeout=60, overlay=True):
        WebDriverWait(browser, timeout).until(lambda b: text("status") == "Done." and (
            name is None or text("result-file") in (None, name)) and (not overlay or js(
            "const o = document.getElementById('overlay'); return (o.complete && o.naturalWidth > 0) || "
            "document.getElementById('overlay-caption').textContent.includes('unavailable');")))

    def scenario(name, fn):
        try:
            out[name] = fn()
        except Exception as exc:  # recorded: one broken scenario must not hide the others' results
            out[name] = f"error: {type(exc).__name__}: {exc}"[:2000]
        logs.extend(browser.get_log("browser"))

    def keyboard():
        browser.get(urls["t014"])
        found = {"file_hidden_attr": js("return document.getElementById('file').hidden"),
                 "accept": js("return document.getElementById('file').getAttribute('accept')")}
        order = []
        for _ in range(4):
            ActionChains(browser).send_keys(Keys.TAB).perform()
            element_id = js("return document.activeElement.id")
            order.append(element_id)
            if element_id == "drop":
                found["drop_outline"] = js("const s = getComputedStyle(document.activeElement); "
                                           "return [s.outlineStyle, parseFloat(s.outlineWidth)];")
            if element_id == "file":
                found["label_outline"] = js("const s = getComputedStyle(document.querySelector('label[for=file]') "
                                            "|| document.getElementById('file').parentElement); "
                                            "return [s.outlineStyle, parseFloat(s.outlineWidth)];")
        found["tab_order"] = order
        # The native chooser cannot be seen headless: record which input a key press would open instead.
        js("window.__opened = []; HTMLInputElement.prototype.click = function () { window.__opened.push(this.id); };")
        for key in (Keys.ENTER, Keys.SPACE):
            js("document.getElementById('drop').focus();")
            ActionChains(browser).send_keys(key).perform()
        found["opened"] = js("return window.__opened")
        return found

    def stale():
        a, b = images  # a is delayed by the fetch wrapper below: its answers arrive after b's
        picker = open_page(urls["t014"])
        results = {}
        for path in (b, a):
            upload(picker, path)
            done(path.split("/")[-1], overlay=path == b)  # a is no X-ray: nothing to explain
            bars = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")]
            results[path] = [text("prediction"), *bars]
        js("""window.__created = []; window.__revoked = [];
              const create = URL.createObjectURL, revoke = URL.revokeObjectURL;
              URL.createObjectURL = (x) => { const u = create(x); window.__created.push(u); return u; };
              URL.revokeObjectURL = (u) => { window.__revoked.push(u); return revoke(u); };
              const real = window.fetch;
              window.fetch = async (url, init) => {
                const name = init.body.get('files').name;
                if (name.startsWith('noexplain') && String(url).includes('explain'))
                  return new Response('{"error": {"code": "internal", "message": "test"}}', {status: 500});
                const resp = await real(url, init);
                if (name.startsWith('slow')) await new Promise((r) => setTimeout(r, 2500));
                return resp;
              };""")
        upload(picker, a)
        time.sleep(0.3)
        upload(picker, b)
        done(b.split("/")[-1])
        time.sleep(6)  # both of a's delayed answers have arrived by now
        bars = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")]
        after = {"shown": [text("prediction"), *bars],
                 "file": text("result-file"), "status": text("status"), "expected": results[b],
                 "other": results[a]}
        after["unrevoked"] = js("return window.__created.filter((u) => !window.__revoked.includes(u)).length")
        # an explanation that fails, then one that works: the failure's caption must not stay
        noexplain = b.rsplit("/", 1)[0] + "/noexplain_" + b.split("/")[-1]
        upload(picker, noexplain)
        done("noexplain_" + b.split("/")[-1])
        after["failed_caption"] = text("overlay-caption")
        upload(picker, b)
        done(b.split("/")[-1])
        after["caption_after"] = text("overlay-caption")
        return after

    def call(key):
        def run():
            picker = open_page(urls[key])
            upload(picker, images[1])
            done()
            found = {"prediction": text("prediction"), "caption": text("overlay-caption"),
                     "overlay_shown": shown("overlay"), "warning": text("overlay-warning"),
                     "warning_shown": shown("overlay-warning"), "button_shown": shown("overlay-show"),
                     "threshold": text("threshold"), "threshold_shown": shown("threshold"),
                     "marker": js("const m = document.querySelector('#bars .bar[data-cls=fracture] .marker'); "
                                  "return m ? m.style.left : null;"),
                     "bars": [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")]}
            if found["button_shown"]:
                browser.find_element(By.ID, "overlay-show").click()
                found["overlay_shown_after_click"] = shown("overlay")
            return found
        return run

    try:
        scenario("keyboard", keyboard)
        scenario("stale", stale)
        for key in ("t014", "neg", "pos"):
            scenario(key, call(key))
        out["csp_violations"] = [e["message"] for e in logs if "Content Security Policy" in e.get("message", "")]
        return out
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


def _serve(ckpt: Path):
    """A live server for `ckpt` on a free port in a thread: (url, stop)."""
    import uvicorn

    from bonefrac.serve.app import create_app
    from bonefrac.serve.settings import Settings

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Settings(model=str(ckpt), preprocess_workers=0)),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)

    def stop():
        srv.should_exit = True
        thread.join(10)
    return f"http://127.0.0.1:{port}/", stop


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("uvicorn")
    from test_serve import tiny_checkpoint

    url, stop = _serve(tiny_checkpoint(tmp_path_factory.mktemp("model") / "ckpt"))
    yield url
    stop()


def _browser_or_skip() -> str:
    python = _python_with_selenium()
    if not (CHROMIUM and Path(CHROMEDRIVER).exists() and python):
        pytest.skip("needs chromium, chromium-driver and selenium (apt-get install chromium chromium-driver "
                    "python3-selenium)")
    return python


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """What `page_checks` saw, on servers whose model calls at 0.14 (as the shipped one), ~1 and ~0."""
    pytest.importorskip("uvicorn")
    python = _browser_or_skip()
    from test_serve import tiny_checkpoint

    root = tmp_path_factory.mktemp("page")
    thresholds = {"t014": 0.14, "neg": 0.999999, "pos": 1e-6}
    servers = {k: _serve(tiny_checkpoint(root / k, threshold=t)) for k, t in thresholds.items()}
    samples = sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))
    # "slow": the page's fetch is delayed for this one; noise, so its answer ("not an X-ray") differs from b's
    images = [root / "slow_a.png", root / "b.webp"]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)).save(images[0])
    shutil.copy(samples[3], images[1])
    shutil.copy(samples[3], root / "noexplain_b.webp")  # its /v1/explain fails (in the page)
    code = inspect.getsource(page_checks) + "\nimport json, sys\nprint(json.dumps(page_checks(*sys.argv[1:])))\n"
    try:
        proc = subprocess.run([python, "-c", code, json.dumps({k: u for k, (u, _) in servers.items()}),
                               json.dumps([str(p) for p in images]), CHROMIUM, CHROMEDRIVER],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
    finally:
        for _, stop in servers.values():
            stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_upload_in_headless_chromium_shows_the_result(server):
    python = _browser_or_skip()
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



def _scenario(page, name) -> dict:
    found = page[name]
    assert isinstance(found, dict), found  # a string: the scenario failed in the browser
    return found


def test_upload_works_from_the_keyboard_with_a_visible_focus(page):
    """The file input was `hidden` (not focusable) and Enter on the focusable drop zone did nothing."""
    k = _scenario(page, "keyboard")
    assert not k["file_hidden_attr"] and k["tab_order"][:2] == ["drop", "file"], k
    for outline in (k["drop_outline"], k["label_outline"]):
        assert outline[0] not in ("none", "auto") and outline[1] >= 2, k  # our own ring, not the browser's 1 px
    assert k["opened"] == ["file", "file"], k  # Enter, then Space on the drop zone


def test_the_chooser_shows_files_without_an_extension(page):
    """PACS exports often have no extension: an accept= list hid them in the chooser (the server sniffs content)."""
    assert not _scenario(page, "keyboard")["accept"]


def test_a_slow_earlier_file_never_overwrites_the_later_ones_result(page):
    s = _scenario(page, "stale")
    assert s["expected"] != s["other"], "the two sample images must score differently for this test"
    assert s["shown"] == s["expected"] and s["file"] == "b.webp" and s["status"] == "Done.", s
    assert s["unrevoked"] <= 2, s  # the preview and overlay on screen; earlier object URLs are released
    assert "unavailable" in s["failed_caption"] and "unavailable" not in s["caption_after"], s


def test_the_threshold_is_shown_on_the_positive_bar_and_in_text(page):
    t = _scenario(page, "t014")
    assert t["marker"] and float(t["marker"].rstrip("%")) == 14.0 and t["threshold_shown"], t
    assert "14.0 %" in t["threshold"] and "fracture" in t["threshold"] and "default" in t["threshold"], t


def test_a_negative_calls_heat_map_is_not_shown_as_a_fracture_locator(page):
    n = _scenario(page, "neg")
    assert n["prediction"].startswith("no_fracture"), n
    assert not n["overlay_shown"] and n["warning_shown"] and "not a fracture locator" in n["warning"], n
    assert n["button_shown"] and n["overlay_shown_after_click"], n
    assert "evidence for no_fracture (relative scale within this image; not a measure of certainty)" in n["caption"]


def test_a_positive_calls_heat_map_is_captioned_with_what_it_shows(page):
    p = _scenario(page, "pos")
    assert p["prediction"].startswith("fracture") and p["overlay_shown"] and not p["warning_shown"], p
    assert "evidence for fracture (relative scale within this image; not a measure of certainty)" in p["caption"]


def test_the_page_runs_under_its_content_security_policy(page):
    assert page["csp_violations"] == [], page["csp_violations"]
