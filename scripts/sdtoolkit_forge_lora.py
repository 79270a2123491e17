"""Forge adapter: ``<sdtlora:...>`` through Forge's own LoRA patcher (does nothing outside Forge).

Forge (and Forge Neo) own the model's weights through patchers (``backend/patcher``): its built-in Lora adds patches
to clones of the UNet/CLIP patchers, and the patcher merges them into the weights, keeping its own backup. So here
``<sdtlora:...>`` does the same: our loader reads the file (every format we support), each layer becomes a patch
on the patcher parameter Forge's own key map names, with its multiplier (te/unet weight x ``lbw=`` block weight)
inside the patch - ``lbw=`` works - and the patches go to clones of ``p.sd_model.forge_objects.clip/unet``:

* CLIP after the extra networks are activated and again in ``process_batch`` (the conds are computed right after;
  Forge resets ``forge_objects`` in between), UNet in ``process_before_every_sampling`` (Forge resets it again before
  each sampling pass), as Forge's own ControlNet does;
* ``<lora:...>`` stays Forge's; both sets of patches are merged by the same loader (restored exactly when the set
  changes), so any mix over any sequence of generations gives the sum of the deltas and no second weight backup;
* ``start=``/``stop=`` are NOT available: the patcher merges once per sampling pass, not per step. The network is
  then applied for every step and the generation's comments and the log say so.
Forge calls a patch type it does not know through ``backend.patcher.lora.extra_weight_calculators``; Forge Neo's
patcher takes ComfyUI ``WeightAdapterBase`` objects instead. Both are supported; where neither exists the log and
the comments say that ``<sdtlora>`` is unavailable and nothing is registered. The patchers' other differences are
handled in ``lib_sdtoolkit.lora.patcher_bridge``: ``add_patches(filename=..., online_mode=...)`` (Forge 2.0.x) or
``add_patches(patches, strength)`` (Neo on ComfyUI's ModelPatcher), and ``model_lora_keys_clip`` returning the key
map (Forge 2.0.x) or ``(keys, key map)`` (Neo).

Flux.1 (Forge's Flux engine sets no ``is_*`` flag: told from BFL's names under ``diffusion_model.``): every naming
we read (kohya with ``lora_te1_`` CLIP-L / ``lora_te2_`` T5, diffusers / PEFT / SimpleTuner, XLabs, BFL / ComfyUI,
LoKr / LoHa) lands on Forge's BFL parameters, slices of the fused ``qkv`` / ``linear1`` as offset patches
(``patcher_bridge.flux_patcher_key``); ``lbw=`` takes Flux's blocks. A1111 has no Flux (its adapter says so).
"""
import importlib.util
import logging
import os

log = logging.getLogger("sdtoolkit.lora")

IS_FORGE = importlib.util.find_spec("modules_forge") is not None
UNAVAILABLE_OPTIONS_NOTE = ("SD Toolkit LoRA on Forge: {opts} not available (Forge's patcher merges LoRA weights once "
                            "per sampling pass, not per step); {tag} applied for every step")
#: networks kept parsed in memory (by path + mtime), most recently used last
CACHE_SIZE = 8

if IS_FORGE:
    from modules import extra_networks, script_callbacks, scripts, shared

    from lib_sdtoolkit.errors import SdToolkitError
    from lib_sdtoolkit.lora.apply import ActiveNetwork, loaded_architecture
    from lib_sdtoolkit.lora.blocks import load_user_presets, resolve_block_weights
    from lib_sdtoolkit.lora.network import UNKNOWN_TARGET, NetworkCache, partly_text
    from lib_sdtoolkit.lora.patcher_bridge import (PATCH_TYPE, add_patch_sets, apply_patch, build_patches,
                                                   key_map_of, unavailable_options)
    from lib_sdtoolkit.lora.registry import LoraRegistry
    from lib_sdtoolkit.lora.syntax import ExtraNetworkParams, request_from_params


def _report_unmatched(net):
    if net.unmatched or net.unknown_type:
        log.info("%s", net.report())


