"""WebUI adapter: the "Tiled VAE (exact)" accordion in txt2img/img2img.

When enabled, ``shared.sd_model.first_stage_model.encoder/decoder`` get tiled ``forward`` instance attributes in
``process`` (before the img2img init-image encode and every decode of this generation) and lose them in
``postprocess``. Restoration also happens when the generation fails or is interrupted: ``p.close`` (which the
WebUI calls in a ``finally`` via ``contextlib.closing(p)`` for UI and API generations) is wrapped for this ``p``,
and ``before_process`` of the next generation removes any patch left behind.

Forge / Forge Neo: the model has no ``first_stage_model`` (it is None there); the VAE is
``shared.sd_model.forge_objects.vae.first_stage_model``, an ldm-layout ``encoder``/``decoder`` pair that Forge's
``VAE.decode``/``encode`` call, so the same patch works on it. Forge's own tiled VAE ("Never OOM Integrated" ->
"Enabled for VAE (always tiled)", ``memory_management.VAE_ALWAYS_TILED``) averages three overlapping tilings, an
approximation; with ours enabled it is bypassed for the generation (ours replaces it, exact), and the log says so.
"""
import importlib.util
import logging

import gradio as gr
from modules import scripts, shared
from modules.ui_components import InputAccordion

from lib_sdtoolkit.tiled_vae import TiledVAEConfig, VAEPatchGuard

log = logging.getLogger("sdtoolkit.tiled_vae")
IS_FORGE = importlib.util.find_spec("modules_forge") is not None
FORGE_NOTE = ("Forge: while this is on it replaces Forge's VAE decode/encode for the generation (SD1/SD2/SDXL-style "
              "VAEs; other model families say so and use the normal VAE), and Forge's approximate tiled VAE "
              "(Never OOM Integrated -> Enabled for VAE) is bypassed.")
_guard = VAEPatchGuard()  # adapter-level state: the patch of the running generation


def _user_stop():
    """Interrupt or Skip pressed (``modules.shared_state.State`` flags)."""
    state = getattr(shared, "state", None)
    return bool(getattr(state, "interrupted", False) or getattr(state, "skipped", False))


class _StopWatch:
    """``should_stop`` of the tiled runs: True once Interrupt/Skip is pressed *during* a run. A request already
    pending when a run starts is ignored: after an interrupted or skipped sampling the WebUI decodes the last
    latent on purpose (the sampler returns it), and that decode must still give the image."""

    def __init__(self):
        self.pending_at_start = False

    def start(self):
        self.pending_at_start = _user_stop()

    def __call__(self):
        return _user_stop() and not self.pending_at_start


_stop = _StopWatch()


def _progress(done, total):
    if done == 0:       # a tiled run starts (progress(0, total) comes first)
        _stop.start()
    try:
        shared.state.textinfo = f"Tiled VAE: tile {done}/{total}"
    except Exception:
        pass


def _vae_of(model):
    """The ldm-layout VAE module (A1111: ``first_stage_model``; Forge: ``forge_objects.vae.first_stage_model``)."""
    vae = getattr(model, "first_stage_model", None)
    if vae is None:
        fo = getattr(model, "forge_objects", None)
        vae = getattr(getattr(fo, "vae", None), "first_stage_model", None)
    return vae if vae is not None and hasattr(vae, "decoder") and hasattr(vae, "encoder") else None


def _bypass_forge_tiling():
    """Forge's approximate tiled VAE would call our (exact) decoder once per tile of its three tilings: turn it off
    for this generation (Never OOM sets the flag again from its checkbox at the next generation's ``process``)."""
    try:
        from backend import memory_management
    except ImportError:
        return
    if getattr(memory_management, "VAE_ALWAYS_TILED", False):
        memory_management.VAE_ALWAYS_TILED = False
        log.warning("Tiled VAE: Forge's approximate tiled VAE (Never OOM) is bypassed for this generation; "
                    "SD Toolkit's exact Tiled VAE replaces it")


def _device(choice):
    if choice == "GPU":
        import torch
        return "cuda" if torch.cuda.is_available() else None
    if choice == "CPU":
        return "cpu"
    return None


class Script(scripts.Script):
    def title(self):
        return "SD Toolkit Tiled VAE"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label="Tiled VAE (exact)", elem_id=self.elem_id("enabled")) as enabled:
            gr.Markdown("Decodes/encodes tile by tile with the statistics of the whole image: same result as a "
                        "full decode, bounded memory. Tile sizes in image pixels; 0 = chosen from free memory.")
            if IS_FORGE:
                gr.Markdown(FORGE_NOTE, elem_classes=["sdtoolkit-forge-note"])
            with gr.Row():
                enc_tile = gr.Slider(0, 4096, value=0, step=64, label="Encoder tile size (px)",
                                     elem_id=self.elem_id("encoder_tile"))
                dec_tile = gr.Slider(0, 4096, value=0, step=64, label="Decoder tile size (px)",
                                     elem_id=self.elem_id("decoder_tile"))
            with gr.Row():
                fast = gr.Checkbox(False, label="Fast mode (approximate statistics from a downscaled pass)",
                                   elem_id=self.elem_id("fast"))
                device = gr.Radio(["Unchanged", "GPU", "CPU"], value="Unchanged", label="Run the VAE on",
                                  elem_id=self.elem_id("device"))
        self.infotext_fields = [(enabled, lambda d: "Tiled VAE" in d)]
        return [enabled, enc_tile, dec_tile, fast, device]

    def before_process(self, p, *args):
        if _guard.restore():
            log.warning("Tiled VAE: removed a patch left over by an earlier generation")

    def process(self, p, enabled=False, enc_tile=0, dec_tile=0, fast=False, device="Unchanged", *args):
        _guard.restore()
        if not enabled:
            return
        model = getattr(p, "sd_model", None) or getattr(shared, "sd_model", None)
        vae = _vae_of(model)
        if vae is None:
            msg = (f"Tiled VAE (exact): not available for this model ({type(model).__name__}: no ldm-layout VAE "
                   "encoder/decoder); the generation uses the normal VAE")
            log.warning(msg)
            if callable(getattr(p, "comment", None)):
                p.comment(msg)
            return
        common = dict(fast=bool(fast), device=_device(device), progress=_progress, should_stop=_stop, log=log.info)
        enc = TiledVAEConfig(tile_px=int(enc_tile) or None, **common)
        dec = TiledVAEConfig(tile_px=int(dec_tile) or None, **common)
        _guard.install(vae, enc, dec)
        close = getattr(p, "close", None)
        if callable(close) and not getattr(close, "__sdtoolkit_tiled_vae__", False):
            def close_and_restore(*a, **k):
                try:
                    _guard.restore()
                finally:
                    close(*a, **k)  # a failing restore still propagates (no `return` in finally)
            close_and_restore.__sdtoolkit_tiled_vae__ = True
            p.close = close_and_restore
        p.extra_generation_params["Tiled VAE"] = (
            f"enc {int(enc_tile) or 'auto'}, dec {int(dec_tile) or 'auto'}{', fast' if fast else ''}")

    def process_batch(self, p, enabled=False, *args, **kwargs):
        if enabled and _guard.active:
            _bypass_forge_tiling()   # after every script's process(): Never OOM sets its flag there

    def postprocess(self, p, processed, *args):
        _guard.restore()
