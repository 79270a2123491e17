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


#: uncaught exceptions thrown by scripts in the page (``page.on("pageerror")``), for the whole module
PAGE_ERRORS: list = []


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
            PAGE_ERRORS.clear()
            # the message and the stack (which names the script file that threw)
            pg.on("pageerror", lambda exc: PAGE_ERRORS.append(f"{exc}\n{getattr(exc, 'stack', '')}"))
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


# --------------------------------------------------------------------------------------------- sub-tab actions
def _open_tab(page, title: str) -> None:
    page.locator("#sdtoolkit_tabs > div.tab-nav button", has_text=title).first.click()


def _headers(page, elem_id: str) -> list:
    return [h.strip() for h in page.locator(f"#{elem_id} thead th").all_inner_texts()]


def _body_cells(page, elem_id: str) -> list:
    return [c.strip() for c in page.locator(f"#{elem_id} tbody td").all_inner_texts()]


def test_sub_tab_actions_keep_table_headers_and_throw_no_page_errors(page):
    """Issue 10, defect 9: after an error the Hashes and Dedup tables lost their headers, Inspect and Prune showed a
    placeholder ``0`` row, and page errors were reported during sub-tab actions. Every sub-tab is opened and each
    table-producing action is run into an error; the tables keep their headers with no rows, and the page throws
    nothing (any uncaught exception from the page's scripts is collected with page.on("pageerror"))."""
    from lib_sdtoolkit.dedup import TABLE_HEADERS as DEDUP_HEADERS
    from lib_sdtoolkit.ui.hashes_tab import HASH_HEADERS
    from lib_sdtoolkit.ui.inspect_tab import TABLE_HEADERS as INSPECT_HEADERS
    from lib_sdtoolkit.ui.prune_tab import PLAN_HEADERS

    page.wait_for_selector("#sdtoolkit_tabs")
    titles = [t.strip() for t in page.locator("#sdtoolkit_tabs > div.tab-nav button").all_inner_texts()]
    assert {"Merge", "Inspect", "Prune & inspect", "Hashes & dedup"} <= set(titles), titles
    for title in titles:                                   # every sub-tab opens without a page error
        _open_tab(page, title)
        page.wait_for_timeout(150)

    _open_tab(page, "Inspect")                              # never inspected: headers, no placeholder row
    page.wait_for_selector("#sdtoolkit_inspect_components thead th")

    _open_tab(page, "Prune & inspect")
    assert _headers(page, "sdtoolkit_prune_plan") == PLAN_HEADERS
    assert _body_cells(page, "sdtoolkit_prune_plan") in ([], [""] * len(PLAN_HEADERS))
    assert "0" not in _body_cells(page, "sdtoolkit_prune_plan")
    page.fill("#sdtoolkit_prune_path textarea", "../nope.safetensors")
    page.click("#sdtoolkit_prune_inspect")
    page.wait_for_selector("#sdtoolkit_prune_summary .sdtoolkit-error")
    assert _headers(page, "sdtoolkit_prune_plan") == PLAN_HEADERS
    assert "0" not in _body_cells(page, "sdtoolkit_prune_plan")

    _open_tab(page, "Hashes & dedup")
    page.wait_for_selector("#sdtoolkit_hashes_table thead th")
    page.click("#sdtoolkit_hashes_run")                     # nothing picked: an error
    page.wait_for_selector("#sdtoolkit_hashes_status .sdtoolkit-error")
    assert _headers(page, "sdtoolkit_hashes_table") == HASH_HEADERS
    page.fill("#sdtoolkit_dedup_folders textarea", "../outside")
    page.click("#sdtoolkit_dedup_scan")
    page.wait_for_selector("#sdtoolkit_dedup_status .sdtoolkit-error")
    assert _headers(page, "sdtoolkit_dedup_table") == list(DEDUP_HEADERS)

    _open_tab(page, "Inspect")
    page.fill("#sdtoolkit_inspect_path textarea", "../../nope.safetensors")
    _inspect(page, ".sdtoolkit-error")
    assert _headers(page, "sdtoolkit_inspect_components") == INSPECT_HEADERS
    assert "0" not in _body_cells(page, "sdtoolkit_inspect_components")
    page.wait_for_timeout(300)
    assert PAGE_ERRORS == []
