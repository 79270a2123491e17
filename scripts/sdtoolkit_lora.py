"""WebUI adapter: the ``<lora:...>`` extra network backed by lib_sdtoolkit.lora (no maths here).

How it coexists with the WebUI's built-in Lora extension (``<lora:...>`` must act exactly once per generation):

* one network object, registered as ``sdtlora`` (``<sdtlora:name:te:unet:dyn:lbw=...:start=..:stop=..>``) in
  ``on_before_ui``, and as the alias of ``lora`` and ``lyco`` where no one holds those names yet. The WebUI runs
  ``on_before_ui`` callbacks in REVERSE registration order, so ours runs BEFORE the built-in Lora extension's
  (built-in extensions load first); the built-in's ``register_extra_network('lora')`` then takes precedence over
  our alias (the registry wins over aliases) and its ``lyco`` alias replaces ours. Nothing is decided at
  registration: which mode we run in is decided at every activation from the real state of the built-in;
* built-in Lora extension not active (no one else registered ``lora``): ``<lora:...>``, ``<lyco:...>`` and
  ``<sdtlora:...>`` in one prompt reach one ``activate`` call and one set of patches. Weights are patched in place
  (exact restore, only changed layers rewritten, the same set again costs nothing). We then also provide what the
  built-in would: its "Lora" extra-networks page (cards inserting ``<lora:alias:weight>``) and its API routes
  ``GET /sdapi/v1/loras`` / ``POST /sdapi/v1/refresh-loras`` (same JSON);
* built-in active: ``<lora:...>``/``<lyco:...>`` are the built-in's (we never see them) and only ``<sdtlora:...>``
  is ours. The built-in merges its networks into the weights lazily, at each module's next forward, from a CPU
  backup it keeps, and restores from that backup; writing weights in place under it would be wiped by its restore
  (or copied into its backup). So our network runs as forward hooks: out + Σ m·ΔW·x with LoRA factors only
  (``up(down(x))``, no full ΔW kept), no weight written, and the two extensions compose;
* a network that cannot be found is reported with the tag the user wrote, in the console and where the WebUI
  shows extra-network errors (``sd_hijack.model_hijack.comments``, shown under the image): the built-in's
  ``Lora not found: name`` for ``<lora>``/``<lyco>``, ``SD Toolkit Lora not found: name`` for ``<sdtlora>``;
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
import json
import logging
import os
import sqlite3

from modules import extra_networks, script_callbacks, shared

from lib_sdtoolkit.errors import ArchitectureError, SdToolkitError
from lib_sdtoolkit.lora.apply import ActiveNetwork, FunctionalLora, LoraPatcher, ModelBinding, loaded_architecture
from lib_sdtoolkit.lora.blocks import load_user_presets, resolve_block_weights
from lib_sdtoolkit.lora.network import NetworkCache
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
    """The loaded model's architecture by the library's detector (names and shapes of its parameters): the WebUI
    sets ``is_sdxl`` for the SDXL refiner too, whose UNet and text encoder need their own name table and blocks.
    The WebUI's flags only where the detector recognises nothing."""
    arch = loaded_architecture(sd_model.named_parameters())
    if arch is not None:
        return arch
    if getattr(sd_model, "is_sdxl", False):
        return "SDXL"
    if getattr(sd_model, "is_sd2", False):
        return "SD2"
    return "SD1"


def _builtin_network():
    """The network someone else registered as ``lora`` (the built-in Lora extension), or None: read at every
    activation, it is the real state, whatever order the ``on_before_ui`` callbacks ran in."""
    reg = extra_networks.extra_network_registry.get("lora")
    return reg if reg is not None and reg is not network else None


def _builtin_loaded():
    """Whether the built-in Lora extension's script is loaded in this run of the scripts (its ``on_before_ui``
    callback is registered): known before its ``on_before_ui`` has run, which is after ours."""
    for c in script_callbacks.callback_map.get("callbacks_before_ui", []):
        parts = os.path.normpath(str(getattr(c, "script", ""))).split(os.sep)
        if len(parts) >= 4 and parts[-4:-1] == ["extensions-builtin", "Lora", "scripts"]:
            return True
    return False


