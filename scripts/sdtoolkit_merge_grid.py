"""WebUI adapter: "SD Toolkit merge XY grid", a txt2img script in the Script dropdown (beside X/Y/Z plot).

Each cell merges a recipe (the loaded checkpoint as model A, model B / C picked here, the method and ratios, then the
two axes' values) into the loaded model in memory (lib_sdtoolkit.merge.grid: no file, only the keys whose inputs
changed since the previous cell rewritten), generates the image with the prompt and seed of the txt2img tab (a
``seed`` axis varies it), and the grid is drawn with labelled axes by the WebUI's own ``modules.images`` functions,
as the X/Y/Z plot draws it. The loaded model is restored bit for bit afterwards, also on Interrupt or an error.

Every cell's infotext carries its recipe (``SD Toolkit merge: {...}``); the cells of the last grid can be written
to a checkpoint file through the ``merge`` job (byte-identical to merging that recipe to a file): the "Save cell as
file" button below the axes, or ``POST /sdtoolkit/v1/merge/grid/save`` ``{"cell": N, "output": "name"}`` (N from
1, row by row); ``GET /sdtoolkit/v1/merge/grid`` lists them.

Forge: unavailable. Forge's patchers own the loaded model's weights (the in-memory merge of the Merge tab is not
offered there either); the script says so instead of running.
"""
import importlib.util
import json
import os
import random
import threading
from copy import copy

import gradio as gr
from modules import images, processing, script_callbacks, scripts, shared

from lib_sdtoolkit import jobs
from lib_sdtoolkit.errors import InvalidInputError, SdToolkitError
from lib_sdtoolkit.merge import grid as sdt_grid
from lib_sdtoolkit.merge import methods as sdt_methods
from lib_sdtoolkit.plugins import load_file_module

_glue = load_file_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdtoolkit_webui_host.py"),
                         "sdtoolkit_webui_host")

IS_FORGE = importlib.util.find_spec("modules_forge") is not None
TITLE = "SD Toolkit merge XY grid"
FORGE_NOTE = ("The merge XY grid is not available on Forge: Forge's patchers own the loaded model's weights, so a "
              "merge cannot be written into it in place (the Merge tab's in-memory merge is not offered there "
              "either). Merge to files in the SD Toolkit tab and compare them with the X/Y/Z plot's Checkpoint name "
              "axis instead.")
INFOTEXT_KEY = "SD Toolkit merge"
NOTHING = "Nothing"
AXIS_CHOICES = [sdt_grid.AXIS_LABELS[k] for k in sdt_grid.AXIS_KINDS]
_KIND_BY_LABEL = {v: k for k, v in sdt_grid.AXIS_LABELS.items()}
BLOCK_CHOICES = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]

#: the last grid's cells (adapter state, for "save cell N"): {"cells": [...], "names": {path: display name}}
_last = {"cells": [], "names": {}}
_lock = threading.Lock()


def _host():
    return _glue.make_host()


def _checkpoint_names():
    try:
        host = _host()
        return [host.display_name(p, "checkpoint") for p in host.list_models("checkpoint")]
    except Exception:
        return []


def _forget_lora_backups(model, keys):
    """The Lora extension keeps per-module weight backups and the names of the networks it patched in: for modules
    whose weights were rewritten they are stale (it would restore old weights or skip patching the new ones)."""
    for prefix in {k.rsplit(".", 1)[0] for k in keys}:
        try:
            m = model.get_submodule(prefix)
        except AttributeError:
            continue
        if hasattr(m, "network_current_names"):
            m.network_current_names, m.network_weights_backup, m.network_bias_backup = (), None, None


def _grid_hooks():
    """Writes happen inside a generation (the queue lock is already held): only the hijack is undone and redone."""
    from modules import sd_hijack

    def begin(model):
        sd_hijack.model_hijack.undo_hijack(model)

    def end(model, keys):
        try:
            _forget_lora_backups(model, keys)
        finally:
            sd_hijack.model_hijack.hijack(model)

    return sdt_grid.GridHooks(begin_write=begin, end_write=end)


