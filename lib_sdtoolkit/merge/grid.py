"""XY grid of in-memory merges: one image per cell, each cell a merge recipe written into the loaded model.

Axes (:data:`AXIS_KINDS`): ``alpha``, ``beta``, ``preset``, ``method``, ``block`` (one merge block's ratio, e.g.
``IN04``; the other blocks keep the base recipe's ratios) and ``seed`` (the image's seed; the merge is unchanged).

Values, the WebUI X/Y/Z plot's syntax (A1111 ``scripts/xyz_grid.py``), comma-separated items:

* a list: ``0.2, 0.4, 0.6`` (``preset`` / ``method``: names, ``GRAD_V, FLAT_25``);
* a range by count: ``0.2-0.8 [4]`` -> 0.2, 0.4, 0.6, 0.8 (``start-end [count]``, both ends included);
* a range by step: ``0.2-0.8 (+0.2)`` -> the same (``start-end (+step)`` / ``(-step)``, end included when hit);
* seeds (integers): also ``1-4`` -> 1, 2, 3, 4.

Items may be mixed (``0, 0.5-1 [3]``). Anything else is an ``InvalidInputError`` naming the item.

:func:`run_grid` merges each cell's recipe into the loaded model in place (:func:`merge_in_memory` with
``into=model``: each key computed from the input files and copied into the model's own tensor, no second copy of
the model) and rewrites only the keys whose result differs from what the model holds: each key's *signature* (what
its value depends on: action, method, the model files, its block's alpha / beta, the seed for seeded methods) is
compared with the one written by the previous cell. A ``block`` axis therefore rewrites that block's keys only, a
``seed`` axis none. Then the face's ``generate(cell)`` makes the image. Finally (``finally``: also on Interrupt or an
error) every key written is put back from where the loaded weights came from (the loaded checkpoint file, read key by
key and cast as the WebUI's ``load_state_dict`` does; or, when the loaded model is itself an in-memory merge, that
merge's recipe), so the loaded model is bit-identical to before. Each cell records its full recipe: writing it with
the ``merge`` job gives the same file as merging that recipe to a file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..errors import InvalidInputError, ModelFileError, SdToolkitError

AXIS_KINDS = ("alpha", "beta", "preset", "method", "block", "seed")
#: what the faces show per kind
AXIS_LABELS = {"alpha": "Alpha", "beta": "Beta", "preset": "Preset", "method": "Method", "block": "Block ratio",
               "seed": "Seed"}
SYNTAX_HELP = ("comma-separated values; ranges as in the X/Y/Z plot: 0.2-0.8 [4] (4 values, ends included) or "
               "0.2-0.8 (+0.2) (by step); seeds also 1-4")
#: most cells in one grid (each one is a merge and a generation)
MAX_CELLS = 100

_NUM = r"[+-]?\s*\d+(?:\.\d*)?(?:[eE][+-]?\d+)?"
_RANGE_COUNT = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*\[\s*(\S*?)\s*\]\s*")
_RANGE_STEP = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*\(\s*(\S*?)\s*\)\s*")
_RANGE_INT = re.compile(r"\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*")


def _num(text: str, what: str) -> float:
    try:
        v = float(text.replace(" ", ""))
    except ValueError:
        raise InvalidInputError(f"{what}: {text.strip()!r} is not a number ({SYNTAX_HELP})") from None
    if not math.isfinite(v):
        raise InvalidInputError(f"{what}: {text.strip()!r} is not a finite number")
    return v


def _clean(v: float) -> float:
    """Range arithmetic without float noise (0.1 + 0.2 -> 0.3)."""
    return float(round(v, 10))


def _items(text: str) -> List[str]:
    """Split on commas outside ``[...]`` / ``(...)``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _expand_numbers(text: str, what: str, integer: bool) -> List[float]:
    values: List[float] = []
    for item in _items(text):
        m = _RANGE_COUNT.fullmatch(item)
        if m:
            a, b = _num(m.group(1), what), _num(m.group(2), what)
            if not re.fullmatch(r"\d+", m.group(3)) or int(m.group(3)) < 1:
                raise InvalidInputError(f"{what}: in {item!r} the count in [...] must be a whole number >= 1")
            n = int(m.group(3))
            values += [a] if n == 1 else [_clean(a + (b - a) * i / (n - 1)) for i in range(n)]
            continue
        m = _RANGE_STEP.fullmatch(item)
        if m:
            a, b = _num(m.group(1), what), _num(m.group(2), what)
            if not re.fullmatch(r"[+-]\s*\d+(?:\.\d*)?", m.group(3)):
                raise InvalidInputError(f"{what}: in {item!r} (...) is a step and must be signed, e.g. (+0.1); for a count "
                                        f"of values write [n], e.g. 0.2-0.8 [4]")
            step = _num(m.group(3), what)
            if step == 0 or (b - a) * step < 0:
                raise InvalidInputError(f"{what}: in {item!r} the step {step:g} never reaches {b:g} from {a:g}")
            n = int(math.floor((b - a) / step + 1e-9)) + 1
            values += [_clean(a + step * i) for i in range(n)]
            continue
        m = _RANGE_INT.fullmatch(item) if integer else None
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            values += list(range(a, b + 1) if b >= a else range(a, b - 1, -1))
            continue
        if "[" in item or "(" in item or (item.count("-") and not re.fullmatch(_NUM, item)):
            raise InvalidInputError(f"{what}: cannot read {item!r} ({SYNTAX_HELP})")
        values.append(_num(item, what))
    if integer:
        bad = [v for v in values if float(v) != int(v)]
        if bad:
            raise InvalidInputError(f"{what}: seeds are whole numbers, got {bad[0]:g}")
        values = [int(v) for v in values]
    return values