def _registry():
    global _lora_registry
    if _lora_registry is None:
        _lora_registry = LoraRegistry(_lora_dirs())
    return _lora_registry


_lora_registry = None


def _tags_by_params(p):
    """id(params) -> the tag name the user wrote (``lora``, ``lyco``, ``sdtlora``): the WebUI hands one merged list
    to the network registered under several names, but keeps the parsed prompt's ``{tag: [params...]}`` on p."""
    out = {}
    for attr in ("extra_network_data", "hr_extra_network_data"):
        data = getattr(p, attr, None)
        if isinstance(data, dict):
            for tag, lst in data.items():
                for prm in lst or []:
                    out.setdefault(id(prm), tag)
    return out


def _report_not_found(missing):
    """Where the WebUI shows extra-network errors: the built-in's ``Lora not found: a, b`` comment (shown under the
    image) for <lora>/<lyco>, ours for <sdtlora>; console/gradio warnings per the built-in's settings."""
    from modules import sd_hijack

    lora = [n for tag, n in missing if tag != "sdtlora"]
    ours = [n for tag, n in missing if tag == "sdtlora"]
    for names, label in ((lora, "Lora"), (ours, "SD Toolkit Lora")):
        if not names:
            continue
        msg = f"{label} not found: {', '.join(names)}"
        sd_hijack.model_hijack.comments.append(msg)
        if getattr(shared.opts, "lora_not_found_gradio_warning", False):
            try:
                import gradio as gr

                gr.Warning(msg)
            except Exception:  # noqa: BLE001 - outside a gradio request there is no one to warn
                pass



def _report_unmatched(net):
    """Layers of a LoRA that matched nothing in this model, or of a type we do not apply: said once per load."""
    if net.unmatched or net.unknown_type:
        log.info("%s", net.report())

