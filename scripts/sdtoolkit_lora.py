"""WebUI adapter: the ``<lora:...>`` extra network backed by lib_sdtoolkit.lora (no maths here).

Coexistence with the WebUI's built-in Lora extension (``<lora:...>`` must act exactly once per generation):

* our network is always registered as ``sdtlora`` (``<sdtlora:name:te:unet:dyn:lbw=...:start=..:stop=..>``);
* it takes over ``lora`` (and the alias ``lyco``) only when nothing else has registered ``lora`` by the time the UI is
  built (``on_before_ui`` runs after the built-in's own callback) - i.e. when the built-in Lora extension is disabled.
  With the built-in enabled, ``<lora:...>`` stays the built-in's and we never touch it, so nothing is applied twice;
* on Forge (``modules_forge`` importable) the model's weights belong to Forge's patchers: we do not register a
  network at all there and say so in the log; use Forge's own Lora support. The toolkit tab (extract / bake /
  inspect) works on Forge as everywhere.

Block weights (``lbw=``) and ``start=``/``stop=`` step ranges work in both tags; step ranges are applied from an
``on_cfg_denoiser`` callback (only the layers of the networks switching on/off are rewritten).
"""
import logging
import os

from modules import extra_networks, script_callbacks, shared

from lib_sdtoolkit.errors import SdToolkitError
from lib_sdtoolkit.lora.apply import ActiveNetwork, LoraPatcher, ModelBinding
from lib_sdtoolkit.lora.blocks import load_user_presets, resolve_block_weights
from lib_sdtoolkit.lora.network import load_network
from lib_sdtoolkit.lora.registry import LoraRegistry
from lib_sdtoolkit.lora.syntax import ExtraNetworkParams, request_from_params

log = logging.getLogger("sdtoolkit.lora")

try:
    import modules_forge  # noqa: F401

    IS_FORGE = True
except ImportError:
    IS_FORGE = False


def _lora_dirs():
    opts = shared.cmd_opts
    models = getattr(__import__("modules.paths", fromlist=["models_path"]), "models_path", "models")
    return [getattr(opts, "lora_dir", None) or os.path.join(models, "Lora"), getattr(opts, "lyco_dir_backcompat", None)]


def _arch_of(sd_model):
    if getattr(sd_model, "is_sdxl", False):
        return "SDXL"
    if getattr(sd_model, "is_sd2", False):
        return "SD2"
    return "SD1"


class SdToolkitLora(extra_networks.ExtraNetwork):
    def __init__(self, name="sdtlora"):
        super().__init__(name)
        self.registry = None
        self.patcher = None
        self._model_id = None
        self._nets = {}
        self._ranged = False

    def _patcher_for(self, sd_model):
        if self._model_id != id(sd_model):
            if self.patcher is not None:
                self.patcher.restore_all()
            self.patcher = LoraPatcher(ModelBinding.from_checkpoint_module(sd_model, _arch_of(sd_model)))
            self._model_id = id(sd_model)
            self._nets.clear()
        return self.patcher

    def activate(self, p, params_list):
        sd_model = shared.sd_model
        if sd_model is None:
            return
        patcher = self._patcher_for(sd_model)
        if self.registry is None:
            self.registry = LoraRegistry(_lora_dirs())
        arch = _arch_of(sd_model)
        presets = load_user_presets(getattr(shared.opts, "sdtoolkit_lbw_presets", None))
        active = []
        for params in params_list:
            req = request_from_params(ExtraNetworkParams.from_items(list(params.items)), self.name)
            if req is None:
                continue
            for w in req.warnings:
                log.warning(w)
            entry = self.registry.find(req.name)
            if entry is None:
                self.registry.refresh()
                entry = self.registry.find(req.name)
            if entry is None:
                log.warning("%s: no LoRA named %r; generation goes on without it", req.tag, req.name)
                continue
            try:
                key = (str(entry.path), entry.path.stat().st_mtime, arch)
                net = self._nets.get(key)
                if net is None:
                    net = self._nets[key] = load_network(entry.path, arch, entry.name)
                    if net.unmatched:
                        log.info("%s", net.report())
                bw = resolve_block_weights(req.lbw, arch, presets)
            except (SdToolkitError, OSError) as e:
                log.warning("%s: %s; generation goes on without it", req.tag, e)
                continue
            active.append(ActiveNetwork(net, req.te, req.unet, req.dyn, bw, req.start, req.stop))
        self._ranged = any(a.start is not None or a.stop is not None for a in active)
        if self._ranged:
            patcher._step = 0
        else:
            patcher._step = None
        res = patcher.set_networks(active)
        for e in res.errors:
            log.warning("%s", e)
        if active:
            p.extra_generation_params["SD Toolkit Lora"] = ", ".join(f"{a.network.name}: {a.te:g}/{a.unet:g}"
                                                                     for a in active)

    def deactivate(self, p):
        pass  # weights stay patched until the next activate (same set again costs nothing)

    def on_cfg_denoiser(self, params):
        if self._ranged and self.patcher is not None:
            self.patcher.set_step(int(params.sampling_step))


network = SdToolkitLora("sdtlora")


def _register():
    if IS_FORGE:
        log.info("SD Toolkit: Forge detected; its LoRA patchers own the model weights, so <sdtlora:...> is not "
                 "registered there (use Forge's <lora:...>). The LoRA tab (extract/bake/inspect) works.")
        return
    extra_networks.register_extra_network(network)
    if "lora" not in extra_networks.extra_network_registry:
        lora = SdToolkitLora("lora")
        extra_networks.register_extra_network(lora)
        extra_networks.register_extra_network_alias(lora, "lyco")
        script_callbacks.on_cfg_denoiser(lora.on_cfg_denoiser)
        log.info("SD Toolkit: the built-in Lora extension is not active; <lora:...> is handled by SD Toolkit")


script_callbacks.on_before_ui(_register)
script_callbacks.on_cfg_denoiser(network.on_cfg_denoiser)
