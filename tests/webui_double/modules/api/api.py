"""Double of modules/api/api.py (A1111 1.10): how /sdapi/v1/txt2img and img2img turn a request's
``alwayson_scripts`` into the positional ``script_args`` a generation gives each script (reference section 2:
``"alwayson_scripts": {"<title lowercased>": {"args": [...]}}``, ``init_script_args``), and the ``Api`` class the
WebUI mounts with ``--api`` (before ``app_started_callback``) with the routes extensions and clients such as
``webuiapi`` depend on:

* ``GET /sdapi/v1/options`` (every ``opts.data`` value), ``POST /sdapi/v1/options`` (``sd_model_checkpoint`` must be
  a known checkpoint alias; values set with ``opts.set(k, v, is_api=True)``);
* ``GET /sdapi/v1/sd-models`` (``checkpoints_list``), ``GET /sdapi/v1/scripts`` (``script.name`` of every script of
  each tab's runner: scripts whose ``ui()`` returned None have no name and are not listed);
* ``POST /sdapi/v1/txt2img``: scripts initialised and their UI built on first use; the default script args computed
  ONCE from the UI components' values and cached (``default_script_arg_txt2img``); a request's
  ``alwayson_scripts`` placed over a copy of them; ``script_name`` runs a selectable script; the processing object
  built from the request fields, run with ``process_images`` inside ``closing(p)`` under the queue lock.

Double only: the request is a plain dict (no pydantic model); only the fields the double's processing knows are
used (prompt, negative_prompt, width, height, batch_size, seed, steps, override_settings); images are returned as
base64 PNGs of the decoded samples. The double has no samplers: tests give ``StableDiffusionProcessingTxt2Img`` a
``sample`` method.
"""
import base64
import io
import json
from contextlib import closing

from fastapi import HTTPException, Request


def script_name_to_index(name, scripts):
    try:
        return [script.title().lower() for script in scripts].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def get_script(script_name, script_runner):
    if script_name is None or script_name == "":
        return None, None
    script_idx = script_name_to_index(script_name, script_runner.scripts)
    return script_runner.scripts[script_idx]


def init_default_script_args(script_runner):
    """None everywhere except position 0; each script's slice holds the default values of the components its
    ``ui()`` returns (ui() is called again inside a gr.Blocks)."""
    import gradio as gr

    last_arg_index = 1
    for script in script_runner.scripts:
        if last_arg_index < script.args_to:
            last_arg_index = script.args_to
    script_args = [None] * last_arg_index
    script_args[0] = 0
    with gr.Blocks():
        for script in script_runner.scripts:
            if script.ui(script.is_img2img):
                ui_default_values = []
                for elem in script.ui(script.is_img2img):
                    ui_default_values.append(elem.value)
                script_args[script.args_from:script.args_to] = ui_default_values
    return script_args


def init_script_args(alwayson_scripts, default_script_args, selectable_scripts=None, selectable_idx=None,
                     script_runner=None, request_script_args=None):
    """The request's ``alwayson_scripts`` dict placed over the defaults at each script's args_from slots
    (at most ``args_to - args_from`` values per script)."""
    script_args = default_script_args.copy()
    if selectable_scripts:
        script_args[selectable_scripts.args_from:selectable_scripts.args_to] = request_script_args
        script_args[0] = selectable_idx + 1
    if alwayson_scripts:
        for alwayson_script_name in alwayson_scripts.keys():
            alwayson_script = get_script(alwayson_script_name, script_runner)
            if alwayson_script is None:
                raise HTTPException(status_code=422, detail=f"always on script {alwayson_script_name} not found")
            if alwayson_script.alwayson is False:
                raise HTTPException(status_code=422,
                                    detail="Cannot have a selectable script in the always on scripts params")
            if "args" in alwayson_scripts[alwayson_script_name]:
                args = alwayson_scripts[alwayson_script_name]["args"]
                for idx in range(0, min((alwayson_script.args_to - alwayson_script.args_from), len(args))):
                    script_args[alwayson_script.args_from + idx] = args[idx]
    return script_args