class SdToolkitLora(extra_networks.ExtraNetwork):
    def __init__(self, name="sdtlora", functional=False):
        super().__init__(name)
        self.functional = functional
        self.patcher = None
        self._model_id = None
        self._nets = NetworkCache(CACHE_SIZE)
        self._ranged = False
        self._hash_caches = None
        self._shorthashes = {}
        self._logged_mode = None

    @property
    def registry(self):
        return _registry()

    @property
    def mode(self):
        return "functional" if self.functional else "in-place"

    def _decide_mode(self):
        """Functional (forward hooks) while another extension owns ``<lora>`` (the built-in merges into the weights
        lazily and restores them from its own backup), in place otherwise."""
        self.functional = _builtin_network() is not None
        if self._logged_mode != self.mode:
            self._logged_mode = self.mode
            if self.functional:
                log.info("SD Toolkit: the built-in Lora extension handles <lora:...>; SD Toolkit handles "
                         "<sdtlora:...> as forward hooks (LoRA factors only, no weight written)")
            else:
                log.info("SD Toolkit: no built-in Lora extension is active; <lora:...>, <lyco:...> and "
                         "<sdtlora:...> are handled by SD Toolkit (in-place patching, exact restore)")

    def _patcher_for(self, sd_model):
        if self._model_id != id(sd_model) or isinstance(self.patcher, LoraPatcher) == self.functional:
            self.unload()
            binding = ModelBinding.from_checkpoint_module(sd_model, _arch_of(sd_model))
            # in place: the originals are read back from the checkpoint file the WebUI loaded (checked per tensor),
            # else spilled to a temp file - no second copy of the touched weights in memory
            source = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)
            self.patcher = FunctionalLora(binding) if self.functional else LoraPatcher(binding, source=source)
            self._model_id = id(sd_model)
            self._nets.clear()
        return self.patcher

    def unload(self):
        """Undo everything (script unload / UI reload / model change)."""
        if isinstance(self.patcher, LoraPatcher):
            self.patcher.close()
        elif isinstance(self.patcher, FunctionalLora):
            self.patcher.remove()
        self.patcher = None
        self._model_id = None

    def _network(self, entry, arch):
        return self._nets.get(entry.path, arch, entry.name, on_load=_report_unmatched)

    def activate(self, p, params_list):
        sd_model = shared.sd_model
        if sd_model is None:
            return
        if not params_list and self.patcher is None:
            return                      # nothing asked, nothing applied: no binding, no folder scan
        self._decide_mode()
        patcher = self._patcher_for(sd_model)
        arch = _arch_of(sd_model)
        presets = load_user_presets(getattr(shared.opts, "sdtoolkit_lbw_presets", None))
        tags = _tags_by_params(p) if params_list else {}
        active = []
        mentioned = []
        missing = []
        for params in params_list:
            tag = tags.get(id(params), self.name)
            req = request_from_params(ExtraNetworkParams.from_items(list(params.items)), tag)
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
                missing.append((tag, req.name))
                continue
            try:
                net = self._network(entry, arch)
                bw = resolve_block_weights(req.lbw, arch, presets)
            except (SdToolkitError, OSError) as e:
                log.warning("%s: %s; generation goes on without it", req.tag, e)
                if isinstance(e, ArchitectureError):   # e.g. a Flux.1 LoRA on an SD model: say so under the image
                    from modules import sd_hijack

                    sd_hijack.model_hijack.comments.append(f"{req.tag}: {e}")
                continue
            active.append(ActiveNetwork(net, req.te, req.unet, req.dyn, bw, req.start, req.stop))
            mentioned.append((req.name, entry, net.name))
        if missing:
            _report_not_found(missing)
        self._ranged = any(a.start is not None or a.stop is not None for a in active)
        patcher._step = 0 if self._ranged else None
        res = patcher.set_networks(active)
        for e in res.errors:
            log.warning("%s; generation goes on without it", e)
        if res.warnings:  # a LoRA that applies partly: which modules are left out and why, under the image
            from modules import sd_hijack

            sd_hijack.model_hijack.comments.extend(res.warnings)
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
            except (SdToolkitError, OSError, sqlite3.Error) as e:   # the infotext field is a convenience
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
#: our "Lora" extra-networks page, registered only where the built-in Lora extension is not loaded
page = None


def _register():
    global network, page
    if IS_FORGE:
        return  # scripts/sdtoolkit_forge_lora.py: <sdtlora> through Forge's patcher; <lora> is Forge's
    if network is not None:
        network.unload()
    network = SdToolkitLora("sdtlora")
    extra_networks.register_extra_network(network)
    # aliases only where no one holds the name: the built-in's before_ui runs after ours and takes "lora" (as a
    # registered network, which wins over an alias) and "lyco"; were it to run first, we leave its names alone
    for alias in ("lora", "lyco"):
        if alias not in extra_networks.extra_network_registry and alias not in extra_networks.extra_network_aliases:
            extra_networks.register_extra_network_alias(network, alias)
    if "lora_add_hashes_to_infotext" not in shared.opts.data_labels:   # normally the built-in's setting
        shared.opts.add_option("lora_add_hashes_to_infotext", shared.OptionInfo(
            True, "Add Lora hashes to infotext", section=("extra_networks", "Extra Networks")))
    page = None
    if not _builtin_loaded() and _builtin_network() is None:
        try:
            from modules import ui_extra_networks

            page = _make_page(ui_extra_networks)
            ui_extra_networks.register_page(page)
        except ImportError as e:
            log.warning("SD Toolkit: no Lora cards page (%s)", e)


def _on_app_started(demo, app):
    """The built-in's ``GET /sdapi/v1/loras`` and ``POST /sdapi/v1/refresh-loras`` where it is not there."""
    if IS_FORGE or network is None or _builtin_network() is not None or _builtin_loaded():
        return
    if any(getattr(r, "path", None) == "/sdapi/v1/loras" for r in getattr(app, "routes", [])):
        return
    @app.get("/sdapi/v1/loras")
    async def get_loras():
        return [_lora_json(e) for e in _registry().entries]

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        _registry().refresh()
        return None


