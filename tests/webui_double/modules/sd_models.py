"""Double of modules/sd_models.py: the checkpoint list (files under models/Stable-diffusion and --ckpt-dir)."""
import os

from modules import paths, shared

checkpoints_list = {}
model_dir = "Stable-diffusion"


def list_models():
    checkpoints_list.clear()
    dirs = [os.path.join(paths.models_path, model_dir), shared.cmd_opts.ckpt_dir]
    for d in dirs:
        if not d or not os.path.isdir(d):
            continue
        for root, _, files in os.walk(d):
            for fn in sorted(files):
                if fn.lower().endswith((".ckpt", ".safetensors")) and not fn.lower().endswith((".vae.ckpt", ".vae.safetensors")):
                    full = os.path.join(root, fn)
                    checkpoints_list[os.path.relpath(full, d)] = full
    return checkpoints_list
