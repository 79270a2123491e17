"""Merge into the model a face has loaded (the WebUI's current checkpoint), without writing a file.

``merge_into_loaded(hooks, recipe, ...)`` (called by the merge job, which resolved the recipe's names) runs,
between ``hooks.begin_change(model)`` and ``hooks.end_change(model, info)``,
:func:`~lib_sdtoolkit.merge.engine.merge_in_memory` with ``into=model``: every input, A included, is read from its
file key by key (so LoRA deltas the WebUI patched into the loaded weights never leak into the merge) and each
result is copied into the model's own tensor in the model's dtype; no second copy of the model is made. ``info``
tells the face what is loaded now (a name, a title, a sha256 of the merge metadata as supermerger does, the
metadata), so the WebUI can show a checkpoint stand-in and fire its model-loaded callbacks.

``hooks`` is the face's :class:`~lib_sdtoolkit.host.ModelHooks` (``host.model_hooks``; None where the face holds
no model): plain callables, so this module never sees a Host.

The merge is recorded on the model object (attribute :data:`ATTR`) with the face's identity token of what is
loaded; it is "current" only while the face still reports that token (loading any other weights drops it).

The ``merge-save-current`` job writes the current merge by running the recorded recipe through the
streaming engine from the same input files (checked unchanged by size and mtime): the file is exactly what
``merge`` on the CLI writes for that recipe, with the WebUI merge metadata, and nothing the WebUI did to the loaded
weights afterwards (LoRA patches, an external VAE) is baked in. ``restore_loaded_model`` reloads the
checkpoint that was loaded before the first in-memory merge.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..errors import InvalidInputError, ModelFileError
from .engine import MergeReport, Progress, merge_in_memory
from .recipe import MergeRecipe

#: attribute of the loaded model holding its :class:`LiveMerge`
ATTR = "sdtoolkit_current_merge"

LOCK_ATTR = "sdtoolkit_merge_lock"


def _model_lock(model: Any) -> threading.Lock:
    """One in-place change of a model at a time (the lock lives on the model; the face adds the WebUI's own
    queue lock in ``begin_model_change``)."""
    return model.__dict__.setdefault(LOCK_ATTR, threading.Lock())


def _stat(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@dataclass
class LiveMerge:
    """What was merged into a loaded model: the resolved recipe, display names, the report and metadata."""

    recipe: MergeRecipe
    names: Dict[str, str]
    report: MergeReport
    metadata: Dict[str, str]
    name: str
    sha256: str
    identity: Any = None
    original_file: Optional[str] = None
    inputs: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.sha256[:10]}]"

    def info(self) -> Dict[str, Any]:
        """What the face is told about the model it holds now."""
        return {"name": self.name, "title": self.title, "sha256": self.sha256, "shorthash": self.sha256[:10],
                "metadata": dict(self.metadata), "recipe": self.recipe.to_dict(), "original_file": self.original_file}

    def to_dict(self) -> Dict[str, Any]:
        d = self.report.to_dict()
        d.update({"in_memory": True, "output": None, "name": self.name, "title": self.title, "sha256": self.sha256,
                  "original_file": self.original_file})
        return d


def _need_model(hooks: Any) -> Any:
    if hooks is None:
        raise InvalidInputError("this face holds no model in memory (in-memory merges are for the WebUI); "
                                "merge to a file instead")
    model = hooks.get_model()
    if model is None:
        raise InvalidInputError("no model is loaded; load a checkpoint in the WebUI first")
    return model


def _loaded_file(hooks: Any, model: Any) -> Optional[str]:
    f = hooks.checkpoint_file(model)
    return str(f) if f else None


def current_merge(hooks: Any, model: Any = None) -> Optional[LiveMerge]:
    """The merge the loaded model holds now, or None (nothing merged, or other weights were loaded since)."""
    if hooks is None:
        return None
    model = model if model is not None else hooks.get_model()
    if model is None:
        return None
    rec = getattr(model, ATTR, None)
    if not isinstance(rec, LiveMerge):
        return None
    if rec.identity is not hooks.identity(model):
        return None
    return rec


def merge_into_loaded(hooks: Any, recipe: MergeRecipe, names: Dict[str, str], name: str,
                      progress: Optional[Progress] = None, hash_cache: Any = True,
                      hash_progress: Any = None) -> LiveMerge:
    """Merge the (resolved, validated) ``recipe`` into the face's loaded model (no file); returns the record."""
    model = _need_model(hooks)
    inputs = {p: _stat(p) for p in (recipe.model_a, recipe.model_b, recipe.model_c, recipe.bake_vae) if p}
    lock = _model_lock(model)
    if not lock.acquire(blocking=False):
        raise InvalidInputError("another merge into the loaded model is running; wait for it to finish")
    try:
        prev = current_merge(hooks, model)
        original = prev.original_file if prev is not None else _loaded_file(hooks, model)
        hooks.begin_change(model)
        info: Optional[Dict[str, Any]] = None
        if prev is not None:
            delattr(model, ATTR)  # from here on the loaded weights are no longer that merge
        try:
            res = merge_in_memory(recipe, a=recipe.model_a, into=model, progress=progress, workers=2, names=names,
                                  hash_cache=hash_cache, hash_progress=hash_progress)
            meta = dict(res.metadata)
            digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8")).hexdigest()
            rec = LiveMerge(recipe=recipe, names=names, report=res.report, metadata=meta, name=name, sha256=digest,
                            original_file=str(original) if original else None, inputs=inputs)
            info = rec.info()
        finally:
            # with info=None the face only undoes what begin_model_change did (the weights may be partly merged)
            hooks.end_change(model, info)
        rec.identity = hooks.identity(model)
        setattr(model, ATTR, rec)
    finally:
        lock.release()
    return rec


def current_merge_checked(hooks: Any) -> LiveMerge:
    """The loaded model's current merge, its input files checked unchanged (size, mtime) so that writing it
    again gives the same bytes."""
    model = _need_model(hooks)
    rec = current_merge(hooks, model)
    if rec is None:
        raise InvalidInputError("the loaded model holds no in-memory merge (merge into the loaded model first; "
                                "loading another checkpoint forgets it)")
    for p, st in rec.inputs.items():
        try:
            now = _stat(p)
        except OSError:
            raise ModelFileError("an input of the current merge is gone; cannot write the merge again", p) from None
        if now != st:
            raise ModelFileError("an input of the current merge changed since it was merged; cannot write the "
                                 "same merge again", p)
    return rec


def restore_loaded_model(hooks: Any) -> str:
    """Reload the checkpoint that was loaded before the in-memory merge (drops the merge); returns its path."""
    model = _need_model(hooks)
    rec = current_merge(hooks, model)
    original = rec.original_file if rec is not None else _loaded_file(hooks, model)
    if not original:
        raise InvalidInputError("the file the model was loaded from is unknown; load the checkpoint again yourself")
    lock = _model_lock(model)
    if not lock.acquire(blocking=False):
        raise InvalidInputError("a merge into the loaded model is running; wait for it to finish")
    try:
        if hooks.reload is None:
            raise InvalidInputError("this face cannot reload the loaded model; load the checkpoint again yourself")
        hooks.reload(model, os.fspath(original))
        now = hooks.get_model()
        for m in {id(model): model, id(now): now}.values():
            if m is not None and ATTR in m.__dict__:
                delattr(m, ATTR)
    finally:
        lock.release()
    return str(original)


__all__ = ["ATTR", "LiveMerge", "current_merge", "current_merge_checked", "merge_into_loaded",
           "restore_loaded_model"]