def _webui_metadata(entry):
    """The metadata as the WebUI reads it (``read_metadata_from_safetensors``): values starting with ``{`` are
    decoded JSON."""
    out = {}
    for k, v in entry.metadata.items():
        out[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


def _lora_json(entry):
    """One item of the built-in's ``GET /sdapi/v1/loras``: name (file stem), alias (``ss_output_name`` or the
    name), path, metadata."""
    return {"name": entry.name, "alias": entry.alias or entry.name, "path": str(entry.path),
            "metadata": _webui_metadata(entry)}


def _alias_for_prompt(entry):
    """The built-in's ``NetworkOnDisk.get_alias()``: the file name where the setting asks for it or the alias is
    ambiguous (two files with one ``ss_output_name``) or forbidden, else the alias."""
    alias = entry.alias or entry.name
    if getattr(shared.opts, "lora_preferred_name", "Alias from file") == "Filename" or \
            alias.lower() in ("none", "addams"):
        return entry.name
    if alias != entry.name and sum(1 for e in _registry().entries if (e.alias or e.name) == alias) > 1:
        return entry.name
    return alias


def _make_page(ui_extra_networks):
    """The built-in's "Lora" extra-networks page (cards tab) over our registry: each card inserts
    ``<lora:ALIAS:preferred weight or opts.extra_networks_default_multiplier>`` and its activation text."""
    quote_js = ui_extra_networks.quote_js

    class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
        def __init__(self):
            super().__init__("Lora")
            self.allow_negative_prompt = True

        def refresh(self):
            _registry().refresh()

        def create_item(self, name, index=None, enable_filter=True):
            entry = next((e for e in _registry().entries if e.name == name), None)
            if entry is None:
                return None
            path = os.path.splitext(str(entry.path))[0]
            search_terms = [self.search_terms_from_path(str(entry.path))]
            if entry.hash:
                search_terms.append(entry.hash)
            ver = entry.metadata.get("ss_base_model_version", "")
            sd_version = ("SDXL" if ver.startswith("sdxl_") else "SD2" if entry.metadata.get("ss_v2") == "True"
                          else "SD1" if entry.metadata else "Unknown")
            item = {
                "name": name,
                "filename": str(entry.path),
                "shorthash": (entry.hash or "")[:12],
                "preview": self.find_preview(path),
                "description": self.find_description(path),
                "search_terms": search_terms,
                "local_preview": f"{path}.{shared.opts.samples_format}",
                "metadata": _webui_metadata(entry),
                "sort_keys": {"default": index, **self.get_sort_keys(str(entry.path))},
                "sd_version": sd_version,
            }
            self.read_user_metadata(item)
            activation_text = item["user_metadata"].get("activation text")
            preferred_weight = item["user_metadata"].get("preferred weight", 0.0)
            item["prompt"] = (quote_js(f"<lora:{_alias_for_prompt(entry)}:") + " + "
                              + (str(preferred_weight) if preferred_weight else "opts.extra_networks_default_multiplier")
                              + " + " + quote_js(">"))
            if activation_text:
                item["prompt"] += " + " + quote_js(" " + activation_text)
            item["negative_prompt"] = quote_js(item["user_metadata"].get("negative text", ""))
            return item

        def list_items(self):
            for index, entry in enumerate(list(_registry().entries)):
                item = self.create_item(entry.name, index)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return [d for d in _lora_dirs() if d]

    return ExtraNetworksPageLora()


def _on_cfg_denoiser(params):
    if network is not None:
        network.on_cfg_denoiser(params)


def _on_unloaded():
    if network is not None:
        network.unload()


script_callbacks.on_before_ui(_register)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
script_callbacks.on_script_unloaded(_on_unloaded)
