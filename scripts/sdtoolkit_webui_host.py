"""WebUI glue shared by the toolkit's WebUI scripts: the Host over the WebUI's folders and its loaded model.

The WebUI executes every scripts/*.py as an unimportable module, so the scripts that need this file load it by
path (see their `_webui_glue()`); executed on its own it only defines functions and registers nothing.
"""
import importlib.util

from modules import paths, script_callbacks, shared

import lib_sdtoolkit.host as sdt_host


def _refresh_checkpoints():
    from modules import sd_models
    sd_models.list_models()


def _refresh_vae():
    from modules import sd_vae
    sd_vae.refresh_vae_list()


# ---- the loaded model, for the Merge tab's in-memory merge (A1111 only: Forge changes weights via its patchers) ----
def _queue_lock():
    try:
        from modules.call_queue import queue_lock  # generations hold it; weights must not change under them
        return queue_lock
    except ImportError:
        return None


def _loaded_model():
    from modules import sd_models
    data = getattr(sd_models, "model_data", None)  # shared.sd_model would load a model when none is loaded
    return data.sd_model if data is not None else getattr(shared, "sd_model", None)


def _begin_change(model):
    from modules import sd_hijack
    lock = _queue_lock()
    if lock is not None:
        lock.acquire()
    try:
        sd_hijack.model_hijack.undo_hijack(model)  # checkpoint key names again, as before load_model_weights
        for m in model.modules():  # what the Lora extension does when weights are loaded: its backups are stale now
            if hasattr(m, "network_current_names"):
                m.network_current_names, m.network_weights_backup, m.network_bias_backup = (), None, None
    except BaseException:
        if lock is not None:
            lock.release()
        raise


# ---- the merged model's name in the WebUI: the sd_model_checkpoint option and the checkpoint list -------------
#: attribute marking a checkpoint_info stand-in for an in-memory merge
MERGE_MARK = "sdtoolkit_in_memory_merge"


def _register_merge_title(ci):
    """Make the stand-in resolvable as A1111 resolves the option (checkpoints_list by title, checkpoint_aliases by
    id): every generation runs ``reload_model_weights()`` -> ``select_checkpoint()`` on the option, and an unknown
    title would make it load the first listed checkpoint instead."""
    from modules import sd_models
    sd_models.checkpoints_list[ci.title] = ci
    aliases = getattr(sd_models, "checkpoint_aliases", None)
    if aliases is not None:
        for i in ci.ids:
            aliases[i] = ci


def forget_merge_titles(keep=None):
    """Drop every in-memory-merge stand-in but ``keep`` from the checkpoint list and aliases."""
    from modules import sd_models
    for d in (sd_models.checkpoints_list, getattr(sd_models, "checkpoint_aliases", None) or {}):
        for k, v in list(d.items()):
            if getattr(v, MERGE_MARK, False) and v is not keep:
                del d[k]


def keep_merge_title(model):
    """Before a generation: if the loaded model holds an in-memory merge whose title the option names but a refresh
    of the checkpoint list dropped, register it again (else the WebUI would load a fallback checkpoint)."""
    from modules import sd_models
    ci = getattr(model, "sd_checkpoint_info", None)
    if not getattr(ci, MERGE_MARK, False):
        return
    if sd_models.checkpoints_list.get(ci.title) is not ci and shared.opts.data.get("sd_model_checkpoint") == ci.title:
        _register_merge_title(ci)


def on_model_loaded(model):
    """Other weights were loaded: a merge stand-in left in the list would name a model that is gone."""
    ci = getattr(model, "sd_checkpoint_info", None)
    forget_merge_titles(keep=ci if getattr(ci, MERGE_MARK, False) else None)


def _end_change(model, info):
    import copy
    from modules import sd_hijack, sd_vae
    lock = _queue_lock()
    try:
        sd_hijack.model_hijack.hijack(model)
        if info is None:
            return
        # a checkpoint_info stand-in (as supermerger does): the merge's name and the sha256 of its metadata, the
        # loaded file's filename (so selecting that checkpoint again does not reload it). A1111 names the model it
        # loads in the sd_model_checkpoint option (load_model_weights writes the title there): so does the merge,
        # with the stand-in registered under that title so the option resolves to the loaded weights.
        ci = copy.copy(model.sd_checkpoint_info)
        ci.name, ci.name_for_extra, ci.model_name = info["name"] + ".safetensors", info["name"], info["name"]
        ci.sha256, ci.shorthash, ci.metadata = info["sha256"], info["shorthash"], info["metadata"]
        ci.title = f"{ci.name} [{ci.shorthash}]"
        ci.short_title = f"{ci.name_for_extra} [{ci.shorthash}]"
        ci.ids = [ci.title, ci.short_title]
        setattr(ci, MERGE_MARK, True)
        model.sd_checkpoint_info, model.sd_model_hash = ci, ci.shorthash
        forget_merge_titles(keep=None)
        _register_merge_title(ci)
        shared.opts.data["sd_model_checkpoint"] = ci.title
        if getattr(sd_vae, "loaded_vae_file", None) and hasattr(sd_vae, "resolve_vae"):
            sd_vae.delete_base_vae()  # an external VAE was in use: put it back over the merged one
            sd_vae.clear_loaded_vae()
            vae_file, vae_source = sd_vae.resolve_vae(ci.filename)
            sd_vae.load_vae(model, vae_file, vae_source)
        script_callbacks.model_loaded_callback(model)
    finally:
        if lock is not None:
            lock.release()


def _reload(model, path):
    """Restore: the WebUI reloads the file (its load_model_weights names it in the option again); the merge's
    stand-in leaves the checkpoint list."""
    from modules import sd_models
    try:
        return sd_models.reload_model_weights(model, sd_models.CheckpointInfo(path), forced_reload=True)
    finally:
        on_model_loaded(model)


def model_hooks():
    if importlib.util.find_spec("modules_forge") is not None:
        return None
    return sdt_host.ModelHooks(
        get_model=_loaded_model,
        checkpoint_file=lambda m: getattr(m, "sd_model_checkpoint", None),
        identity=lambda m: getattr(m, "sd_checkpoint_info", None),
        begin_change=_begin_change, end_change=_end_change, reload=_reload)


def make_host():
    return sdt_host.webui_host_from(
        paths, shared.cmd_opts, shared.opts,
        refreshers={"checkpoint": _refresh_checkpoints, "vae": _refresh_vae},
        forge=importlib.util.find_spec("modules_forge") is not None,
        model_hooks=model_hooks(),
    )
