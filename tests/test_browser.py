"""The standalone app in a real browser: Debian's Chromium (headless) driven by Playwright.

Starts `create_app` once on an empty models folder on a free 127.0.0.1 port, creates the sample library with the
button the app offers, picks each sample checkpoint in the Inspect tab and reads its architecture; then, on a fresh
page load and with clicks on defaults only, every tab does its job on the sample library (issue 15's "done when").
Nothing is downloaded: Playwright drives /usr/bin/chromium (`.ci/run` installs it with apt when missing).
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
#: the app's models folder (set by the app_url fixture)
APP: dict = {}


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
    APP["root"] = host.models_root
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


# --------------------------------------------------------------------------------------------- issue 15: done when
def _choose_first(page, elem_id: str) -> str:
    """Open a dropdown and click its first entry (a click on what the app offers)."""
    page.click(f"#{elem_id} input")
    first = page.locator("ul.options li").first
    text = first.inner_text().strip()
    first.click()
    page.keyboard.press("Escape")
    return text


def _options(page, elem_id: str) -> list:
    page.click(f"#{elem_id} input")
    page.locator("ul.options li").first.wait_for()
    opts = [t.strip() for t in page.locator("ul.options li").all_inner_texts()]
    page.keyboard.press("Escape")
    return opts


def _image_of(page, selector: str):
    """The PIL image an <img> in the page shows (a data URL or a file URL of the app)."""
    import base64
    import io

    from PIL import Image

    img = page.locator(f"{selector} img").first
    img.wait_for()
    src = img.get_attribute("src")
    if src.startswith("data:"):
        raw = base64.b64decode(src.split(",", 1)[1])
    else:
        raw = page.request.get(src if "://" in src else page.url.rstrip("/") + "/" + src.lstrip("/")).body()
    return Image.open(io.BytesIO(raw)).convert("RGB")


def test_every_tab_works_on_the_sample_library_with_clicks_on_defaults(page, app_url):
    """A fresh page (the pickers fill on load), then only clicks on what the app offers: a merge whose result is in
    Model A's list without Refresh, prune, hash + dedup, LoRA inspect, Tiled VAE encode -> decode giving back a
    recognisable image (PSNR and correlation against the sample PNG, computed here with numpy), ControlNet detect."""
    import numpy as np
    from PIL import Image

    from lib_sdtoolkit.samples.library import NAMES

    root = APP["root"]
    assert (root / NAMES["image"]).is_file(), "the inspect flow test creates the sample library first"
    page.goto(app_url)
    page.wait_for_function(
        "() => { const i = document.querySelector('#sdtoolkit_merge_a input'); return i && i.value; }")

    # merge: defaults (the first two checkpoints, same family)
    _open_tab(page, "Merge")
    assert page.input_value("#sdtoolkit_merge_a input") != page.input_value("#sdtoolkit_merge_b input")
    assert not page.locator("#sdtoolkit_merge_c").is_visible()          # weighted_sum takes no C
    assert "A*(1-M) + B*M" in page.inner_text("#sdtoolkit_merge_formula")
    page.click("#sdtoolkit_merge_run")
    page.wait_for_selector("#sdtoolkit_merge_status .sdtoolkit-ok")
    merged = page.inner_text("#sdtoolkit_merge_status b").strip()
    assert merged.endswith(".safetensors") and (root / "Stable-diffusion" / merged).is_file()
    page.wait_for_timeout(500)                                        # the refresh follows the merge event
    assert merged in _options(page, "sdtoolkit_merge_a")               # no Refresh click

    # prune: the default picker is the trainer's fp32 + EMA fine-tune
    _open_tab(page, "Prune & inspect")
    assert merged in " ".join(_options(page, "sdtoolkit_prune_model"))
    page.click("#sdtoolkit_prune_run")
    page.wait_for_selector("#sdtoolkit_prune_status .sdtoolkit-ok")
    assert "Wrote" in page.inner_text("#sdtoolkit_prune_status")

    # hashes of the first model offered, then dedup (kind vae: the VAE and its byte copy)
    _open_tab(page, "Hashes & dedup")
    _choose_first(page, "sdtoolkit_hashes_files")
    page.click("#sdtoolkit_hashes_run")
    page.wait_for_selector("#sdtoolkit_hashes_status .sdtoolkit-ok")
    assert len(_body_cells(page, "sdtoolkit_hashes_table")) >= 8
    page.click("#sdtoolkit_dedup_scan")
    page.wait_for_selector("#sdtoolkit_dedup_status .sdtoolkit-ok")
    cells = " ".join(_body_cells(page, "sdtoolkit_dedup_table"))
    assert "vae-tiny-copy.safetensors" in cells and "1 duplicate groups" in page.inner_text("#sdtoolkit_dedup_status")
    assert "vae-tiny.safetensors" in page.inner_text("#sdtoolkit_dedup_keep")   # the kept copy, changeable

    # LoRA inspect: the picker was filled on load
    _open_tab(page, "LoRA tools")
    page.click("#sdtoolkit_lora_inspect_btn")
    page.wait_for_selector("#sdtoolkit_lora_inspect_tab .sdtoolkit-lora-inspect table.sdtoolkit-lora-blocks")
    assert "error" not in page.inner_text("#sdtoolkit_lora_inspect_tab").lower()

    # Tiled VAE: encode the sample image, then decode the latent it gave
    _open_tab(page, "Tiled VAE")
    page.locator("#sdtoolkit_tab_tiled_vae div.tab-nav button", has_text="Encode").first.click()
    page.click("#sdtoolkit_tiled_vae_encode")
    page.wait_for_selector("#sdtoolkit_tiled_vae_encode_report:has-text('latent')")
    page.locator("#sdtoolkit_tab_tiled_vae div.tab-nav button", has_text="Decode").first.click()
    page.click("#sdtoolkit_tiled_vae_decode")
    got = np.asarray(_image_of(page, "#sdtoolkit_tiled_vae_out_tiled"), dtype=np.float64)
    want = np.asarray(Image.open(root / NAMES["image"]).convert("RGB"), dtype=np.float64)
    assert got.shape == want.shape
    psnr = 10 * np.log10(255.0 ** 2 / ((got - want) ** 2).mean())
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert psnr > 20 and corr > 0.9, (psnr, corr)

    # ControlNet: the default preprocessor on the sample image
    _open_tab(page, "ControlNet")
    page.click("#sdtoolkit_cn_run")
    edges = np.asarray(_image_of(page, "#sdtoolkit_cn_map").convert("L"))
    assert edges.max() > 0 and edges.min() == 0                       # a canny map of the drawn edges
    page.wait_for_timeout(300)
    assert PAGE_ERRORS == []


def test_lora_block_weight_editor_gives_prompt_text_and_bakes_with_it(page, app_url):
    """Issue 15 item 4 for LoRA ``lbw``, with clicks only: the Block weights section reads the sample LoRA's
    architecture (SD1), a click on lora-block-weight's MIDD preset fills the per-block table and the chart (block
    names, BASE apart) and gives ``<lora:...:lbw=MIDD>`` prompt text that the WebUI's parser reads back to the
    table's weights; "Add to the Bake list" and Bake write a checkpoint whose bake record carries the lbw."""
    import json

    from lib_sdtoolkit.files import open_model
    from lib_sdtoolkit.lora import syntax
    from lib_sdtoolkit.lora.blocks import resolve_block_weights
    from lib_sdtoolkit.samples.library import NAMES

    root = APP["root"]
    assert (root / NAMES["lora"]).is_file(), "the inspect flow test creates the sample library first"
    page.goto(app_url)
    page.wait_for_function(
        "() => { const i = document.querySelector('#sdtoolkit_lora_lbw_file input'); return i && i.value; }")
    _open_tab(page, "LoRA tools")
    page.locator("#sdtoolkit_tab_lora div.tab-nav button", has_text="Block weights").first.click()
    page.wait_for_selector("#sdtoolkit_lora_lbw_msg:has-text('SD1 (read from the LoRA)')")

    page.click("#sdtoolkit_lora_lbw_preset input")
    page.locator("ul.options li", has_text="MIDD").first.click()
    page.wait_for_function("() => document.querySelector('#sdtoolkit_lora_lbw_tag textarea').value"
                           ".includes('lbw=MIDD')")
    tag = page.input_value("#sdtoolkit_lora_lbw_tag textarea")
    assert tag == "<lora:sample-lora-sd15:1:lbw=MIDD>", tag
    assert page.input_value("#sdtoolkit_lora_lbw_sdt_tag textarea") == "<sdtlora:sample-lora-sd15:1:lbw=MIDD>"
    _, reqs = syntax.parse_prompt(f"a cat {tag}")
    want = resolve_block_weights(reqs[0].lbw, "SD1")
    page.wait_for_function("() => document.querySelectorAll('#sdtoolkit_lora_lbw_table tbody tr').length == 26")
    cells = _body_cells(page, "sdtoolkit_lora_lbw_table")
    table = {cells[i]: float(cells[i + 1]) for i in range(0, len(cells), 2)}
    assert table == want and table["M00"] == 1 and table["IN01"] == 0
    labels = page.locator("#sdtoolkit_lora_lbw_chart svg text.sdtoolkit-chart-label").all_text_contents()
    assert labels[0] == "BASE" and "OUT11" in labels and len(labels) == 26
    assert page.locator("#sdtoolkit_lora_lbw_msg .sdtoolkit-warn").count() == 0

    page.click("#sdtoolkit_lora_lbw_to_bake")
    page.wait_for_function("() => document.querySelector('#sdtoolkit_lora_bake_list textarea').value"
                           ".includes('lbw=MIDD')")
    page.locator("#sdtoolkit_tab_lora div.tab-nav button", has_text="Bake").first.click()
    assert page.input_value("#sdtoolkit_lora_bake_list textarea") == f"{NAMES['lora'].split('/', 1)[1]}:1:lbw=MIDD"
    page.click("#sdtoolkit_lora_bake_ckpt input")
    page.locator("ul.options li", has_text="sd15-tiny").first.click()
    page.keyboard.press("Escape")
    page.click("#sdtoolkit_lora_bake_btn")
    page.wait_for_selector("#sdtoolkit_lora_bake_result .sdtoolkit-ok")
    assert "lbw=MIDD" in page.inner_text("#sdtoolkit_lora_bake_result")
    with open_model(root / "Stable-diffusion" / "baked.safetensors") as r:
        record = json.loads(r.metadata["sdtoolkit_lora_bake"])
    assert record == [{"lora": "sample-lora-sd15.safetensors", "multiplier": 1.0, "lbw": "MIDD"}]
    page.wait_for_timeout(300)
    assert PAGE_ERRORS == []