def _patch_value_factory():
    """How this Forge takes a patch of ours: (kind, wrap) or (None, reason)."""
    try:
        from backend.patcher import lora as forge_lora
    except Exception as e:  # pragma: no cover - depends on the host
        return None, f"backend.patcher.lora cannot be imported ({e})"
    adapter_mod = getattr(forge_lora, "weight_adapter", None)
    base = getattr(adapter_mod, "WeightAdapterBase", None)
    if base is not None:           # Forge Neo: ComfyUI weight adapters
        class SdToolkitAdapter(base):
            name = PATCH_TYPE

            def __init__(self, patch):
                self.patch = patch
                self.loaded_keys = set()
                self.weights = []

            def calculate_weight(self, weight, key, strength, strength_model, offset, function, *args, **kwargs):
                return apply_patch(weight, strength, self.patch)

        return "adapter", lambda patch: SdToolkitAdapter(patch)
    calcs = getattr(forge_lora, "extra_weight_calculators", None)
    if isinstance(calcs, dict):    # Forge 2.0.x
        calcs[PATCH_TYPE] = apply_patch
        return "calculator", lambda patch: (PATCH_TYPE, patch)
    return None, "this Forge's LoRA patcher has no extension point for new patch types"


def _arch_of(sd_model, unet_shapes):
    """SD1 / SD2 / SDXL / SDXL-refiner / Flux.1, or None for a model we do not handle (SD3, Chroma, ...: Forge's
    own <lora:...>).

    Forge's flags gate the SD families; which one it is comes from the library's detector on the UNet parameters'
    names and shapes (Forge's ``diffusion_model.*``, read as checkpoint keys): Forge sets ``is_sdxl`` for the
    refiner too, whose layers need the refiner's name table and blocks. Forge's Flux engine sets no flag: Flux.1 is
    told by the same detector from BFL's names under ``diffusion_model.``."""
    shapes = unet_shapes()
    unet = {k: s for k, s in shapes.items() if k.startswith("diffusion_model.")}
    if not any(getattr(sd_model, f, False) for f in ("is_sd1", "is_sd2", "is_sdxl")):
        from lib_sdtoolkit.arch import detect
        return "Flux.1" if unet and detect(unet).architecture == "Flux.1" else None
    return loaded_architecture(unet.items(), prefix="model.")


def _shape(param):
    """A parameter's weight shape: bitsandbytes' packed 4-bit parameters (Forge's nf4/fp4 Flux) keep it in
    ``quant_state.shape``; Forge's GGUF parameters report it as ``.shape`` already."""
    qs = getattr(param, "quant_state", None)
    return tuple(getattr(qs, "shape", None) or param.shape)


def _comment(p, text):
    log.warning("%s", text)
    if callable(getattr(p, "comment", None)):
        p.comment(text)


def _online_mode(sd_model):
    """Forge's rule (sd_forge_lora/networks.py): on-the-fly patches only for quantized (non-float) storage."""
    import torch
    try:
        from backend.args import dynamic_args
        online = dynamic_args.get("online_lora", False) if isinstance(dynamic_args, dict) else \
            getattr(dynamic_args, "online_lora", False)
        dtype = sd_model.forge_objects.unet.model.storage_dtype
    except Exception:
        return False
    return bool(online) and dtype not in (torch.float32, torch.float16, torch.bfloat16)


