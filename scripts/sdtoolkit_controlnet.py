"""WebUI adapter: SD Toolkit's ControlNet units as an always-visible script titled "ControlNet".

API: ``"alwayson_scripts": {"controlnet": {"args": [{unit dict}, ...]}}`` works as with sd-webui-controlnet (the
script's args are one unit dict per panel, a ``gr.State`` per unit). If the real sd-webui-controlnet or Forge's
built-in ControlNet is active, this script registers nothing that conflicts (no Script class, no routes) and says so
in the log and in the toolkit's ControlNet tab.
"""
import importlib.util
import logging

import gradio as gr
from modules import paths, script_callbacks, scripts, shared

import lib_sdtoolkit.host as sdt_host
from lib_sdtoolkit.controlnet import preprocessors as sdt_pre
from lib_sdtoolkit.controlnet.compat import external_controlnet
from lib_sdtoolkit.controlnet.hook import UnetHook
from lib_sdtoolkit.controlnet.models import ControlModelCache, DEFAULT_CACHE_SIZE
from lib_sdtoolkit.controlnet.registry import prepare_units
from lib_sdtoolkit.jobs.controlnet import model_resolver, model_titles
from lib_sdtoolkit.controlnet.unit import ControlMode, ControlNetUnit, ResizeMode
from lib_sdtoolkit.ui.controlnet_tab import slider_updates

log = logging.getLogger("sdtoolkit.controlnet")
SECTION = ("sdtoolkit_controlnet", "SD Toolkit ControlNet")


def _external_reason():
    reason = external_controlnet()
    if reason:
        return reason
    try:
        from modules import extensions
        names = {e.name.lower() for e in extensions.active()}
    except Exception:
        names = set()
    if "sd-webui-controlnet" in names:
        return "the sd-webui-controlnet extension is installed"
    if importlib.util.find_spec("modules_forge") is not None:
        return "this is Forge, which ships its own ControlNet"
    return None


EXTERNAL = _external_reason()
if EXTERNAL:
    log.warning("SD Toolkit ControlNet is off: %s (its /controlnet routes and 'ControlNet' script are used)", EXTERNAL)

shared.options_templates.update(shared.options_section(SECTION, {
    "sdtoolkit_controlnet_unit_count": shared.OptionInfo(3, "ControlNet unit panels (needs UI reload)",
                                                         gr.Slider, {"minimum": 1, "maximum": 10, "step": 1}),
    "sdtoolkit_controlnet_cache_size": shared.OptionInfo(DEFAULT_CACHE_SIZE, "ControlNet models kept in memory",
                                                         gr.Slider, {"minimum": 0, "maximum": 8, "step": 1}),
    "sdtoolkit_controlnet_external": shared.OptionInfo(EXTERNAL or "", "Other ControlNet detected (read-only)"),
}))
shared.opts.data["sdtoolkit_controlnet_external"] = EXTERNAL or ""

_cache = ControlModelCache(DEFAULT_CACHE_SIZE)
_state = {"hook": None}  # the hook of the running generation (adapter-level state)


def make_host():
    return sdt_host.webui_host_from(paths, shared.cmd_opts, shared.opts,
                                    forge=importlib.util.find_spec("modules_forge") is not None)


def _restore_leftover():
    hook = _state.get("hook")
    if hook is not None:
        hook.restore()
        _state["hook"] = None


def _on_cfg_denoiser(params):
    hook = _state.get("hook")
    if hook is None:
        return
    hook.set_step(params.sampling_step, params.total_sampling_steps)
    uc = params.text_uncond
    if isinstance(uc, dict):  # SDXL
        uc = uc.get("crossattn")
    hook.set_uncond(uc)


script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
script_callbacks.on_script_unloaded(_restore_leftover)


