"""Double of modules/cmd_args.py: the WebUI's own flags that extensions read (a subset, same names/defaults)."""
import argparse
import os

from modules.paths_internal import data_path, models_path


def make_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("-f", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=str, default=data_path)
    parser.add_argument("--models-dir", type=str, default=None)
    parser.add_argument("--ckpt-dir", type=str, default=None)
    parser.add_argument("--vae-dir", type=str, default=None)
    parser.add_argument("--vae-path", type=str, default=None)
    parser.add_argument("--embeddings-dir", type=str, default=os.path.join(data_path, "embeddings"))
    parser.add_argument("--hypernetwork-dir", type=str, default=os.path.join(models_path, "hypernetworks"))
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-prepare-environment", action="store_true")
    parser.add_argument("--api", action="store_true")
    parser.add_argument("--api-auth", type=str, default=None)
    parser.add_argument("--nowebui", action="store_true")
    parser.add_argument("--listen", action="store_true")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--server-name", type=str, default=None)
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--enable-insecure-extension-access", action="store_true")
    parser.add_argument("--xformers", action="store_true")
    parser.add_argument("--no-half", action="store_true")
    parser.add_argument("--no-half-vae", action="store_true")
    parser.add_argument("--medvram", action="store_true")
    parser.add_argument("--lowvram", action="store_true")
    parser.add_argument("--use-cpu", nargs="+", default=[])
    parser.add_argument("--disable-all-extensions", action="store_true")
    parser.add_argument("--disable-extra-extensions", action="store_true")
    parser.add_argument("--skip-load-model-at-start", action="store_true")
    parser.add_argument("--no-hashing", action="store_true")
    return parser


parser = make_parser()
