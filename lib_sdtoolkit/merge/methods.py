"""The merge methods: one declaration per method, read by everything else (torch-free).

Each :class:`MergeMethod` says what a method is: its tensor function, how many models it takes, whether it can be
computed chunk by chunk, its two ratios (``alpha`` and the second one, shown to users as ``beta``, whose meaning
is the method's own: share of C, density, drop rate) with default and valid range, and one line of help. The
declaration is the only place these facts live:

* the engine calls :meth:`MergeMethod.call` (no method names in the engine) and chunks only ``elementwise``
  methods;
* ``MergeRecipe.validate`` / ``block_ratios`` take the model count, the required ``beta`` and every range from here;
* the CLI's ``--method`` choices and ``--beta`` help and the Merge tab's method list are built from :func:`names`
  and :func:`beta_help`.

This module imports neither torch nor the tensor functions: ``function`` is a dotted name resolved on first use
(or a callable, for methods registered by tests or extensions), so ``python -m lib_sdtoolkit merge --help`` and the
API's validation stay cheap.

To add a method: write the function (float32 maths, see :mod:`lib_sdtoolkit.ops.merge`), then ``register(
MergeMethod(...))`` with ``args`` naming what the engine passes, in order:

=========  =====================================================================
``a``      model A's tensor (float32, owned by the callee when ``inplace``)
``b c``    model B's / C's tensor
``others`` the list of the other models' tensors (B, then C if given)
``alpha``  the alpha ratio of the key's block
``beta``   the beta ratio of the key's block (the method's second parameter)
``seed``   the recipe's seed (methods with a random mask)
``key``    the tensor's state-dict key (per-key random streams)
``inplace`` ``True``: the function may overwrite its float32 inputs
=========  =====================================================================
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import InvalidInputError

#: what ``args`` may name (see the module docstring)
ARG_NAMES = ("a", "b", "c", "others", "alpha", "beta", "seed", "key", "inplace")


@dataclass(frozen=True)
class Ratio:
    """A method's number (``alpha`` or ``beta``) as users see it.

    ``default`` None: the user must give it. The range is ``[low, high]`` with either end open; a ``strict``
    range holds even with ``allow_extrapolation`` (outside it the maths is undefined: a density of 0, a drop rate
    of 1), a plain one only without."""

    name: str
    meaning: str
    default: Optional[float]
    low: float = 0.0
    high: float = 1.0
    low_open: bool = False
    high_open: bool = False
    strict: bool = False

    @property
    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def contains(self, value: float) -> bool:
        v = float(value)
        if not math.isfinite(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def check(self, value: float, method: str, extrapolate: bool = False, what: Optional[str] = None) -> None:
        """Raise ``InvalidInputError`` when ``value`` is outside the range (a plain range only without
        ``extrapolate``). ``what`` names the value in the message (default: the ratio's name)."""
        if self.contains(value) or (extrapolate and not self.strict):
            return
        what = what or self.name
        if self.strict:
            raise InvalidInputError(f"{method}: {what} is the {self.meaning} and must be in {self.interval}, "
                                    f"got {float(value):g}")
        raise InvalidInputError(f"{what} {float(value):g} is outside {self.interval} (pass allow_extrapolation / "
                                f"--allow-extrapolation to allow it)")


#: alpha as the weighted methods use it
SHARE_OF_B = Ratio("alpha", "share of B", 0.5)


@dataclass(frozen=True)
class MergeMethod:
    """One merge method (see the module docstring)."""

    name: str
    title: str
    formula: str
    help: str
    #: the tensor function: ``"package.module:attribute"`` (resolved on first use) or a callable
    function: Union[str, Callable[..., Any]]
    #: what the engine passes, in order (:data:`ARG_NAMES`)
    args: Tuple[str, ...]
    #: how many models, A included: (min, max)
    models: Tuple[int, int]
    #: True: each output element depends only on the same element of the inputs, so a tensor may be computed in
    #: chunks with the same result
    elementwise: bool
    alpha: Ratio = SHARE_OF_B
    #: the second parameter (shown as ``beta``), None when the method has none
    beta: Optional[Ratio] = None
    #: A's share is ``1 - alpha - beta``: without extrapolation alpha + beta may not exceed 1 in any block
    shares_of_a: bool = False
    #: the ``interp_method`` name the WebUI's own merger writes for this method (None: the method's name)
    webui_name: Optional[str] = None

    @property
    def seeded(self) -> bool:
        """Whether the result depends on the recipe's seed."""
        return "seed" in self.args

    @property
    def takes_c(self) -> bool:
        return self.models[1] >= 3

    @property
    def needs_c(self) -> bool:
        return self.models[0] >= 3

    def resolve(self) -> Callable[..., Any]:
        """The tensor function (imports its module on first use)."""
        if callable(self.function):
            return self.function
        return _resolve(self.function)

    def call(self, tensors: Sequence[Any], alpha: float, beta: float, seed: int = 0, key: str = "",
             inplace: bool = False) -> Any:
        """Run the function on ``tensors`` (A first) with the arguments ``args`` names."""
        values = {"alpha": alpha, "beta": beta, "seed": seed, "key": key, "inplace": inplace}
        out: List[Any] = []
        for n in self.args:
            if n == "a":
                out.append(tensors[0])
            elif n == "b":
                out.append(tensors[1])
            elif n == "c":
                out.append(tensors[2])
            elif n == "others":
                out.append(list(tensors[1:]))
            else:
                out.append(values[n])
        return self.resolve()(*out)

    def model_help(self) -> str:
        lo, hi = self.models
        return ", ".join("ABC"[:lo]) + (f" [{'ABC'[lo:hi]}]" if hi > lo else "")


_RESOLVED: Dict[str, Callable[..., Any]] = {}


def _resolve(ref: str) -> Callable[..., Any]:
    fn = _RESOLVED.get(ref)
    if fn is None:
        module, _, attr = ref.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        _RESOLVED[ref] = fn
    return fn


REGISTRY: Dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` (checks the declaration; a name may be registered once)."""
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    lo, hi = method.models
    if not 2 <= lo <= hi <= 3:
        raise ValueError(f"{method.name}: models must be (min, max) within 2..3, got {method.models}")
    bad = [a for a in method.args if a not in ARG_NAMES]
    if bad:
        raise ValueError(f"{method.name}: unknown args {bad}; use {', '.join(ARG_NAMES)}")
    if "c" in method.args and lo < 3:
        raise ValueError(f"{method.name}: takes 'c' but C is optional; use 'others'")
    if "b" not in method.args and "others" not in method.args:
        raise ValueError(f"{method.name}: args pass neither 'b' nor 'others'")
    if "beta" in method.args and method.beta is None:
        raise ValueError(f"{method.name}: args pass 'beta' but no beta is declared")
    if method.elementwise and ("others" in method.args or method.seeded):
        raise ValueError(f"{method.name}: an elementwise method takes fixed models and no random stream")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register and remove their own)."""
    REGISTRY.pop(name, None)


def names() -> Tuple[str, ...]:
    """The methods, in declaration order (the CLI's choices, the tab's list)."""
    return tuple(REGISTRY)


def get(name: str) -> MergeMethod:
    """The method ``name`` (``InvalidInputError`` naming the known ones if there is none)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unknown merge method {name!r}; use one of {', '.join(REGISTRY)}") from None


def beta_help() -> str:
    """What ``beta`` is per method, for the CLI and the tab, e.g. ``sum_twice: share of C (required); ...``."""
    parts = []
    for m in REGISTRY.values():
        if m.beta is not None:
            d = "required" if m.beta.default is None else f"default {m.beta.default:g}"
            parts.append(f"{m.name}: {m.beta.meaning} {m.beta.interval} ({d})")
    return "; ".join(parts)


def beta_label() -> str:
    """The meanings of ``beta`` by method, grouped, e.g. ``Sum twice/Triple sum: share of C / TIES: density``."""
    groups: Dict[str, List[str]] = {}
    for m in REGISTRY.values():
        if m.beta is not None:
            groups.setdefault(m.beta.meaning, []).append(m.title)
    return " / ".join(f"{'/'.join(titles)}: {meaning}" for meaning, titles in groups.items())


def model_c_label() -> str:
    """Which methods need model C and which take it optionally, e.g. ``Add difference, ...; optional for TIES``."""
    needs = [m.title for m in REGISTRY.values() if m.needs_c]
    optional = [m.title for m in REGISTRY.values() if m.takes_c and not m.needs_c]
    return ", ".join(needs) + (f"; optional for {'/'.join(optional)}" if optional else "")


def summary_lines() -> List[str]:
    """Two lines per method: name, models and formula, then the help indented."""
    return [line for m in REGISTRY.values() for line in (f"{m.name} ({m.model_help()}): {m.formula}", f"    {m.help}")]


# ---------------------------------------------------------------------------------------------------------------
# the built-in methods (functions in lib_sdtoolkit.ops.merge)

_OPS = "lib_sdtoolkit.ops.merge:"
SHARE_OF_C = Ratio("beta", "share of C", None)

register(MergeMethod(
    "weighted_sum", "Weighted sum", "A*(1-M) + B*M", "interpolate between A and B",
    _OPS + "weighted_sum", ("a", "b", "alpha", "inplace"), (2, 2), elementwise=True, webui_name="Weighted sum"))
register(MergeMethod(
    "add_difference", "Add difference", "A + (B-C)*M", "add what B learned over C to A",
    _OPS + "add_difference", ("a", "b", "c", "alpha", "inplace"), (3, 3), elementwise=True,
    alpha=Ratio("alpha", "multiplier of B-C", 0.5), webui_name="Add difference"))
register(MergeMethod(
    "sum_twice", "Sum twice", "(1-beta)*((1-M)*A + M*B) + beta*C", "weighted sum of A and B, then with C",
    _OPS + "sum_twice", ("a", "b", "c", "alpha", "beta", "inplace"), (3, 3), elementwise=True, beta=SHARE_OF_C))
register(MergeMethod(
    "triple_sum", "Triple sum", "(1-M-beta)*A + M*B + beta*C", "weighted sum of three models",
    _OPS + "triple_sum", ("a", "b", "c", "alpha", "beta", "inplace"), (3, 3), elementwise=True, beta=SHARE_OF_C,
    shares_of_a=True))
register(MergeMethod(
    "ties", "TIES", "A + M*TIES(B-A, C-A; density)",
    "trim each task vector to its largest entries, elect signs, average the agreeing ones",
    _OPS + "ties", ("a", "others", "alpha", "beta"), (2, 3), elementwise=False,  # the trim threshold is per tensor
    alpha=Ratio("alpha", "scale of the merged task vector", 0.5),
    beta=Ratio("beta", "density", 0.2, low_open=True, strict=True)))
register(MergeMethod(
    "dare", "DARE", "A + M*sum(DARE(X-A; p))",
    "drop task-vector entries with probability p, rescale the rest by 1/(1-p) (seeded per key)",
    _OPS + "dare", ("a", "others", "alpha", "beta", "seed", "key"), (2, 3),
    elementwise=False,  # one random mask per whole tensor
    alpha=Ratio("alpha", "scale of the merged task vectors", 0.5),
    beta=Ratio("beta", "drop rate", 0.9, high_open=True, strict=True)))


__all__ = ["Ratio", "MergeMethod", "REGISTRY", "register", "unregister", "names", "get", "beta_help",
           "beta_label", "model_c_label", "summary_lines", "ARG_NAMES"]