def _vae_encoder(model):
    """Pixels in [-1, 1] -> scaled latents through the loaded model (ldm: encode_first_stage gives the posterior,
    get_first_stage_encoding samples and scales it; SDXL in A1111: already scaled), as the tile colour fix needs."""
    if not (hasattr(model, "encode_first_stage") and hasattr(model, "get_first_stage_encoding")):
        return None

    def encode(x):
        vae = getattr(model, "first_stage_model", None)
        param = next(vae.parameters()) if vae is not None else None
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        return model.get_first_stage_encoding(model.encode_first_stage(x))

    return encode


def _restore_on_close(p):
    """The WebUI runs every generation in ``with closing(p)``: wrap this p's close so an exception or interrupt
    during sampling (postprocess is then never called) still puts the UNet's forward back."""
    close = getattr(p, "close", None)
    if not callable(close) or getattr(close, "__sdtoolkit_controlnet__", False):
        return

    def close_and_restore(*a, **k):
        try:
            _restore_leftover()
        finally:
            p.close = close
        return close(*a, **k)

    close_and_restore.__sdtoolkit_controlnet__ = True
    p.close = close_and_restore


def _numpy_seed(p):
    """sd-webui-controlnet's shuffle seed: (seed + subseed) & 0xFFFFFFFF, all_seeds[0] standing in for a -1."""
    try:
        first = int(p.all_seeds[0]) if getattr(p, "all_seeds", None) else 0
        seed = first if p.seed == -1 else max(int(p.seed), 0)
        subseed = first if p.subseed == -1 else max(int(p.subseed), 0)
        return sdt_pre.shuffle_seed(seed, subseed)
    except (AttributeError, TypeError, ValueError):
        return None


def unit_count():
    try:
        return max(1, int(shared.opts.data.get("sdtoolkit_controlnet_unit_count", 3)))
    except (TypeError, ValueError):
        return 3


