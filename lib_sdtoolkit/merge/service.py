"""Merging through a Host: what the Merge tab and ``POST /sdtoolkit/v1/merge`` share.

Model names are resolved with ``host.resolve`` (only files under the configured model folders), the output goes to
``host.output_dir("checkpoint")`` under a plain file name, and ``host.refresh("checkpoint")`` runs afterwards so the
WebUI lists the new file. Both faces call :func:`merge_for_host`, so they produce the same file from the same body.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..errors import InvalidInputError
from ..validate import check_path_text
from .engine import Progress, merge_files
from .recipe import MergeRecipe

_BAD_NAME = re.compile(r"[\\/\x00]|^\.|\.\.")
OUTPUT_SUFFIXES = (".safetensors", ".ckpt")


def default_output_name(recipe: MergeRecipe) -> str:
    stem = lambda p: Path(p).stem if p else ""  # noqa: E731
    parts = [stem(recipe.model_a), stem(recipe.model_b)] + ([stem(recipe.model_c)] if recipe.model_c else [])
    tag = recipe.preset or (f"{recipe.alpha:g}")
    return f"{'_'.join(parts)}_{recipe.method}_{tag}.safetensors"


def output_path(host: Any, name: Optional[str], recipe: MergeRecipe) -> Path:
    """A plain file name inside the host's checkpoint output folder (no folders, no ``..``)."""
    name = (name or "").strip() or default_output_name(recipe)
    check_path_text(name, "output name")
    if _BAD_NAME.search(name):
        raise InvalidInputError(f"output name {name!r} must be a plain file name (no folders, no '..')")
    if not name.lower().endswith(OUTPUT_SUFFIXES):
        name += ".safetensors"
    folder = Path(host.output_dir("checkpoint"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def recipe_for_host(host: Any, body: Mapping[str, Any]) -> MergeRecipe:
    """Build a recipe from a JSON-like body whose model fields are names under the host's folders."""
    data = dict(body)
    data.pop("output", None)
    data.pop("overwrite", None)
    data.pop("in_memory", None)
    recipe = MergeRecipe.from_dict(data)
    a = str(host.resolve(recipe.model_a, "checkpoint"))
    b = str(host.resolve(recipe.model_b, "checkpoint")) if recipe.model_b else None
    c = str(host.resolve(recipe.model_c, "checkpoint")) if recipe.model_c else None
    vae = str(host.resolve(recipe.bake_vae, "vae")) if recipe.bake_vae else None
    return recipe.with_models(a, b, c, vae)


def merge_for_host(host: Any, body: Mapping[str, Any], progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Run a merge described by ``body`` (recipe fields + ``output`` name + ``overwrite``); returns the report.

    With ``in_memory: true`` the merge goes into the host's loaded model instead and no file is written
    (:func:`lib_sdtoolkit.merge.live.merge_into_loaded`)."""
    if body.get("in_memory"):
        from .live import merge_into_loaded

        return merge_into_loaded(host, body, progress=progress)
    recipe = recipe_for_host(host, body)
    recipe.validate()
    out = output_path(host, body.get("output"), recipe)
    names = {"A": host.display_name(recipe.model_a, "checkpoint"),
             "B": host.display_name(recipe.model_b, "checkpoint") if recipe.model_b else None,
             "C": host.display_name(recipe.model_c, "checkpoint") if recipe.model_c else None,
             "VAE": host.display_name(recipe.bake_vae, "vae") if recipe.bake_vae else None}
    report = merge_files(recipe, out, overwrite=bool(body.get("overwrite", False)), progress=progress,
                         names={k: v for k, v in names.items() if v})
    host.refresh("checkpoint")
    result = report.to_dict()
    result["name"] = host.display_name(out, "checkpoint")
    return result