@dataclass
class Axis:
    """One axis: its kind, its values (numbers or names) and, for ``block``, the block id."""

    kind: str
    values: List[Any]
    block: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.block} ratio" if self.kind == "block" else self.kind

    def text(self, value: Any) -> str:
        """The cell label the grid draws, e.g. ``alpha: 0.4``, ``IN04 ratio: 1``."""
        return f"{self.label}: {value:g}" if isinstance(value, float) else f"{self.label}: {value}"


def parse_axis(kind: str, text: str, block: Optional[str] = None) -> Axis:
    """An :class:`Axis` from the face's fields (kind, values text, block id for ``block``); clear errors for an
    unknown kind, empty or malformed values, unknown presets / methods (blocks are checked against the model's
    architecture by :func:`plan_cells`)."""
    kind = (kind or "").strip().lower()
    if kind not in AXIS_KINDS:
        raise InvalidInputError(f"unknown axis {kind!r}; use one of {', '.join(AXIS_KINDS)}")
    what = f"{kind} axis"
    text = text if isinstance(text, str) else ",".join(str(v) for v in (text or []))
    if kind in ("preset", "method"):
        values: List[Any] = _items(text)
        if kind == "preset":
            from .presets import get_preset

            for v in values:
                get_preset(v)
        else:
            from . import methods

            for v in values:
                methods.get(v)
    else:
        values = _expand_numbers(text, what, integer=(kind == "seed"))
    if not values:
        raise InvalidInputError(f"{what}: no values given ({SYNTAX_HELP})")
    if kind == "block":
        if not block or not str(block).strip():
            raise InvalidInputError("block axis: name the block whose ratio varies (e.g. IN04, M00, OUT11, BASE)")
        block = str(block).strip().upper()
    return Axis(kind, values, block)


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class GridCell:
    """One cell: its place, axis values, the full recipe merged for it, the image seed; filled by :func:`run_grid`:
    ``keys_written`` (keys rewritten for this cell) and ``result`` (what the face's ``generate`` returned)."""

    index: int
    col: int
    row: int
    x: Any
    y: Any
    recipe: Any  # MergeRecipe
    seed: Optional[int] = None
    keys_written: int = 0
    written: List[str] = field(default_factory=list)
    result: Any = None

    def recipe_dict(self, names: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """The recipe as data; ``names`` maps model paths to display names (infotexts)."""
        d = self.recipe.to_dict()
        if names:
            for k in ("model_a", "model_b", "model_c", "bake_vae"):
                if d.get(k):
                    d[k] = names.get(d[k], d[k])
        return d

    def recipe_json(self, names: Optional[Dict[str, str]] = None) -> str:
        return json.dumps(self.recipe_dict(names), separators=(",", ":"))


def _family(path: str) -> str:
    from ..arch import detect
    from ..files import open_model

    with open_model(path) as r:
        return detect(r.infos()).architecture


def _apply(recipe: Any, axis: Optional[Axis], value: Any, family: str) -> Tuple[Any, Optional[int]]:
    """``recipe`` with the axis value set (``block`` last, over the ratios the others give); the image seed."""
    if axis is None or axis.kind == "seed":
        return recipe, (int(value) if axis is not None else None)
    if axis.kind == "alpha":
        return dataclasses.replace(recipe, alpha=float(value)), None
    if axis.kind == "beta":
        return dataclasses.replace(recipe, beta=float(value)), None
    if axis.kind == "preset":
        return dataclasses.replace(recipe, preset=str(value), blocks=None), None
    if axis.kind == "method":
        from . import methods

        # model C goes with the methods that take it (a C picked for add_difference is not an error in the
        # weighted_sum cell of the same axis)
        c = recipe.model_c if methods.get(str(value)).takes_c else None
        return dataclasses.replace(recipe, method=str(value), model_c=c), None
    raise AssertionError(axis.kind)


def _set_block(recipe: Any, block: str, value: float, family: str) -> Any:
    from ..arch.blocks import MBW, convention

    names = list(convention(MBW, family).blocks)
    if block not in names:
        raise InvalidInputError(f"block axis: {block!r} is not a merge block of {family} models; use one of "
                                f"{', '.join(names)}")
    alpha, _ = dataclasses.replace(recipe, allow_extrapolation=True).block_ratios(family)
    alpha[block] = float(value)
    return dataclasses.replace(recipe, blocks=[alpha[n] for n in names], preset=None, base_alpha=None)


def plan_cells(base: Any, x: Axis, y: Optional[Axis] = None, family: Optional[str] = None) -> List[GridCell]:
    """Every cell's recipe (row by row: y outer, x inner), each validated now, before anything is merged, so a bad
    value (a method that needs model C, a ratio out of range, an unknown block) stops the grid before it starts."""
    family = family or _family(base.model_a)
    if y is not None and x.kind == y.kind and (x.kind != "block" or x.block == y.block):
        raise InvalidInputError(f"both axes are {x.label}; pick two different axes")
    ys = y.values if y is not None else [None]
    n = len(x.values) * len(ys)
    if n > MAX_CELLS:
        raise InvalidInputError(f"the grid has {n} cells; at most {MAX_CELLS}")
    cells: List[GridCell] = []
    for row, yv in enumerate(ys):
        for col, xv in enumerate(x.values):
            recipe, seed = base, None
            blocks = []
            for axis, v in ((x, xv), (y, yv)):
                if axis is None:
                    continue
                if axis.kind == "block":
                    blocks.append((axis.block, v))
                    continue
                recipe, s = _apply(recipe, axis, v, family)
                seed = s if s is not None else seed
            for b, v in blocks:
                recipe = _set_block(recipe, b, v, family)
            where = f"cell {len(cells) + 1} ({x.text(xv)}{', ' + y.text(yv) if y is not None else ''})"
            try:
                recipe.validate()
                recipe.block_ratios(family)
            except InvalidInputError as e:
                raise InvalidInputError(f"{where}: {e}") from None
            cells.append(GridCell(len(cells), col, row, xv, yv, recipe, seed))
    return cells


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class GridHooks:
    """What the face does around each write into its loaded model (the WebUI: undo its hijack so the model's keys
    are the checkpoint's, then hijack again and drop the Lora extension's backups of the modules written)."""

    begin_write: Callable[[Any], None] = lambda model: None
    end_write: Callable[[Any, Set[str]], None] = lambda model, keys: None


@dataclass
class GridResult:
    cells: List[GridCell]
    x: Axis
    y: Optional[Axis]
    family: str
    interrupted: bool = False
    restored_keys: int = 0

    @property
    def done(self) -> List[GridCell]:
        return [c for c in self.cells if c.result is not None]


def _signature(recipe: Any, item: Any, alpha: Dict[str, float], beta: Dict[str, float]) -> Tuple:
    """What the value of ``item``'s key depends on in ``recipe`` (equal signatures: equal tensors)."""
    from . import methods

    if item.action == "fix_pos":
        return ("fix_pos",)
    if item.action in ("copy_a", "keep_pos"):
        return ("a", recipe.model_a)
    if item.action == "vae":
        return ("vae", recipe.bake_vae)
    spec = methods.get(recipe.method)
    return ("merge", recipe.method, tuple(recipe.models), alpha[item.block],
            beta[item.block] if spec.beta is not None else None, recipe.seed if spec.seeded else None,
            bool(item.partial))


def _restore(model: Any, keys: Set[str], original_file: Optional[str], live_recipe: Any, workers: int) -> int:
    """Put ``keys`` back: from the live merge's recipe where it covers them, else from the loaded checkpoint file
    (each tensor read alone and copied into the model's tensor: the cast ``load_state_dict`` does)."""
    import torch

    from ..files import open_model
    from .engine import merge_in_memory

    left = set(keys)
    if live_recipe is not None and left:
        done: Set[str] = set()

        def sel(item: Any) -> bool:
            if item.name in left:
                done.add(item.name)
                return True
            return False
        merge_in_memory(dataclasses.replace(live_recipe, save_metadata=False), a=live_recipe.model_a, into=model,
                        workers=workers, select=sel)
        left -= done
    if left:
        if not original_file:
            raise SdToolkitError(f"cannot restore {len(left)} keys: the loaded checkpoint file is unknown")
        sd = model.state_dict()
        with open_model(original_file) as r, torch.no_grad():
            infos = r.infos()
            for k in sorted(left):
                if k in sd and k in infos:
                    sd[k].copy_(r.read_elements(k).reshape(infos[k].shape))
    return len(keys)


def check_restorable(model_keys: Sequence[str], cells: Sequence[GridCell], original_file: Optional[str],
                     live_recipe: Any) -> None:
    """Before the first write: every key a cell may write must be restorable (in the loaded checkpoint file or the
    live merge's model A), else the grid is refused (no second copy of the model is kept to undo it)."""
    from ..files import open_model

    src = live_recipe.model_a if live_recipe is not None else original_file
    if not src:
        raise InvalidInputError("the file the loaded model came from is unknown, so it could not be restored after "
                                "the grid; load the checkpoint again first")
    with open_model(src) as r:
        have = set(r.infos())
    keys = set(model_keys)
    for m in {c.recipe.model_a for c in cells}:
        with open_model(m) as r:
            missing = [k for k in r.infos() if k in keys and k not in have]
        if missing:
            raise ModelFileError(f"model A has {len(missing)} tensors the loaded checkpoint lacks (first: "
                                    f"{missing[0]}); they could not be restored after the grid", m)


def run_grid(model: Any, cells: List[GridCell], generate: Callable[[GridCell], Any], *,
             x: Axis, y: Optional[Axis] = None, family: str = "", original_file: Optional[str] = None,
             live_recipe: Any = None, hooks: Optional[GridHooks] = None,
             interrupted: Callable[[], bool] = lambda: False, progress: Optional[Callable[[int, int], None]] = None,
             merge_progress: Optional[Callable[[int, int, str], None]] = None, workers: int = 2) -> GridResult:
    """Merge each cell into ``model`` (rewriting only changed keys), call ``generate(cell)``, restore ``model``.

    ``original_file``: the checkpoint the loaded weights came from; ``live_recipe``: the recipe of the in-memory
    merge the model holds now, if any (restored from instead of the file). ``interrupted()`` is asked before each
    cell (the WebUI's Interrupt): the grid stops, restores and returns the cells done (``result.interrupted``).
    Errors propagate after the restore."""
    hooks = hooks or GridHooks()
    result = GridResult(cells, x, y, family)
    held: Dict[str, Tuple] = {}  # key -> signature of the value the model holds now (absent: as loaded)
    written_all: Set[str] = set()
    try:
        for i, cell in enumerate(cells):
            if interrupted():
                result.interrupted = True
                break
            if progress:
                progress(i, len(cells))
            alpha, beta = cell.recipe.block_ratios(family)
            chosen: Dict[str, Tuple] = {}

            def select(item: Any, recipe=cell.recipe, alpha=alpha, beta=beta, chosen=chosen) -> bool:
                sig = _signature(recipe, item, alpha, beta)
                if held.get(item.name) == sig:
                    return False
                chosen[item.name] = sig
                return True

            from .engine import merge_in_memory

            hooks.begin_write(model)
            res = None
            try:
                res = merge_in_memory(dataclasses.replace(cell.recipe, save_metadata=False), a=cell.recipe.model_a,
                                      into=model, workers=workers, select=select, progress=merge_progress)
            finally:
                # on an error the chosen keys may be partly written: all of them are restored below
                keys = set(chosen) - (set(res.report.not_in_module) if res is not None else set())
                written_all.update(keys)
                hooks.end_write(model, keys)
            held.update({k: v for k, v in chosen.items() if k in keys})
            cell.written = sorted(keys)
            cell.keys_written = len(keys)
            cell.result = generate(cell)
    finally:
        if written_all:
            hooks.begin_write(model)
            try:
                result.restored_keys = _restore(model, written_all, original_file, live_recipe, workers)
            finally:
                hooks.end_write(model, written_all)
    return result


__all__ = ["AXIS_KINDS", "AXIS_LABELS", "SYNTAX_HELP", "MAX_CELLS", "Axis", "GridCell", "GridHooks", "GridResult",
           "parse_axis", "plan_cells", "run_grid", "check_restorable"]