if IS_FORGE:
    class ForgeSdToolkitLora(extra_networks.ExtraNetwork):
        """``<sdtlora:...>`` on Forge: activate() resolves the patches; the Script below adds them to the patchers."""

        def __init__(self, wrap):
            super().__init__("sdtlora")
            self.wrap = wrap
            self.registry = None
            self._nets = NetworkCache(CACHE_SIZE)
            self._keys = (None, None, None)

        def _lora_dirs(self):
            from modules import paths
            opts = shared.cmd_opts
            return [getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"),
                    *(getattr(opts, "lora_dirs", None) or [])]

        def _network(self, entry, arch):
            return self._nets.get(entry.path, arch, entry.name, on_load=_report_unmatched)

        def _key_maps(self, sd_model):
            """(kohya name -> UNet parameter, kohya name -> CLIP parameter, parameter shapes), from Forge's own maps."""
            from backend.patcher.lora import model_lora_keys_clip, model_lora_keys_unet
            fo = sd_model.forge_objects_original
            ident = (id(fo.unet.model), id(fo.clip.cond_stage_model))
            if self._keys[0] != ident:
                unet_keys = key_map_of(model_lora_keys_unet, fo.unet.model)
                clip_keys = key_map_of(model_lora_keys_clip, fo.clip.cond_stage_model)
                shapes = {k: _shape(v) for k, v in fo.unet.model.named_parameters()}
                shapes.update({k: _shape(v) for k, v in fo.clip.cond_stage_model.named_parameters()})
                self._keys = (ident, (unet_keys, clip_keys), shapes)
            return self._keys[1][0], self._keys[1][1], self._keys[2]

        def activate(self, p, params_list):
            p.sdtoolkit_forge_patches = []
            if not params_list:
                return
            sd_model = getattr(p, "sd_model", None) or shared.sd_model
            arch = _arch_of(sd_model, lambda: self._key_maps(sd_model)[2])
            if arch is None:
                _comment(p, "SD Toolkit LoRA: <sdtlora:...> supports SD1, SD2, SDXL and Flux.1 models; this model "
                            f"is {type(sd_model).__name__} - use Forge's <lora:...>")
                return
            if self.registry is None:
                self.registry = LoraRegistry(self._lora_dirs())
            presets = load_user_presets(getattr(shared.opts, "sdtoolkit_lbw_presets", None))
            unet_keys, clip_keys, shapes = self._key_maps(sd_model)
            applied = []
            for params in params_list:
                req = request_from_params(ExtraNetworkParams.from_items(list(params.items)), self.name)
                if req is None:
                    continue
                for w in req.warnings:
                    _comment(p, w)
                entry = self.registry.find(req.name)
                if entry is None:
                    self.registry.refresh()
                    entry = self.registry.find(req.name)
                if entry is None:
                    _comment(p, f"{req.tag}: no LoRA named {req.name!r}; generation goes on without it")
                    continue
                try:
                    net = self._network(entry, arch)
                    bw = resolve_block_weights(req.lbw, arch, presets)
                except (SdToolkitError, OSError) as e:
                    _comment(p, f"{req.tag}: {e}; generation goes on without it")
                    continue
                a = ActiveNetwork(net, req.te, req.unet, req.dyn, bw, req.start, req.stop)
                missing = unavailable_options(a)
                if missing:
                    _comment(p, UNAVAILABLE_OPTIONS_NOTE.format(opts=", ".join(missing), tag=req.tag))
                ps = build_patches(a, arch, unet_keys, clip_keys, shapes.get)
                if not ps.unet and not ps.clip:
                    _comment(p, f"{req.tag}: {ps.refused}; nothing applied" if ps.refused else
                             f"{req.tag}: no layer of this LoRA matches the loaded model; nothing applied")
                    continue
                skipped = net.not_applied() + [(m, UNKNOWN_TARGET) for m in ps.unmatched]
                if skipped:  # applies partly: which modules are left out and why, under the image as on A1111
                    _comment(p, partly_text(net.name, len(net.layers) + len(net.unmatched) + len(net.unknown_type),
                                            skipped))
                p.sdtoolkit_forge_patches.append(ps)
                applied.append(f"{net.name}: {a.te:g}/{a.unet:g}")
            if applied:
                p.extra_generation_params["SD Toolkit Lora"] = ", ".join(applied)

        def deactivate(self, p):
            pass

        def add_to(self, p, which):
            """Add our patch sets to clones of ``p.sd_model.forge_objects.<which>`` (idempotent)."""
            sets = getattr(p, "sdtoolkit_forge_patches", None)
            if not sets:
                return
            sd_model = p.sd_model
            obj = getattr(sd_model.forge_objects, which)
            new = add_patch_sets(obj, obj.patcher if which == "clip" else obj, sets, which, self.wrap,
                                 online=lambda: _online_mode(sd_model))
            if new is not None:
                setattr(sd_model.forge_objects, which, new)

    network = None
    _KIND, _WRAP = _patch_value_factory()

    def _register():
        global network
        if _KIND is None:
            log.warning("SD Toolkit LoRA: <sdtlora:...> is unavailable on this Forge: %s", _WRAP)
            return
        network = ForgeSdToolkitLora(_WRAP)
        extra_networks.register_extra_network(network)
        log.info("SD Toolkit LoRA: <sdtlora:...> goes through Forge's LoRA patcher (%s); lbw= works, start=/stop= "
                 "are not available on Forge", _KIND)

    script_callbacks.on_before_ui(_register)

    class SdToolkitForgeLoraScript(scripts.Script):
        """Adds the ``<sdtlora>`` patches at the points where Forge's objects are final for a pass (no UI)."""

        def title(self):
            return "SD Toolkit LoRA (Forge)"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return []

        def after_extra_networks_activate(self, p, *args, **kwargs):
            if network is not None:
                network.add_to(p, "clip")   # hires pass: its conds are computed right after the activation

        def process_batch(self, p, *args, **kwargs):
            if network is not None:
                network.add_to(p, "clip")   # first pass: Forge reset forge_objects after the activation

        def process_before_every_sampling(self, p, *args, **kwargs):
            if network is not None:
                network.add_to(p, "unet")