def _encode_image(x):
    """A decoded sample (C, H, W in [-1, 1]) as a base64 PNG, as the WebUI sends images."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(x, torch.Tensor):
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))
    else:
        img = x
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ensure_ui(script_runner, is_img2img):
    """What ``ui.create_ui()`` does for a tab's runner when the API is first used (scripts initialised, UI built)."""
    import gradio as gr

    if not script_runner.scripts:
        script_runner.initialize_scripts(is_img2img)
        with gr.Blocks():
            script_runner.setup_ui()


class Api:
    _PROCESSING_FIELDS = ("prompt", "negative_prompt", "width", "height", "batch_size", "seed", "steps")

    def __init__(self, app, queue_lock):
        self.app = app
        self.queue_lock = queue_lock
        app.add_api_route("/sdapi/v1/options", self.get_config, methods=["GET"])
        app.add_api_route("/sdapi/v1/options", self.set_config, methods=["POST"])
        app.add_api_route("/sdapi/v1/sd-models", self.get_sd_models, methods=["GET"])
        app.add_api_route("/sdapi/v1/scripts", self.get_scripts_list, methods=["GET"])
        app.add_api_route("/sdapi/v1/txt2img", self.text2imgapi, methods=["POST"])
        self.default_script_arg_txt2img = []
        self.default_script_arg_img2img = []

    def get_config(self):
        from modules import shared

        options = {}
        for key in shared.opts.data.keys():
            metadata = shared.opts.data_labels.get(key)
            if metadata is not None:
                options.update({key: shared.opts.data.get(key, shared.opts.data_labels.get(key).default)})
            else:
                options.update({key: shared.opts.data.get(key, None)})
        return options

    async def set_config(self, request: Request):
        from modules import sd_models, shared

        req = await request.json()
        checkpoint_name = req.get("sd_model_checkpoint", None)
        if checkpoint_name is not None and checkpoint_name not in sd_models.checkpoint_aliases:
            raise RuntimeError(f"model {checkpoint_name!r} not found")
        for k, v in req.items():
            shared.opts.set(k, v, is_api=True)
        return None

    def get_sd_models(self):
        from modules import sd_models

        return [{"title": x.title, "model_name": x.model_name, "hash": x.shorthash, "sha256": x.sha256,
                 "filename": x.filename, "config": None} for x in sd_models.checkpoints_list.values()]

    def get_scripts_list(self):
        from modules import scripts

        t2i = [s.name for s in scripts.scripts_txt2img.scripts if s.name is not None]
        i2i = [s.name for s in scripts.scripts_img2img.scripts if s.name is not None]
        return {"txt2img": t2i, "img2img": i2i}

    def get_selectable_script(self, script_name, script_runner):
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        return script_runner.selectable_scripts[script_idx], script_idx

    async def text2imgapi(self, request: Request):
        from modules import processing, scripts, shared

        req = await request.json()
        script_runner = scripts.scripts_txt2img
        _ensure_ui(script_runner, False)
        if not self.default_script_arg_txt2img:
            self.default_script_arg_txt2img = init_default_script_args(script_runner)
        selectable, selectable_idx = self.get_selectable_script(req.get("script_name"), script_runner)
        script_args = init_script_args(req.get("alwayson_scripts") or {}, self.default_script_arg_txt2img,
                                       selectable, selectable_idx, script_runner, req.get("script_args") or [])
        kwargs = {k: req[k] for k in self._PROCESSING_FIELDS if k in req}
        send_images = req.get("send_images", True)
        with self.queue_lock:
            with closing(processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **kwargs)) as p:
                p.override_settings = dict(req.get("override_settings") or {})
                p.is_api = True
                p.scripts = script_runner
                p.script_args = tuple(script_args)
                if selectable is not None:
                    processed = script_runner.run(p, *p.script_args)
                else:
                    processed = processing.process_images(p)
        images = [_encode_image(x) for x in processed.images] if send_images else []
        return {"images": images, "parameters": req, "info": processed.js()}
