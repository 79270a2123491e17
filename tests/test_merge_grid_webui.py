"""The merge XY grid (scripts/sdtoolkit_merge_grid.py, lib_sdtoolkit/merge/grid.py) through the WebUI double: a
loaded ``sd_model`` of real tiny modules (ldm UNetModel, ldm-layout AutoencoderKL, transformers CLIPTextModel)
loaded from checkpoint A and hijacked as the WebUI does; generations run ``processing.process_images`` with a small
deterministic sampler (the double has none). Every expectation is computed independently: each cell's image is
compared with the image the WebUI makes after loading the file that ``merge_files`` writes for the cell's recipe;
the loaded model is compared tensor by tensor with a snapshot taken before."""
from __future__ import annotations

import base64
import ctypes
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(DOUBLE) not in sys.path:
    sys.path.append(str(DOUBLE))

from lib_sdtoolkit.errors import InvalidInputError, SdToolkitError  # noqa: E402
from lib_sdtoolkit.merge import grid as sdt_grid  # noqa: E402
from sd1_webui_model import load_sd1  # noqa: E402  (the loaded SD1 sd_model, shared with test_merge_webui)
from sd1_webui_model import plain_state as _plain_state  # noqa: E402

TITLE = "SD Toolkit merge XY grid"
IN04 = "model.diffusion_model.input_blocks.4."


