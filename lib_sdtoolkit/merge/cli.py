"""``python -m lib_sdtoolkit merge A B [C] -o OUT ...``"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from . import methods as merge_methods

if TYPE_CHECKING:
    from .recipe import MergeRecipe


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "merge", help="merge checkpoints (weighted sum, add difference, block weighted, TIES, DARE)",
        description="Merge two or three checkpoints, streaming key by key (peak memory: a few tensors). "
                    "M (--alpha) is the share of B.",
        epilog="methods:\n" + "\n".join("  " + line for line in merge_methods.summary_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="A B [C]")
    p.add_argument("-o", "--output", required=True, help="output file (.safetensors or .ckpt)")
    p.add_argument("--method", default="weighted_sum", choices=merge_methods.names())
    p.add_argument("--alpha", type=float, default=0.5, help="M, the share of B (default 0.5)")
    p.add_argument("--beta", type=float, default=None,
                   help=merge_methods.beta_help())
    p.add_argument("--blocks", default=None, help='per-block M: "v1,...,v25" (SD1/SD2; 26 with BASE first) or 19/20 '
                                                  "values (SDXL)")
    p.add_argument("--blocks-beta", default=None, help="per-block beta, same form as --blocks")
    p.add_argument("--base-alpha", type=float, default=None, help="M for keys outside the UNet when using blocks")
    p.add_argument("--preset", default=None, help="a named MBW preset (GRAD_V, FLAT_25, WRAP08, ...)")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--keep-ema", action="store_true", help="keep model_ema.* keys (dropped by default)")
    p.add_argument("--fix-position-ids", action="store_true",
                   help="write CLIP position_ids as arange(77) int64 (default: kept from A)")
    p.add_argument("--bake-vae", default=None, metavar="FILE", help="replace first_stage_model.* from a VAE file")
    p.add_argument("--discard", default=None, metavar="REGEX", help="leave out keys matching this regex")
    seeded = ", ".join(m.name for m in merge_methods.REGISTRY.values() if m.seeded)
    p.add_argument("--seed", type=int, default=0, help=f"seed for {seeded} (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow ratios outside [0, 1]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-metadata", action="store_true", help="do not hash the inputs nor record the recipe")
    p.add_argument("--workers", type=int, default=None, help="worker threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=handler)


def recipe_from_args(args: argparse.Namespace) -> "MergeRecipe":
    from .recipe import MergeRecipe  # here, not at the top: the recipe imports torch, --help must not

    models = list(args.models)
    if not 2 <= len(models) <= 3:
        raise InvalidInputError(f"merge takes 2 or 3 models (A B [C]), got {len(models)}")
    return MergeRecipe(
        model_a=models[0], model_b=models[1], model_c=models[2] if len(models) > 2 else None,
        method=args.method, alpha=args.alpha, beta=args.beta, blocks=args.blocks, blocks_beta=args.blocks_beta,
        base_alpha=args.base_alpha, preset=args.preset, dtype=args.dtype, keep_ema=args.keep_ema,
        fix_position_ids=args.fix_position_ids, bake_vae=args.bake_vae, discard=args.discard, seed=args.seed,
        allow_extrapolation=args.allow_extrapolation, device=args.device, save_metadata=not args.no_metadata)


def _tqdm_progress(desc: str = "merging", unit: str = "key"):
    from tqdm import tqdm

    state: dict = {}

    def progress(done: int, total: int, key: str) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr,
                                      leave=False, disable=None)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


def handler(args: argparse.Namespace) -> int:
    from .engine import merge_files

    recipe = recipe_from_args(args)
    report = merge_files(recipe, args.output, overwrite=args.overwrite, progress=_tqdm_progress(),
                         workers=args.workers, hash_progress=_tqdm_progress("hashing inputs", "B"))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0
