"""The shape every job has: a request dataclass, a report dataclass, ``run(host, request, progress) -> report``.

A request field is declared once, with :func:`param`; the CLI flags, the API body model (unknown fields refused)
and the UI handlers are derived from that declaration (:mod:`lib_sdtoolkit.jobs.faces`), never written again.
The metadata a field can carry:

* ``help``: the one line every face shows;
* ``choices``, ``minimum``/``maximum``: checked by :meth:`Request.from_dict` for every face alike;
* ``model``: the field names an input model of that kind ("checkpoint", "vae", "lora", "controlnet"); the job
  resolves it with ``host.resolve_input`` (the gate), faces pass the client's text as it is;
* ``positional``: the CLI takes it as a positional argument (lists: one or more);
* ``flag``/``short``: the CLI's spelling when it differs from ``--field-name``; ``cli``/``api``: set False to
  keep a field off one face (e.g. ``workers`` is CLI-only);
* ``negate``: for a bool defaulting to True, the CLI flag that turns it off (``--no-metadata``).

This module imports neither torch nor pydantic: building the CLI's ``--help`` stays cheap.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from ..errors import InvalidInputError

R = TypeVar("R", bound="Request")


def param(default: Any = MISSING, *, help: str = "", choices: Optional[Sequence[Any]] = None,
          minimum: Optional[float] = None, maximum: Optional[float] = None, model: Optional[str] = None,
          positional: bool = False, flag: Optional[str] = None, short: Optional[str] = None,
          negate: Optional[str] = None, cli: bool = True, api: bool = True, default_factory: Any = MISSING,
          metavar: Optional[str] = None) -> Any:
    """A request field with what the faces need to know about it (see the module docstring)."""
    # choices may be a callable returning them (a registry that grows, e.g. merge methods), read when used
    meta = {"help": help, "choices": choices if choices is None or callable(choices) else tuple(choices),
            "minimum": minimum,
            "maximum": maximum, "model": model, "positional": positional, "flag": flag, "short": short,
            "negate": negate, "cli": cli, "api": api, "metavar": metavar}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """One request field as the faces see it (resolved type hint + the :func:`param` metadata)."""

    name: str
    type: Any
    default: Any
    required: bool
    help: Any  # text, or a callable giving it (read when shown)
    choices: Any  # a tuple, a callable returning one, or None: read it with choices_of()
    minimum: Optional[float]
    maximum: Optional[float]
    model: Optional[str]
    positional: bool
    flag: Optional[str]
    short: Optional[str]
    negate: Optional[str]
    cli: bool
    api: bool
    metavar: Optional[str]

    @property
    def base(self) -> Any:
        """The type without Optional: ``Optional[float]`` -> float."""
        return _strip_optional(self.type)

    @property
    def optional(self) -> bool:
        return _is_optional(self.type)

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base) in (list, List, tuple, Sequence)

    @property
    def item_type(self) -> Any:
        args = typing.get_args(self.base)
        return args[0] if args else str


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return tp


_SPEC_CACHE: Dict[type, Tuple[FieldSpec, ...]] = {}


def field_specs(cls: type) -> Tuple[FieldSpec, ...]:
    """The request's fields in declaration order (private fields, ``_x``, are not part of any face)."""
    got = _SPEC_CACHE.get(cls)
    if got is not None:
        return got
    hints = typing.get_type_hints(cls)
    out: List[FieldSpec] = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        m = dict(f.metadata)
        if f.default is not MISSING:
            default, required = f.default, False
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default, required = f.default_factory(), False  # type: ignore[misc]
        else:
            default, required = None, True
        out.append(FieldSpec(name=f.name, type=hints[f.name], default=default, required=required,
                             help=m.get("help", ""), choices=m.get("choices"), minimum=m.get("minimum"),
                             maximum=m.get("maximum"), model=m.get("model"), positional=m.get("positional", False),
                             flag=m.get("flag"), short=m.get("short"), negate=m.get("negate"),
                             cli=m.get("cli", True), api=m.get("api", True), metavar=m.get("metavar")))
    got = _SPEC_CACHE[cls] = tuple(out)
    return got


#: face -> how that face names a request field in error text (the CLI registers its flags, ``--overwrite``,
#: in :mod:`lib_sdtoolkit.jobs.faces`); a face not listed says the field's name
FIELD_LABELS: Dict[str, Callable[[FieldSpec], str]] = {}


def field_label(spec: FieldSpec, face: str) -> str:
    """The name ``face`` shows the user for ``spec`` (its CLI flag on the command line)."""
    fn = FIELD_LABELS.get(face)
    return fn(spec) if fn is not None else spec.name


def _coerce(spec: FieldSpec, value: Any, where: str, label: Optional[str] = None) -> Any:
    """``value`` as the field's type, or a 422 naming the field (as ``label``, default its name). Lenient only
    where faces differ harmlessly: gradio numbers arrive as float (an int field takes 3.0), a list may arrive as a
    comma string."""
    name = label or spec.name
    if value is None:
        if spec.optional or (spec.required is False and spec.default is None):
            return None
        raise InvalidInputError(f"{where}: {name} must not be null")
    tp = spec.base
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # e.g. Union[str, List[float]]: accept any member as it is
        for member in typing.get_args(tp):
            try:
                return _coerce_simple(member, value, name, where)
            except InvalidInputError:
                continue
        raise InvalidInputError(f"{where}: {name} has the wrong type ({type(value).__name__})")
    return _coerce_simple(tp, value, name, where)


