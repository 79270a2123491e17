"""WebUI adapter: the ``<lora:...>`` extra network backed by lib_sdtoolkit.lora (no maths here).

How it coexists with the WebUI's built-in Lora extension (``<lora:...>`` must act exactly once per generation):

* one network object, registered as ``sdtlora`` (``<sdtlora:name:te:unet:dyn:lbw=...:start=..:stop=..>``), in
  ``on_before_ui`` - which runs after the built-in's own ``on_before_ui`` (built-in extensions load first);
* built-in Lora extension disabled (nothing registered ``lora`` by then): the same object is also the alias of
  ``lora`` and ``lyco``, so ``<lora:...>``, ``<lyco:...>`` and ``<sdtlora:...>`` in one prompt reach one
  ``activate`` call and one set of patches. Weights are patched in place (exact restore, only changed layers
  rewritten, the same set again costs nothing);
* built-in enabled: ``<lora:...>``/``<lyco:...>`` stay the built-in's (we never see them, so nothing is applied
  twice) and only ``<sdtlora:...>`` is ours. The built-in merges its networks into the weights lazily, at each
  module's next forward, from a backup it takes the first time it merges; writing weights in place under it
  would get our delta copied into its backup (or wiped by its restore). So in that case our network runs in
  functional mode: forward hooks add Σ m·ΔW·x, no weight is written, and both extensions compose;
* Forge (``modules_forge`` importable): the model's weights belong to Forge's patchers, so nothing is registered
  here; scripts/sdtoolkit_forge_lora.py registers ``<sdtlora:...>`` through Forge's own LoRA patcher and Forge's
  ``<lora:...>`` stays Forge's. The toolkit tab (extract / bake / inspect) and the HTTP routes work on Forge as
  everywhere.

Weights changed by someone else after we patched them (a checkpoint loaded into the same model object) are
detected from the tensors' version counters and never "restored" over the new weights. On script unload (UI
reload) everything is restored.

Block weights (``lbw=``) and ``start=``/``stop=`` step ranges work in every tag we handle; step ranges are applied
from an ``on_cfg_denoiser`` callback (only the layers of the networks switching on/off are rewritten).

Infotext: where we handle ``<lora:...>`` (built-in disabled) we also write the built-in's ``Lora hashes: name:
shorthash, ...`` (name as mentioned in the prompt without ``:``/``,``; 12 hex of ``sshs_model_hash`` or the
addnet/AutoV3 hash; setting ``lora_add_hashes_to_infotext``, added with the built-in's default when it is absent),
so Civitai and PNG-info readers see the same field whichever extension applied the LoRA.
"""
import logging
import os

from modules import extra_networks, script_callbacks, shared

from lib_sdtoolkit.errors import SdToolkitError
from lib_sdtoolkit.lora.apply import ActiveNetwork, FunctionalLora, LoraPatcher, ModelBinding
from lib_sdtoolkit.lora.blocks import load_user_presets, resolve_block_weights
from lib_sdtoolkit.lora.network import load_network
from lib_sdtoolkit.lora.registry import LoraRegistry, network_shorthash
from lib_sdtoolkit.lora.syntax import ExtraNetworkParams, request_from_params

log = logging.getLogger("sdtoolkit.lora")

try:
    import modules_forge  # noqa: F401

    IS_FORGE = True
except ImportError:
    IS_FORGE = False

#: networks kept parsed in memory (by path + mtime), most recently used last
CACHE_SIZE = 8


def _lora_dirs():
    opts = shared.cmd_opts
    from modules import paths

    return [getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"),
            getattr(opts, "lyco_dir_backcompat", None)]


def _arch_of(sd_model):
    if getattr(sd_model, "is_sdxl", False):
        return "SDXL"
    if getattr(sd_model, "is_sd2", False):
        return "SD2"
    return "SD1"


