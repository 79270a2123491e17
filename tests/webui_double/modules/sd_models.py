"""Double of modules/sd_models.py (A1111 1.10): the checkpoint list (files under models/Stable-diffusion and
--ckpt-dir) as ``checkpoints_list`` (title -> CheckpointInfo) and ``checkpoint_aliases`` (every id -> info), both
cleared and refilled by ``list_models``; ``select_checkpoint`` (the ``sd_model_checkpoint`` option looked up in the
aliases, else the first checkpoint, printing "not found; loading fallback"); loading weights writes the loaded
checkpoint's title into the ``sd_model_checkpoint`` option, as ``load_model_weights`` does."""
import os
import sys

from modules import paths, shared

checkpoints_list = {}
checkpoint_aliases = {}
model_dir = "Stable-diffusion"


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    dirs = [os.path.join(paths.models_path, model_dir), shared.cmd_opts.ckpt_dir]
    for d in dirs:
        if not d or not os.path.isdir(d):
            continue
        for root, _, files in os.walk(d):
            for fn in sorted(files):
                if fn.lower().endswith((".ckpt", ".safetensors")) and not fn.lower().endswith((".vae.ckpt", ".vae.safetensors")):
                    CheckpointInfo(os.path.join(root, fn)).register()
    return checkpoints_list


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def select_checkpoint():
    """The checkpoint the ``sd_model_checkpoint`` option names, else the first listed one (fallback)."""
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found")
    checkpoint_info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}", file=sys.stderr)
    return checkpoint_info


# ---- loading weights into the current model (A1111 1.10 sd_models.py, reference sections 2 and 5) -------------
class CheckpointInfo:
    """``name`` relative to the checkpoint folder, ``title`` = ``name [shorthash]`` when the sha256 is cached."""

    def __init__(self, filename):
        from modules import hashes

        self.filename = filename
        abspath = os.path.abspath(filename)
        model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir else None
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath.replace(ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.model_name, self.title, name, self.name_for_extra]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        self.metadata = {}

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):
        from modules import hashes

        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        if old_title in checkpoints_list:  # replace_key: the entry keeps its place under the new title
            items = [(self.title if k == old_title else k, v) for k, v in checkpoints_list.items()]
            checkpoints_list.clear()
            checkpoints_list.update(items)
        self.register()
        return self.shorthash


def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    return pl_sd


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    import safetensors.torch
    import torch

    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        pl_sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return get_state_dict_from_checkpoint(pl_sd)


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    """``load_state_dict(strict=False)`` (values cast into the model's own dtype), then the checkpoint attributes."""
    sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    model.load_state_dict(state_dict, strict=False)
    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """``info`` or the checkpoint the option names (:func:`select_checkpoint`); same-file early return unless
    ``forced_reload``; else undo the hijack, load the file's weights into the current model (which writes its title
    into the option), hijack again and fire the model-loaded callbacks."""
    from modules import script_callbacks, sd_hijack

    checkpoint_info = info or select_checkpoint()
    if not sd_model:
        sd_model = shared.sd_model
    if sd_model is not None and sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    sd_hijack.model_hijack.undo_hijack(sd_model)
    state_dict = read_state_dict(checkpoint_info.filename)
    load_model_weights(sd_model, checkpoint_info, state_dict)
    sd_hijack.model_hijack.hijack(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model