if not EXTERNAL:
    class SdToolkitControlNetScript(scripts.Script):
        def title(self):
            return "ControlNet"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            states = []
            host = make_host()
            with gr.Accordion("ControlNet (SD Toolkit)", open=False, elem_classes=["sdtoolkit-controlnet"]):
                with gr.Tabs():
                    for i in range(unit_count()):
                        with gr.Tab(f"Unit {i}"):
                            states.append(self._unit_panel(i, host, is_img2img))
            return states

        def _unit_panel(self, i, host, is_img2img):
            state = gr.State(ControlNetUnit().to_dict())
            with gr.Row():
                image = gr.Image(label="Control image", type="numpy", elem_id=self.elem_id(f"image_{i}"))
                preview = gr.Image(label="Detected map", interactive=False)
            with gr.Row():
                enabled = gr.Checkbox(label="Enable", value=False)
                pixel_perfect = gr.Checkbox(label="Pixel Perfect", value=False)
            with gr.Row():
                module = gr.Dropdown(sdt_pre.module_list(), value="none", label="Preprocessor")
                model = gr.Dropdown(["None"] + model_titles(host), value="None", label="Model")
                refresh = gr.Button("\U0001f504", elem_classes=["sdtoolkit-tool"])
            weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control Weight")
            with gr.Row():
                start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting Control Step")
                end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending Control Step")
            with gr.Row():  # labels, ranges and defaults follow the module (its own slider data)
                res = gr.Slider(64, 2048, value=512, step=8, label="Resolution", visible=False)
                thr_a = gr.Slider(0, 1, value=0, label="(unused)", visible=False)
                thr_b = gr.Slider(0, 1, value=0, label="(unused)", visible=False)
            control_mode = gr.Radio([m.value for m in ControlMode], value=ControlMode.BALANCED.value,
                                    label="Control Mode")
            resize_mode = gr.Radio([m.value for m in ResizeMode], value=ResizeMode.INNER_FIT.value,
                                   label="Resize Mode")
            preview_btn = gr.Button("Preview detected map")
            fields = [enabled, image, module, model, weight, start, end, res, thr_a, thr_b, pixel_perfect,
                      control_mode, resize_mode]
            names = ["enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end",
                     "processor_res", "threshold_a", "threshold_b", "pixel_perfect", "control_mode", "resize_mode"]

            def to_state(*values):
                d = ControlNetUnit().to_dict()
                d.update(dict(zip(names, values)))
                return d

            module.change(slider_updates, inputs=[module, pixel_perfect], outputs=[res, thr_a, thr_b])
            pixel_perfect.change(slider_updates, inputs=[module, pixel_perfect], outputs=[res, thr_a, thr_b])
            for f in fields:
                f.change(to_state, inputs=fields, outputs=[state])

            def do_preview(img, mod, r, a, b):
                if img is None:
                    return None
                try:
                    return sdt_pre.run_preprocessor(mod, img, r, a, b)
                except Exception as e:  # a clear message instead of gradio's generic error
                    raise gr.Error(str(e))

            preview_btn.click(do_preview, inputs=[image, module, res, thr_a, thr_b], outputs=[preview])
            refresh.click(lambda: gr.update(choices=["None"] + model_titles(make_host())), outputs=[model])
            return state

        def process(self, p, *args):
            _restore_leftover()
            units = [a for a in args if isinstance(a, (dict, ControlNetUnit))]
            if not any((a.get("enabled", True) if isinstance(a, dict) else a.enabled) for a in units):
                return
            _cache.resize(shared.opts.data.get("sdtoolkit_controlnet_cache_size", DEFAULT_CACHE_SIZE))
            unet = p.sd_model.model.diffusion_model
            param = next(unet.parameters())
            init = getattr(p, "init_images", None)
            prepared = prepare_units(units, model_resolver(make_host()), _cache, p.height, p.width, unet=unet,
                                     init_image=init[0] if init else None, dtype=param.dtype, device=param.device,
                                     warn=log.warning, seed=_numpy_seed(p))
            if hasattr(p, "comments"):
                for w in prepared.warnings:
                    p.comments[w] = 1
            if not prepared.units:
                return
            model = p.sd_model
            hook = UnetHook(prepared.units, warn=log.warning, encode_latent=_vae_encoder(model),
                            alphas_cumprod=getattr(model, "alphas_cumprod", None),
                            prediction=getattr(model, "parameterization", "eps")).hook(unet)
            _state["hook"] = hook
            _restore_on_close(p)
            p.extra_generation_params["ControlNet"] = ", ".join(u.name for u in prepared.units)
            self._maps = prepared.detected_maps

        def before_hr(self, p, *args):
            hook = _state.get("hook")
            if hook is not None:
                hook.is_hr_pass = True

        def postprocess(self, p, processed, *args):
            _restore_leftover()
            from PIL import Image
            for _, m in getattr(self, "_maps", []) or []:
                processed.images.append(Image.fromarray(m))
            self._maps = []


if not EXTERNAL:
    class SdToolkitControlNetClientCompat(scripts.Script):
        """A selectable script titled "controlnet m2m", the name sd-webui-controlnet's movie-to-movie script has.

        API clients detect ControlNet by that name in ``/sdapi/v1/scripts``: ``webuiapi`` then sends
        ``"ControlNet": {"args": []}`` on every call without units. Without it, webuiapi sends nothing on such a
        call -- and because its ``alwayson_scripts={}`` default dict is shared between calls, the units of the
        previous call are sent again, so ControlNet stuck to every later generation. Chosen in the Script
        dropdown it runs a plain generation (SD Toolkit has no movie-to-movie)."""

        def title(self):
            return "controlnet m2m"

        def show(self, is_img2img):
            return True

        def ui(self, is_img2img):
            gr.Markdown("SD Toolkit has no ControlNet movie-to-movie: this entry exists so that API clients "
                        "(webuiapi) recognise the ControlNet units. Running it makes a normal generation; set units "
                        "in the ControlNet (SD Toolkit) accordion.")
            return []

        def run(self, p, *args):
            from modules import processing
            return processing.process_images(p)