def _coerce_simple(tp: Any, value: Any, name: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, List, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if isinstance(value, str):
            value = [v for v in (x.strip() for x in value.split(",")) if v] if item is not str else [value]
        if not isinstance(value, (list, tuple)):
            raise InvalidInputError(f"{where}: {name} must be a list")
        return [(_coerce_simple(item, v, name, where) if item is not Any else v) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InvalidInputError(f"{where}: {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise InvalidInputError(f"{where}: {name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"{where}: {name} must be a finite whole number, got {value!r}")
        if isinstance(value, float) and value == int(value):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise InvalidInputError(f"{where}: {name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise InvalidInputError(f"{where}: {name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                raise InvalidInputError(f"{where}: {name} must be a number, got {value!r}") from None
        else:
            raise InvalidInputError(f"{where}: {name} must be a number, got {value!r}")
        if not math.isfinite(v):
            raise InvalidInputError(f"{where}: {name} must be a finite number, got {value!r}")
        return v
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise InvalidInputError(f"{where}: {name} must be a string, got {type(value).__name__}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise InvalidInputError(f"{where}: {name} has the wrong type ({type(value).__name__})")


@dataclass
class Request:
    """Base of every job's request. Subclasses are dataclasses whose fields use :func:`param`."""

    #: the job's name, as faces call it (``merge``, ``prune`` ...); set by each subclass
    job: ClassVar[str] = ""

    @classmethod
    def fields(cls) -> Tuple[FieldSpec, ...]:
        return field_specs(cls)

    @classmethod
    def from_dict(cls: Type[R], data: Mapping[str, Any], face: str = "api") -> R:
        """Build and check a request from a JSON-like mapping: unknown fields, wrong types, values outside the
        declared choices or range are a 422 naming the field (the same for every face)."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"{cls.job or cls.__name__}: the request must be an object")
        specs = {s.name: s for s in cls.fields()}
        unknown = sorted(k for k in data if k not in specs)
        if unknown:
            raise InvalidInputError(f"{cls.job or cls.__name__}: unknown field(s): {', '.join(map(str, unknown))} "
                                    f"(known: {', '.join(specs)})")
        where = cls.job or cls.__name__
        kwargs: Dict[str, Any] = {}
        for name, spec in specs.items():
            label = field_label(spec, face)
            if name not in data:
                if spec.required:
                    raise InvalidInputError(f"{where}: {label} is required")
                continue
            v = _coerce(spec, data[name], where, label)
            if v is not None:
                _check_value(spec, v, where, label)
            kwargs[name] = v
        req = cls(**kwargs)
        req.check()
        return req

    def check(self) -> None:
        """Cross-field checks that need no file (override; raise ``InvalidInputError``)."""

    def to_dict(self) -> Dict[str, Any]:
        return {s.name: _plain(getattr(self, s.name)) for s in self.fields()}

    def replace(self: R, **changes: Any) -> R:
        return dataclasses.replace(self, **changes)


def choices_of(spec: FieldSpec) -> Optional[Tuple[Any, ...]]:
    """The field's allowed values now (a callable declaration is asked each time)."""
    c = spec.choices
    return tuple(c()) if callable(c) else c


def _check_value(spec: FieldSpec, v: Any, where: str, label: Optional[str] = None) -> None:
    name = label or spec.name
    items = v if isinstance(v, list) else [v]
    choices = choices_of(spec)
    for x in items:
        if choices is not None and x not in choices:
            raise InvalidInputError(f"{where}: {name} {x!r} is not one of {', '.join(map(str, choices))}")
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if spec.minimum is not None and x < spec.minimum:
                raise InvalidInputError(f"{where}: {name} must be >= {spec.minimum:g}, got {x:g}")
            if spec.maximum is not None and x > spec.maximum:
                raise InvalidInputError(f"{where}: {name} must be <= {spec.maximum:g}, got {x:g}")


def _plain(v: Any) -> Any:
    """JSON-able: paths as strings, dataclasses as dicts, tuples as lists."""
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        if hasattr(v, "to_dict"):
            return v.to_dict()
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class Report:
    """Base of every job's report: ``to_dict()`` is the API's answer and ``--json``; ``summary()`` the CLI's and
    the UI's text. Fields whose name starts with ``_`` stay out of ``to_dict``."""

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    def summary(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.to_dict().items())


@dataclass(frozen=True)
class JobSpec:
    """A registered job: its name, request and report types, the run function and a one-line help."""

    name: str
    request: Type[Request]
    report: Type[Report]
    run: Callable[..., Report]
    help: str
    description: str = ""

    def __post_init__(self) -> None:
        # a run that writes a model file from a recipe (merge, prune, the LoRA tools) is appended to its output
        # folder's history (:mod:`lib_sdtoolkit.history`), whichever face calls ``run``
        from ..history import is_recorded

        if is_recorded(self.name):
            from ._record import recording

            object.__setattr__(self, "run", recording(self.name, self.run))


__all__ = ["param", "Request", "Report", "JobSpec", "FieldSpec", "field_specs", "choices_of", "FIELD_LABELS",
           "field_label"]
