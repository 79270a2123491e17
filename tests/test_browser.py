"""The standalone app in a real browser: Debian's Chromium (headless) driven by Playwright.

Starts `create_app` on an empty models folder on a free 127.0.0.1 port, creates the sample library with the
button the app offers, picks each sample checkpoint in the Inspect tab and reads its architecture. Nothing is
downloaded: Playwright drives /usr/bin/chromium (`.ci/run` installs it with apt when missing).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import uvicorn

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server.app import create_app

    host = StandaloneHost(models_dir=tmp_path_factory.mktemp("browser") / "models", create=True)
    assert host.is_empty()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(host), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the app did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            pg.goto(app_url)
            yield pg
        finally:
            browser.close()


def _pick(page, label: str) -> None:
    page.click("#sdtoolkit_inspect_model input")
    page.locator("ul.options li", has_text=label).first.click()


def _inspect(page, wait_for: str) -> str:
    """Click Inspect and wait until the architecture box shows ``wait_for`` (a CSS selector inside it)."""
    page.click("#sdtoolkit_inspect_run")
    page.locator(f"#sdtoolkit_inspect_arch {wait_for}").first.wait_for()
    return page.inner_text("#sdtoolkit_inspect_arch")


def test_browser_inspect_flow(page):
    # an empty models folder: the app offers the sample library
    page.wait_for_selector("#sdtoolkit_inspect_sample", state="visible")
    page.click("#sdtoolkit_inspect_sample")
    page.wait_for_selector("#sdtoolkit_inspect_status .sdtoolkit-ok")
    page.wait_for_selector("#sdtoolkit_inspect_sample", state="hidden")

    _pick(page, "sd15-tiny.safetensors")
    text = _inspect(page, '.sdtoolkit-arch-file:has-text("sd15-tiny.safetensors")')
    assert page.inner_text("#sdtoolkit_arch_name") == "SD1", text
    assert "sd15-tiny.safetensors" in text
    components = page.inner_text("#sdtoolkit_inspect_components")
    assert "unet" in components and "text_encoder" in components

    _pick(page, "sdxl-tiny.safetensors")
    text = _inspect(page, '.sdtoolkit-arch-file:has-text("sdxl-tiny.safetensors")')
    assert page.inner_text("#sdtoolkit_arch_name") == "SDXL", text
    assert "text_encoder_2" in page.inner_text("#sdtoolkit_inspect_components")

    # bad input is shown in the page, not swallowed
    page.fill("#sdtoolkit_inspect_path textarea", "../../etc/passwd")
    text = _inspect(page, ".sdtoolkit-error")
    assert "'..' is not allowed" in text
    assert page.locator("#sdtoolkit_inspect_arch .sdtoolkit-error").count() == 1