def _to_pil(img):
    """A generated image as PIL (the WebUI's Processed.images are PIL; a decoded sample tensor (C, H, W in [-1, 1]) is
    converted as processing does: clamp((x + 1) / 2), * 255, uint8)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img
    import numpy as np
    import torch

    x = torch.clamp((img.detach().float().cpu() + 1.0) / 2.0, min=0.0, max=1.0)
    arr = (255.0 * np.moveaxis(x.numpy(), 0, 2)).astype(np.uint8)
    return Image.fromarray(arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, 0])


def _quote(text):
    """An infotext value as the WebUI writes one (infotext_utils.quote: JSON-quoted when it holds , : or ")."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _fixed_seed(seed):
    """processing.fix_seed's rule: -1 / empty -> a random seed, fixed for the whole grid."""
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        seed = -1
    return int(random.randrange(4294967294)) if seed == -1 else seed


def _axis(label, values, block):
    if not label or label == NOTHING:
        return None
    kind = _KIND_BY_LABEL.get(label, label)
    return sdt_grid.parse_axis(kind, values or "", block)


def _model_dtype(model):
    """fp16 / bf16 / fp32: the dtype of the loaded UNet's weights (the WebUI loads fp16 unless --no-half)."""
    import torch

    unet = getattr(getattr(model, "model", None), "diffusion_model", None) or model
    for t in unet.parameters():
        if t.is_floating_point():
            return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(t.dtype, "fp16")
    return "fp16"


def build_grid(host, model, hooks, model_b, model_c, method, alpha, beta, x_axis, y_axis):
    """The base recipe (A = the loaded checkpoint, B/C resolved through the host's gate), the cells, and what the
    restore needs (the loaded file, the live merge's recipe)."""
    from lib_sdtoolkit.merge.live import current_merge
    from lib_sdtoolkit.merge.recipe import MergeRecipe

    original = hooks.checkpoint_file(model)
    if not original:
        raise InvalidInputError("the loaded model's checkpoint file is unknown; load a checkpoint first")
    live = current_merge(hooks, model)
    if not model_b or model_b == "None":
        raise InvalidInputError("merge grid: pick model B")
    b = str(host.resolve_input(model_b, "checkpoint"))
    c = str(host.resolve_input(model_c, "checkpoint")) if model_c and model_c != "None" else None
    beta = None if beta in (None, "") else float(beta)
    # the recorded recipe's dtype is the loaded model's: a cell saved as a file holds the weights the cell showed
    base = MergeRecipe(model_a=str(original), model_b=b, model_c=c, method=method or "weighted_sum",
                       alpha=float(alpha), beta=beta, device=host.compute_device(None), dtype=_model_dtype(model))
    family = sdt_grid._family(base.model_a)
    cells = sdt_grid.plan_cells(base, x_axis, y_axis, family)
    names = {p: host.display_name(p, "checkpoint") for p in {str(original), b, c} if p}
    return cells, family, str(original), (live.recipe if live is not None else None), names


def run_merge_grid(p, model_b, model_c, method, alpha, beta, x_type, x_values, x_block, y_type, y_values, y_block,
                   margin=0):
    """The script's work (a function, so tests and the API's script_args run the same code)."""
    if IS_FORGE:
        raise InvalidInputError(FORGE_NOTE)
    from lib_sdtoolkit.merge.live import _model_lock

    hooks = _glue.model_hooks()
    model = hooks.get_model() if hooks is not None else None
    if model is None:
        raise InvalidInputError("no model is loaded; load a checkpoint first")
    host = _host()
    x_axis = _axis(x_type, x_values, x_block)
    if x_axis is None:
        raise InvalidInputError("merge grid: pick the X axis")
    y_axis = _axis(y_type, y_values, y_block)
    cells, family, original, live_recipe, names = build_grid(host, model, hooks, model_b, model_c, method, alpha,
                                                             beta, x_axis, y_axis)
    sdt_grid.check_restorable(_plain_keys(model), cells, original, live_recipe)
    p.seed = _fixed_seed(p.seed)
    state = getattr(shared, "state", None)
    if state is not None:
        state.job_count = len(cells)

    def generate(cell):
        pc = copy(p)
        pc.extra_generation_params = dict(getattr(p, "extra_generation_params", {}) or {})
        pc.extra_generation_params[INFOTEXT_KEY] = cell.recipe_json(names)
        if cell.seed is not None:
            pc.seed = cell.seed
        if state is not None:
            state.job = f"merge grid cell {cell.index + 1} of {len(cells)}"
            state.job_no = cell.index
        res = processing.process_images(pc)
        if not res.images:
            raise SdToolkitError(f"cell {cell.index + 1}: the generation returned no image")
        info = (getattr(res, "infotexts", None) or [getattr(res, "info", "")])[0] or ""
        if f"{INFOTEXT_KEY}:" not in info:
            info = (info + ", " if info else "") + f"{INFOTEXT_KEY}: {_quote(cell.recipe_json(names))}"
        return {"image": res.images[0], "infotext": info, "processed": res}

    lock = _model_lock(model)
    if not lock.acquire(blocking=False):
        raise InvalidInputError("a merge into the loaded model is running; wait for it to finish")
    try:
        result = sdt_grid.run_grid(
            model, cells, generate, x=x_axis, y=y_axis, family=family, original_file=original,
            live_recipe=live_recipe, hooks=_grid_hooks(),
            interrupted=lambda: bool(getattr(state, "interrupted", False)))
    finally:
        lock.release()
    with _lock:
        _last["cells"], _last["names"] = list(result.done), dict(names)
    return assemble(p, result, names, margin)


def _plain_keys(model):
    """The loaded model's checkpoint keys (its hijack undone for the read, as the WebUI loads weights)."""
    from modules import sd_hijack

    sd_hijack.model_hijack.undo_hijack(model)
    try:
        return list(model.state_dict().keys())
    finally:
        sd_hijack.model_hijack.hijack(model)


def assemble(p, result, names, margin=0):
    """The grid image with labelled axes (modules.images, as the X/Y/Z plot), then every cell's image; infotexts."""
    from PIL import Image

    done = {c.index: c for c in result.done}
    if not done:
        return processing.Processed(p, [], p.seed, "the merge grid was interrupted before its first cell")
    cell_imgs = {i: _to_pil(c.result["image"]) for i, c in done.items()}
    size = next(iter(cell_imgs.values())).size
    imgs = [cell_imgs.get(c.index) or Image.new("RGB", size) for c in result.cells]
    rows = len(result.y.values) if result.y is not None else 1
    grid = images.image_grid(imgs, rows=rows)
    hor = [[images.GridAnnotation(result.x.text(v))] for v in result.x.values]
    ver = ([[images.GridAnnotation(result.y.text(v))] for v in result.y.values] if result.y is not None
           else [[images.GridAnnotation()]])
    grid = images.draw_grid_annotations(grid, size[0], size[1], hor, ver, int(margin or 0))
    first = done[min(done)]
    infos = [done[i].result["infotext"] for i in sorted(done)]
    summary = (f"{INFOTEXT_KEY} grid: {len(done)} of {len(result.cells)} cells"
               f"{' (interrupted)' if result.interrupted else ''}; keys rewritten per cell: "
               + ", ".join(str(done[i].keys_written) for i in sorted(done)))
    grid_info = first.result["infotext"] + f"\n{summary}"
    return processing.Processed(p, [grid] + [cell_imgs[i] for i in sorted(done)], p.seed, grid_info,
                                infotexts=[grid_info] + infos)


def save_cell(number, output, overwrite=False):
    """Write cell ``number`` (from 1) of the last grid to a checkpoint file through the ``merge`` job."""
    with _lock:
        cells = list(_last["cells"])
    if not cells:
        raise InvalidInputError("no merge grid was made since the WebUI started; make one first")
    try:
        n = int(number)
    except (TypeError, ValueError):
        raise InvalidInputError(f"cell must be a number from 1 to {len(cells)}, got {number!r}") from None
    if not 1 <= n <= len(cells):
        raise InvalidInputError(f"the last grid has cells 1 to {len(cells)}; got {n}")
    fields = cells[n - 1].recipe.to_dict()
    fields.update(output=(output or None), overwrite=bool(overwrite))
    return jobs.run("merge", _host(), fields)


def list_cells():
    with _lock:
        cells, names = list(_last["cells"]), dict(_last["names"])
    return [{"cell": c.index + 1, "x": c.x, "y": c.y, "seed": c.seed, "keys_written": c.keys_written,
             "recipe": c.recipe_dict(names)} for c in cells]


class SdToolkitMergeGridScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return not is_img2img

    def ui(self, is_img2img):
        if IS_FORGE:
            gr.HTML(f"<p class='sdtoolkit-note'>{FORGE_NOTE}</p>")
        names = ["None"] + _checkpoint_names()
        with gr.Row():
            model_b = gr.Dropdown(label="Model B", choices=names, value="None", elem_id=self.elem_id("model_b"))
            model_c = gr.Dropdown(label="Model C (" + sdt_methods.model_c_label() + ")", choices=names, value="None",
                                  elem_id=self.elem_id("model_c"))
            method = gr.Dropdown(label="Method", choices=list(sdt_methods.names()), value="weighted_sum",
                                 elem_id=self.elem_id("method"))
        with gr.Row():
            alpha = gr.Number(label="Alpha (share of B) where no axis sets it", value=0.5,
                              elem_id=self.elem_id("alpha"))
            beta = gr.Textbox(label="Beta (" + sdt_methods.beta_label() + "); empty: the method's default",
                              value="", elem_id=self.elem_id("beta"))
        with gr.Row():
            x_type = gr.Dropdown(label="X type", choices=AXIS_CHOICES, value="Alpha", elem_id=self.elem_id("x_type"))
            x_values = gr.Textbox(label="X values", value="0.2-0.8 [3]", placeholder=sdt_grid.SYNTAX_HELP,
                                  elem_id=self.elem_id("x_values"))
            x_block = gr.Dropdown(label="X block (Block ratio axis)", choices=BLOCK_CHOICES, value="IN04",
                                  elem_id=self.elem_id("x_block"))
        with gr.Row():
            y_type = gr.Dropdown(label="Y type", choices=[NOTHING] + AXIS_CHOICES, value=NOTHING,
                                 elem_id=self.elem_id("y_type"))
            y_values = gr.Textbox(label="Y values", value="", placeholder=sdt_grid.SYNTAX_HELP,
                                  elem_id=self.elem_id("y_values"))
            y_block = gr.Dropdown(label="Y block (Block ratio axis)", choices=BLOCK_CHOICES, value="OUT04",
                                  elem_id=self.elem_id("y_block"))
        margin = gr.Slider(label="Grid margins (px)", minimum=0, maximum=64, value=0, step=2,
                           elem_id=self.elem_id("margin"))
        gr.HTML("<p class='sdtoolkit-note'>Values: " + sdt_grid.SYNTAX_HELP + ". Model A is the loaded "
                "checkpoint; it is restored exactly after the grid.</p>")
        with gr.Row():
            cell_no = gr.Number(label="Cell (from 1, row by row)", value=1, precision=0,
                                elem_id=self.elem_id("save_cell_no"))
            cell_out = gr.Textbox(label="File name (checkpoint folder)", value="",
                                  elem_id=self.elem_id("save_cell_name"))
            save_btn = gr.Button("Save cell as file", elem_id=self.elem_id("save_cell"))
        save_status = gr.Textbox(label="Save", interactive=False, elem_id=self.elem_id("save_cell_status"))

        def do_save(n, name):
            try:
                rep = save_cell(n, name)
                return f"Saved cell {int(n)} as {rep.name}"
            except Exception as e:  # the face shows the message
                from lib_sdtoolkit.jobs.faces import error_text
                return error_text(e)

        save_btn.click(do_save, inputs=[cell_no, cell_out], outputs=[save_status])
        return [model_b, model_c, method, alpha, beta, x_type, x_values, x_block, y_type, y_values, y_block,
                margin]

    def run(self, p, model_b, model_c, method, alpha, beta, x_type, x_values, x_block, y_type, y_values, y_block,
            margin=0):
        return run_merge_grid(p, model_b, model_c, method, alpha, beta, x_type, x_values, x_block, y_type, y_values,
                              y_block, margin)


def on_app_started(demo, app):
    if getattr(shared.cmd_opts, "sdtoolkit_no_api", False):
        return
    from fastapi import Body
    from fastapi.responses import JSONResponse

    from lib_sdtoolkit.server import API_PREFIX

    path = API_PREFIX + "/merge/grid"
    if path in {getattr(r, "path", None) for r in getattr(app, "routes", [])}:
        return

    def _error(e):
        status = getattr(e, "http_status", 500) if isinstance(e, SdToolkitError) else 500
        return JSONResponse({"detail": str(e)}, status_code=status)

    def get_grid():
        return {"supported": not IS_FORGE, "cells": list_cells()}

    def post_save(body: dict = Body(...)):
        unknown = sorted(set(body) - {"cell", "output", "overwrite"})
        if unknown:
            return JSONResponse({"detail": f"unknown field(s): {', '.join(unknown)}"}, status_code=422)
        try:
            return save_cell(body.get("cell"), body.get("output"), bool(body.get("overwrite", False))).to_dict()
        except Exception as e:
            return _error(e)

    app.add_api_route(path, get_grid, methods=["GET"])
    app.add_api_route(path + "/save", post_save, methods=["POST"])


script_callbacks.on_app_started(on_app_started)