# ----------------------------------------------------------------------------------------- the generation
def _sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
    """A two-step sampler: noise from the seed, the UNet with the prompt's conditioning (CFG 2 with the negative)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(int(seeds[0])))
    unet = self.sd_model.model.diffusion_model
    for t in (900, 400):
        ts = torch.tensor([t])
        eps_c = unet(x, ts, context=conditioning)
        eps_u = unet(x, ts, context=unconditional_conditioning)
        x = x - 0.3 * (eps_u + 2.0 * (eps_c - eps_u))
    return x


def _assert_same_state(model, before: Dict[str, torch.Tensor]) -> None:
    now = _plain_state(model)
    assert now.keys() == before.keys()
    bad = [k for k, v in now.items() if not torch.equal(v, before[k])]
    assert not bad, f"{len(bad)} tensors differ from before the grid (first: {bad[0]})"


def _png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _script_module():
    from modules import scripts

    mods = [d.module for d in scripts.scripts_data if os.path.basename(d.path) == "sdtoolkit_merge_grid.py"]
    assert mods
    return mods[0]


# ----------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path_factory.mktemp("sdt-cache")))
    from lib_sdtoolkit.samples import factory

    data = tmp_path_factory.mktemp("webui_grid_data")
    ck = data / "models" / "Stable-diffusion"
    ck.mkdir(parents=True)
    paths = {n: factory.write_checkpoint(ck / f"{n}.safetensors", "SD1", seed=s) for n, s in
             (("A", 1), ("B", 2), ("C", 3))}

    from webui_harness import WebUIDouble

    w = WebUIDouble(str(ROOT), str(data))
    w.preload([])
    w.load_scripts()
    assert w.reported_errors == []
    from modules import processing, sd_models, shared

    sd_models.list_models()
    model, _ = load_sd1(paths["A"], half=False)
    old_model = shared.sd_model
    shared.sd_model = model
    mp.setattr(processing.StableDiffusionProcessingTxt2Img, "sample", _sample, raising=False)
    app = w.start_app(None, api=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield dict(w=w, model=model, paths=paths, ck=ck, data=data, client=TestClient(app), tmp=tmp_path_factory)
    torch.set_num_threads(n)
    shared.sd_model = old_model
    shared.state.interrupted = False
    mp.undo()
    from modules import script_callbacks

    script_callbacks.clear_callbacks()


def _reference_images(env, paths: List[Path], seed: int, prompt: str) -> List[torch.Tensor]:
    """What the WebUI generates after loading each checkpoint file of ``paths`` in turn (then A is loaded again,
    once: reloading A between two files cost a third of the 3x2 grid test). Every file must hold every key of A, so
    each load replaces the whole model and no value of the file before can leak into the next image."""
    from safetensors import safe_open

    from modules import processing, sd_models

    model = env["model"]
    with safe_open(str(env["paths"]["A"]), "pt") as f:
        a_keys = set(f.keys())
    out = []
    try:
        for path in paths:
            with safe_open(str(path), "pt") as f:
                assert set(f.keys()) == a_keys, path
            sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(path)))
            p = processing.StableDiffusionProcessingTxt2Img(model, None, (), prompt=prompt, negative_prompt="blur",
                                                           seed=seed, steps=2)
            out.append(processing.process_images(p).images[0])
    finally:
        sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(env["paths"]["A"])))
    return out


def _txt2img(env, script_args: List[Any], seed: int = 7, prompt: str = "a red cat"):
    return env["client"].post("/sdapi/v1/txt2img", json={
        "prompt": prompt, "negative_prompt": "blur", "seed": seed, "steps": 2, "script_name": TITLE,
        "script_args": script_args})


# ----------------------------------------------------------------------------------------- axis syntax
@pytest.mark.parametrize("kind,text,want", [
    ("alpha", "0.2, 0.4,0.6", [0.2, 0.4, 0.6]),
    ("alpha", "0.2-0.8 [4]", [0.2, 0.4, 0.6, 0.8]),
    ("alpha", "0.2-0.8 (+0.2)", [0.2, 0.4, 0.6, 0.8]),
    ("alpha", "1-0 [3]", [1.0, 0.5, 0.0]),
    ("alpha", "0, 0.5-1 [3]", [0.0, 0.5, 0.75, 1.0]),
    ("beta", "-0.2-0.2 [3]", [-0.2, 0.0, 0.2]),
    ("seed", "1-4, 10", [1, 2, 3, 4, 10]),
    ("seed", "5-20 [4]", [5, 10, 15, 20]),
    ("preset", "GRAD_V, FLAT_25", ["GRAD_V", "FLAT_25"]),
    ("method", "weighted_sum, add_difference", ["weighted_sum", "add_difference"]),
])
def test_axis_values(kind, text, want):
    assert sdt_grid.parse_axis(kind, text).values == want


@pytest.mark.parametrize("kind,text,block,msg", [
    ("alpha", "0.2-0.8 (4)", None, "must be signed"),
    ("alpha", "0.2-0.8 [0]", None, "whole number >= 1"),
    ("alpha", "0.8-0.2 (+0.1)", None, "never reaches"),
    ("alpha", "half", None, "'half' is not a number"),
    ("alpha", " , ", None, "no values given"),
    ("seed", "1.5", None, "whole numbers"),
    ("preset", "NOPE", None, "unknown preset"),
    ("method", "avg", None, "unknown merge method"),
    ("colour", "1", None, "unknown axis"),
    ("block", "0,1", "", "name the block"),
])
def test_axis_errors(kind, text, block, msg):
    with pytest.raises(InvalidInputError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        sdt_grid.parse_axis(kind, text, block)


# ----------------------------------------------------------------------------------------- the grid
def test_grid_3x2_equals_file_merges_and_restores_the_model(env, tmp_path):
    """X: IN04's ratio 0 / 0.5 / 1, Y: alpha 0.3 / 0.6 (weighted sum A+B) -> six cells, through the WebUI's API
    with the script selected in txt2img's Script dropdown."""
    from PIL import Image

    from lib_sdtoolkit.merge.engine import merge_files

    model = env["model"]
    before = _plain_state(model)
    r = _txt2img(env, ["B.safetensors", "None", "weighted_sum", 0.5, "", "Block ratio", "0-1 [3]", "IN04",
                       "Alpha", "0.3, 0.6", "IN04", 0])
    assert r.status_code == 200, r.text
    assert env["w"].reported_errors == []
    _assert_same_state(model, before)                                  # bit-identical afterwards

    pngs = [_png(b) for b in r.json()["images"]]
    assert len(pngs) == 1 + 6                                           # the grid, then every cell
    cells = _script_module()._last["cells"]
    assert [(c.col, c.row, c.x, c.y) for c in cells] == [(i % 3, i // 3, [0.0, 0.5, 1.0][i % 3], [0.3, 0.6][i // 3])
                                                       for i in range(6)]
    # each cell = the WebUI's image after loading the file merge of the cell's recipe (tensors and PNG pixels)
    files = []
    for c in cells:
        assert c.recipe.model_a == str(env["paths"]["A"]) and c.recipe.dtype == "fp32"
        files.append(merge_files(c.recipe, tmp_path / f"cell{c.index}.safetensors").output)
    refs = _reference_images(env, files, 7, "a red cat")
    for c, ref in zip(cells, refs, strict=True):
        assert torch.equal(c.result["image"], ref), c.index
        assert list(pngs[1 + c.index].getdata()) == list(_script_module()._to_pil(ref).getdata())
        # the infotext carries the recipe (quoted as the WebUI quotes a value holding commas), models by name
        rec = json.loads(json.loads(c.result["infotext"].split("SD Toolkit merge: ", 1)[1]))
        assert rec == dict(c.recipe.to_dict(), model_a="A.safetensors", model_b="B.safetensors")
        assert rec["alpha"] == c.y and rec["blocks"][5] == c.x              # BASE, IN00..IN04: IN04 is 6th
    # the cells' images differ where the merge differs (the grid is not one image six times)
    assert not torch.equal(cells[0].result["image"], cells[2].result["image"])
    assert not torch.equal(cells[0].result["image"], cells[3].result["image"])

    # the grid: 3 columns, 2 rows of 64 px cells, labels above and left (draw_grid_annotations' bands)
    grid = pngs[0]
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    pad_left, pad_top = grid.width - 3 * 64, grid.height - 2 * 64
    for c in cells:
        box = (pad_left + 64 * c.col, pad_top + 64 * c.row, pad_left + 64 * (c.col + 1), pad_top + 64 * (c.row + 1))
        assert list(grid.crop(box).getdata()) == list(pngs[1 + c.index].getdata()), c.index
    band = grid.crop((pad_left, 0, grid.width, pad_top))
    assert band.getcolors(1 << 16) and len(band.getcolors(1 << 16)) > 1   # text drawn on the white band
    assert isinstance(grid, Image.Image)
    _assert_same_state(model, before)                                  # the reference loads left A loaded


def test_only_changed_keys_are_rewritten(env):
    """First cell: every key the merge writes; along the IN04 axis only IN04's keys; a new row (alpha changes)
    every merged key again; a seed axis: nothing after the first cell."""
    cells = _script_module()._last["cells"]
    model_keys = set(_plain_state(env["model"]))
    from safetensors import safe_open

    with safe_open(str(env["paths"]["A"]), "pt") as f:
        floats = {k for k in f.keys() if k in model_keys and f.get_slice(k).get_dtype().startswith(("F", "BF"))}
    floats = {k for k in floats if not k.endswith("position_ids")}
    in04 = {k for k in floats if k.startswith(IN04)}
    assert in04 and set(cells[0].written) >= floats
    assert set(cells[1].written) == in04 and set(cells[2].written) == in04
    assert set(cells[3].written) >= floats - {k for k in floats if k.startswith("model_ema")}
    assert set(cells[4].written) == in04 and set(cells[5].written) == in04

    before = _plain_state(env["model"])
    r = _txt2img(env, ["B.safetensors", "None", "weighted_sum", 0.4, "", "Seed", "3, 4, 5", "IN04", "Nothing",
                       "", "IN04", 0])
    assert r.status_code == 200, r.text
    seeds = _script_module()._last["cells"]
    assert [c.seed for c in seeds] == [3, 4, 5]
    assert seeds[0].keys_written >= len(floats) and [c.keys_written for c in seeds[1:]] == [0, 0]
    assert not torch.equal(seeds[0].result["image"], seeds[1].result["image"])
    _assert_same_state(env["model"], before)


def test_save_cell_as_file_equals_the_file_merge_byte_for_byte(env, tmp_path):
    from lib_sdtoolkit.merge.engine import merge_files

    r = _txt2img(env, ["B.safetensors", "C.safetensors", "add_difference", 0.5, "", "Alpha", "0.25-0.75 [2]", "IN04",
                       "Preset", "GRAD_V, FLAT_75", "IN04", 4])
    assert r.status_code == 200, r.text
    c = env["client"]
    listed = c.get("/sdtoolkit/v1/merge/grid").json()
    assert listed["supported"] and [x["cell"] for x in listed["cells"]] == [1, 2, 3, 4]
    assert listed["cells"][3]["recipe"]["preset"] == "FLAT_75" and listed["cells"][3]["recipe"]["model_c"] == \
        "C.safetensors"
    r = c.post("/sdtoolkit/v1/merge/grid/save", json={"cell": 4, "output": "grid_cell4"})
    assert r.status_code == 200, r.text
    saved = env["ck"] / "grid_cell4.safetensors"
    assert saved.is_file() and r.json()["output"] == str(saved)
    cell = _script_module()._last["cells"][3]
    ref = tmp_path / "grid_cell4.safetensors"                         # same stem: same custom_name
    merge_files(cell.recipe, ref)
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(ref.read_bytes()).digest()

    assert c.post("/sdtoolkit/v1/merge/grid/save", json={"cell": 9}).status_code == 422
    assert c.post("/sdtoolkit/v1/merge/grid/save", json={"cell": 1, "bogus": 1}).status_code == 422
    r = c.post("/sdtoolkit/v1/merge/grid/save", json={"cell": 4, "output": "grid_cell4"})
    assert r.status_code == 409                                       # never overwritten unless asked


def test_a_bad_cell_stops_the_grid_before_any_write(env):
    """add_difference needs model C: refused with the cell named, nothing merged, nothing generated."""
    from modules import scripts

    model = env["model"]
    before = _plain_state(model)
    mod = _script_module()
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(model, scripts.scripts_txt2img, (), prompt="x", seed=1, steps=2)
    calls = []
    p.sample = lambda *a, **k: calls.append(1)
    with pytest.raises(InvalidInputError, match=r"cell 2 \(method: add_difference\).*3 models"):
        mod.run_merge_grid(p, "B.safetensors", "None", "weighted_sum", 0.5, "", "Method",
                           "weighted_sum, add_difference", "IN04", "Nothing", "", "IN04")
    with pytest.raises(InvalidInputError, match="not a merge block of SD1"):
        mod.run_merge_grid(p, "B.safetensors", "None", "weighted_sum", 0.5, "", "Block ratio", "0, 1", "IN13",
                           "Nothing", "", "IN04")
    with pytest.raises(SdToolkitError, match="missing.safetensors: no such model file"):
        mod.run_merge_grid(p, "missing.safetensors", "None", "weighted_sum", 0.5, "", "Alpha", "0, 1", "IN04",
                           "Nothing", "", "IN04")
    assert calls == []
    _assert_same_state(model, before)


def test_model_c_gone_mid_grid_error_restores_the_model(env):
    """Model C disappears after the first cell (the next cell cannot open it): a clear error naming the file, and
    the loaded model is restored from A."""
    from modules import processing, scripts

    model = env["model"]
    before = _plain_state(model)
    mod = _script_module()
    c_path = env["paths"]["C"]
    moved = c_path.with_suffix(".moved")
    p = processing.StableDiffusionProcessingTxt2Img(model, scripts.scripts_txt2img, (), prompt="x", seed=1, steps=2)
    seen = []

    def sample(*a, **k):
        seen.append(_plain_state(model)["model.diffusion_model.out.2.weight"])
        if len(seen) == 1:
            os.replace(c_path, moved)
        return _sample(p, *a, **k)

    p.sample = sample
    try:
        with pytest.raises(SdToolkitError, match="C.safetensors"):
            mod.run_merge_grid(p, "B.safetensors", "C.safetensors", "add_difference", 0.5, "", "Alpha",
                               "0.2, 0.4, 0.6", "IN04", "Nothing", "", "IN04")
    finally:
        os.replace(moved, c_path)
    assert len(seen) == 1 and not torch.equal(seen[0], before["model.diffusion_model.out.2.weight"])
    _assert_same_state(model, before)


def test_interrupt_stops_after_the_current_cell_and_restores(env):
    from modules import processing, scripts, shared

    model = env["model"]
    before = _plain_state(model)
    mod = _script_module()
    p = processing.StableDiffusionProcessingTxt2Img(model, scripts.scripts_txt2img, (), prompt="x", seed=1, steps=2)
    n = []

    def sample(*a, **k):
        n.append(1)
        if len(n) == 2:
            shared.state.interrupted = True                              # the Interrupt button during cell 2
        return _sample(p, *a, **k)

    p.sample = sample
    try:
        res = mod.run_merge_grid(p, "B.safetensors", "None", "weighted_sum", 0.5, "", "Alpha", "0.1-0.9 [3]",
                                 "IN04", "Seed", "1, 2", "IN04")
    finally:
        shared.state.interrupted = False
    assert len(n) == 2 and len(res.images) == 1 + 2                    # the grid (empty spots) and two cells
    assert "2 of 6 cells (interrupted)" in res.infotexts[0]
    _assert_same_state(model, before)


def test_grid_over_an_in_memory_merge_restores_that_merge(env):
    """The loaded model holds an in-memory merge (Merge tab): the grid restores the merge, not file A."""
    c, model = env["client"], env["model"]
    r = c.post("/sdtoolkit/v1/merge", json=dict(model_a="A", model_b="C", alpha=0.7, in_memory=True, dtype="fp32"))
    assert r.status_code == 200, r.text
    try:
        merged = _plain_state(model)
        r = _txt2img(env, ["B.safetensors", "None", "weighted_sum", 0.5, "", "Alpha", "0.5, 1", "IN04", "Nothing",
                           "", "IN04", 0])
        assert r.status_code == 200, r.text
        _assert_same_state(model, merged)
        assert c.get("/sdtoolkit/v1/merge/current").json()["current_merge"]["sha256"]
    finally:
        assert c.post("/sdtoolkit/v1/merge/restore-loaded").status_code == 200


# ----------------------------------------------------------------------------------------- memory
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not got back, all threads and arenas (glibc mallinfo2: uordblks + hblkhd).
    torch's CPU allocator takes every tensor's memory from malloc, so this counts live tensor bytes exactly at the
    moment of the call (RSS would also count freed pages malloc keeps, and file pages)."""
    libc = ctypes.CDLL("libc.so.6")
    f = libc.mallinfo2
    f.restype = _Mallinfo2
    m = f()
    return m.uordblks + m.hblkhd


def test_peak_memory_stays_within_one_layer(env):
    """Measured at every merged key (the merge's progress callback runs in the grid's thread after each key is
    copied into the model, with the next keys in flight) and around each generation: the heap in use never grows by
    more than a few times the largest tensor (float32 copies of A's and B's tensor and the result) over the level
    before the grid. A second copy of the model would add its full size (~35 MB here, 9x the bound)."""
    try:
        _heap_in_use()
    except (OSError, AttributeError):
        pytest.skip("glibc mallinfo2 is not available here")
    import gc

    from lib_sdtoolkit.merge.recipe import MergeRecipe

    model = env["model"]
    before = _plain_state(model)
    paths = env["paths"]
    largest = max(v.numel() for v in before.values()) * 4
    sizes = {k: v.numel() for k, v in before.items()}
    model_bytes = sum(v.numel() * v.element_size() for v in before.values())
    base = MergeRecipe(str(paths["A"]), str(paths["B"]), dtype="fp32")
    x = sdt_grid.parse_axis("alpha", "0.2, 0.5")
    y = sdt_grid.parse_axis("block", "0, 1", "OUT04")
    cells = sdt_grid.plan_cells(base, x, y, "SD1")
    hooks = _script_module()._grid_hooks()
    del before
    gc.collect()
    base_level = _heap_in_use()
    peak = [0]
    samples = [0]

    def sample(*_a):
        samples[0] += 1
        peak[0] = max(peak[0], _heap_in_use() - base_level)

    # mallinfo2 walks every free chunk of every arena: late in the suite (a heap of 1.5 GB in 13,500 free chunks)
    # one call took 5 ms, and a call at each of the 4 x 1,131 merged keys 23 s. So the heap is read after every
    # key of at least 1/16 of the largest tensor (where fp32 copies of a layer are in flight) and after every 8th
    # key besides: a second copy of the model, or fp32 copies kept from key to key, would show at any of them.
    big = {k for k, n in sizes.items() if n * 16 >= max(sizes.values())}
    calls = [0]
    big_seen = [0]

    def merged(_done, _total, key):
        calls[0] += 1
        big_seen[0] += key in big
        if key in big or calls[0] % 8 == 0:
            sample()

    res = sdt_grid.run_grid(model, cells, lambda c: sample() or True, x=x, y=y, family="SD1",
                            original_file=str(paths["A"]), hooks=hooks, workers=1,
                            merge_progress=merged)
    sample()
    assert len(res.done) == 4 and res.restored_keys > 0
    bound = 4 * largest + (1 << 20)
    assert model_bytes > 8 * bound                                   # a copy of the model could not pass
    assert big_seen[0] >= len(big) > 20, (big_seen[0], len(big))  # every large key was sampled at least once
    print(f"peak heap growth {peak[0]} B over {samples[0]} samples ({calls[0]} merged keys), bound {bound} B, "
          f"largest tensor (fp32) {largest} B, model {model_bytes} B")
    assert peak[0] <= bound, (peak[0], bound)


@pytest.mark.parametrize("flavour", ["forge201", "neo"])
def test_forge_says_the_grid_is_unavailable(flavour):
    """Forge changes weights through its patchers (the Merge tab's in-memory merge is not offered there): the
    script shows why in its UI and refuses to run with that message, touching nothing."""
    import gradio as gr

    from webui_harness import unuse_forge, use_forge

    use_forge(flavour)
    try:
        from modules import script_callbacks, script_loading

        mod = script_loading.load_module(str(ROOT / "scripts" / "sdtoolkit_merge_grid.py"))
        try:
            assert mod.IS_FORGE
            with gr.Blocks() as demo:
                mod.SdToolkitMergeGridScript().ui(False)
            notes = [c["props"].get("value", "") for c in demo.get_config_file()["components"]
                     if c.get("type") == "html"]
            assert any("not available on Forge" in n for n in notes), notes
            with pytest.raises(InvalidInputError, match="not available on Forge: Forge's patchers own"):
                mod.run_merge_grid(object(), "B", "None", "weighted_sum", 0.5, "", "Alpha", "0, 1", "IN04",
                                   "Nothing", "", "IN04")
        finally:
            script_callbacks.remove_callbacks_for_function(mod.on_app_started)
    finally:
        unuse_forge()
