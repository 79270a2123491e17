"""Double of modules/sd_vae.py: vae_dict (basename -> path) from models/VAE and --vae-dir."""
import glob
import os

from modules import paths, shared

vae_dict = {}


def refresh_vae_list():
    vae_dict.clear()
    dirs = [os.path.join(paths.models_path, "VAE"), shared.cmd_opts.vae_dir]
    for d in dirs:
        if not d or not os.path.isdir(d):
            continue
        for ext in ("*.ckpt", "*.pt", "*.safetensors"):
            for f in glob.glob(os.path.join(d, "**", ext), recursive=True):
                vae_dict[os.path.basename(f)] = f
    return vae_dict