class SdToolkitLora(extra_networks.ExtraNetwork):
    def __init__(self, name="sdtlora", functional=False):
        super().__init__(name)
        self.functional = functional
        self.registry = None
        self.patcher = None
        self._model_id = None
        self._nets = {}
        self._ranged = False
        self._hash_caches = None
        self._shorthashes = {}

    @property
    def mode(self):
        return "functional" if self.functional else "in-place"

    def _patcher_for(self, sd_model):
        if self._model_id != id(sd_model) or isinstance(self.patcher, LoraPatcher) == self.functional:
            self.unload()
            binding = ModelBinding.from_checkpoint_module(sd_model, _arch_of(sd_model))
            self.patcher = FunctionalLora(binding) if self.functional else LoraPatcher(binding)
            self._model_id = id(sd_model)
            self._nets.clear()
        return self.patcher

    def unload(self):
        """Undo everything (script unload / UI reload / model change)."""
        if isinstance(self.patcher, LoraPatcher):
            self.patcher.restore_all()
        elif isinstance(self.patcher, FunctionalLora):
            self.patcher.remove()
        self.patcher = None
        self._model_id = None

    def _network(self, entry, arch):
        key = (str(entry.path), entry.path.stat().st_mtime, arch)
        net = self._nets.pop(key, None)
        if net is None:
            net = load_network(entry.path, arch, entry.name)
            if net.unmatched or net.unknown_type:
                log.info("%s", net.report())
        self._nets[key] = net
        while len(self._nets) > CACHE_SIZE:
            self._nets.pop(next(iter(self._nets)))
        return net

    def activate(self, p, params_list):
        sd_model = shared.sd_model
        if sd_model is None:
            return
        if not params_list and self.patcher is None:
            return                      # nothing asked, nothing applied: no binding, no folder scan
        patcher = self._patcher_for(sd_model)
        if self.registry is None and params_list:
            self.registry = LoraRegistry(_lora_dirs())
        arch = _arch_of(sd_model)
        presets = load_user_presets(getattr(shared.opts, "sdtoolkit_lbw_presets", None))
        active = []
        mentioned = []
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
                net = self._network(entry, arch)
                bw = resolve_block_weights(req.lbw, arch, presets)
            except (SdToolkitError, OSError) as e:
                log.warning("%s: %s; generation goes on without it", req.tag, e)
                continue
            active.append(ActiveNetwork(net, req.te, req.unet, req.dyn, bw, req.start, req.stop))
            mentioned.append((req.name, entry, net.name))
        self._ranged = any(a.start is not None or a.stop is not None for a in active)
        patcher._step = 0 if self._ranged else None
        res = patcher.set_networks(active)
        for e in res.errors:
            log.warning("%s; generation goes on without it", e)
        if res.applied:
            p.extra_generation_params["SD Toolkit Lora"] = ", ".join(
                f"{a.network.name}: {a.te:g}/{a.unet:g}" for a in active if a.network.name in res.applied)
        if not self.functional and getattr(shared.opts, "lora_add_hashes_to_infotext", True):
            self._add_hashes(p, [(n, e) for n, e, net_name in mentioned if net_name in res.applied])

    def _add_hashes(self, p, applied):
        """The built-in's "Lora hashes" (extra_networks_lora.py): kept across the hires pass of one p."""
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        for name, entry in applied:
            short = self._shorthash(entry)
            if short and name:
                p.lora_hashes[name.translate(_NO_SEPARATORS)] = short
        if p.lora_hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())

    def _shorthash(self, entry):
        try:
            st = entry.path.stat()
        except OSError:
            return None
        key = (str(entry.path), st.st_size, st.st_mtime_ns)
        if key not in self._shorthashes:
            if self._hash_caches is None:
                self._hash_caches = _hash_caches()
            cache, webui = self._hash_caches
            try:
                short = network_shorthash(entry, cache, webui,
                                          compute=not getattr(shared.cmd_opts, "no_hashing", False))
            except (SdToolkitError, OSError) as e:
                log.warning("Lora hashes: %s", e)
                short = None
            if short is None:
                return None     # not cached: hashed when it becomes possible (e.g. the WebUI cached it)
            self._shorthashes[key] = short
        return self._shorthashes[key]

    def deactivate(self, p):
        pass  # weights stay patched until the next activate (the same set again costs nothing)

    def on_cfg_denoiser(self, params):
        if self._ranged and self.patcher is not None:
            self.patcher.set_step(int(params.sampling_step))


_NO_SEPARATORS = str.maketrans("", "", ":,")


def _hash_caches():
    """(our hash cache, the WebUI's hash cache); either None where it cannot be opened."""
    from modules import paths

    from lib_sdtoolkit.files.hash_cache import HashCache, WebUIHashCache

    try:
        cache = HashCache()
    except SdToolkitError as e:
        log.warning("SD Toolkit hash cache unavailable (%s); LoRA hashes are computed each time", e)
        cache = None
    return cache, WebUIHashCache.from_webui_env(paths.data_path)


network = None


def _register():
    global network
    if IS_FORGE:
        return  # scripts/sdtoolkit_forge_lora.py: <sdtlora> through Forge's patcher; <lora> is Forge's
    builtin = extra_networks.extra_network_registry.get("lora")
    if network is not None:
        network.unload()
    network = SdToolkitLora("sdtlora", functional=builtin is not None)
    extra_networks.register_extra_network(network)
    if builtin is None:
        if "lora_add_hashes_to_infotext" not in shared.opts.data_labels:   # normally the built-in's setting
            shared.opts.add_option("lora_add_hashes_to_infotext", shared.OptionInfo(
                True, "Add Lora hashes to infotext", section=("extra_networks", "Extra Networks")))
        extra_networks.register_extra_network_alias(network, "lora")
        extra_networks.register_extra_network_alias(network, "lyco")
        log.info("SD Toolkit: the built-in Lora extension is not active; <lora:...> and <lyco:...> are handled by "
                 "SD Toolkit (in-place patching)")
    else:
        log.info("SD Toolkit: the built-in Lora extension handles <lora:...>; SD Toolkit handles <sdtlora:...> in "
                 "functional mode (forward hooks) so the two never write the same weights")


def _on_cfg_denoiser(params):
    if network is not None:
        network.on_cfg_denoiser(params)


def _on_unloaded():
    if network is not None:
        network.unload()


script_callbacks.on_before_ui(_register)
script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
script_callbacks.on_script_unloaded(_on_unloaded)
