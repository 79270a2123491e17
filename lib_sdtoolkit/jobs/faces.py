"""What the faces derive from a job's request dataclass: CLI flags, the API body model, UI handlers.

* :func:`add_cli` adds a job's sub-command: one flag per field (``--field-name``; bools as switches; positional
  fields as arguments), ``--json``, and a handler that runs the job on the command line's :class:`LocalHost`.
* :func:`body_model` builds the pydantic model of the API body (``extra="forbid"``: an unknown field is a 422,
  not silently dropped), and :func:`add_route` a POST route running the job.
* :func:`ui_handler` turns a dict of gradio values (``{field: component}``) into a request and a report.

pydantic and fastapi are imported only by the API helpers; argparse only by the CLI helpers.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import SdToolkitError
from ..progress import Progress, tqdm_progress
from .base import FIELD_LABELS, FieldSpec, JobSpec, Report, Request, choices_of


# ------------------------------------------------------------------------------------------------- the CLI
def _flag(spec: FieldSpec) -> str:
    return spec.flag or "--" + spec.name.replace("_", "-")


def cli_label(spec: FieldSpec) -> str:
    """How the command line names a field in errors: its flag (``--overwrite``), a positional its metavar."""
    if spec.positional:
        return spec.metavar or spec.name.upper()
    if spec.base is bool and spec.default is True:
        return spec.negate or "--no-" + spec.name.replace("_", "-")
    return _flag(spec)


FIELD_LABELS["cli"] = cli_label


def _help_with_default(spec: FieldSpec, text: Optional[str]) -> Optional[str]:
    """The field's help plus its default where the help does not say it (bools and empty defaults: nothing)."""
    if not text:
        return text
    d = spec.default
    if spec.base is bool or d is None or d == [] or d == "" or spec.positional or "default" in text.lower():
        return text
    shown = f"{d:g}" if isinstance(d, float) else str(d)
    return f"{text} (default: {shown})"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain text table: a header line, a rule, one line per row; columns padded to their widest cell
    (``right``: indexes of columns aligned right, e.g. sizes and counts)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def key_value_table(pairs: Sequence[Tuple[str, Any]]) -> str:
    """``name  value`` lines, the names padded to one width (a one-result report)."""
    pairs = [(k, v) for k, v in pairs if v is not None and v != ""]
    w = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in pairs)


def cli_error_text(message: str, request: type) -> str:
    """An error's text as the command line should say it: "pass overwrite" names the flag, "--overwrite"."""
    labels = {s.name: cli_label(s) for s in request.fields() if s.cli}

    def sub(m: "re.Match[str]") -> str:
        return m.group(1) + labels.get(m.group(2), m.group(2))

    return re.sub(r"\b(pass |use |set |with )(\w+)\b", sub, message)


def add_request_arguments(parser: Any, request: type, skip: Sequence[str] = ()) -> None:
    """One argparse argument per CLI field of ``request`` (defaults left out: unset flags are not sent, so the
    request's own defaults apply, the same as an API body without the field)."""
    import argparse

    for s in request.fields():
        if not s.cli or s.name in skip:
            continue
        help_text = _help_with_default(s, (s.help() if callable(s.help) else s.help) or None)
        if s.positional:
            nargs = ("+" if s.required else "*") if s.is_list else (None if s.required else "?")
            parser.add_argument(s.name, nargs=nargs, metavar=s.metavar or s.name.upper(), help=help_text,
                                default=argparse.SUPPRESS if not s.required else None)
            continue
        names = [_flag(s)] + ([s.short] if s.short else [])
        if s.base is bool:
            if s.default is True:  # the flag turns the field off: its help says what is turned off
                parser.add_argument(s.negate or "--no-" + s.name.replace("_", "-"), dest=s.name,
                                    action="store_false", default=argparse.SUPPRESS,
                                    help=f"turn off (on by default): {help_text}" if help_text else None)
            else:
                parser.add_argument(*names, dest=s.name, action="store_true", default=argparse.SUPPRESS,
                                    help=help_text)
            continue
        kw: Dict[str, Any] = dict(dest=s.name, default=argparse.SUPPRESS, help=help_text,
                                  metavar=s.metavar, required=s.required)
        choices = choices_of(s)
        if choices is not None:
            kw["choices"] = choices
            kw.pop("metavar")
        if s.is_list and s.item_type is not str and typing.get_origin(s.base) is not typing.Union:
            kw["nargs"] = "+"
        if s.base is int:
            kw["type"] = int
        elif s.base is float:
            kw["type"] = float
        parser.add_argument(*names, **kw)


def request_from_args(request: type, args: Any) -> Request:
    data = {s.name: getattr(args, s.name) for s in request.fields() if s.cli and hasattr(args, s.name)}
    data = {k: v for k, v in data.items() if not (v is None or v == [])} if data else data
    return request.from_dict(data, face="cli")


def add_cli(subparsers: Any, spec: JobSpec, command: Optional[str] = None, *, host_factory: Any = None,
            render: Optional[Callable[[Report], str]] = None, epilog: Optional[str] = None,
            exit_code: Optional[Callable[[Report], int]] = None, quiet_flag: bool = True,
            json_view: Optional[Callable[[Report], Any]] = None,
            stderr: Optional[Callable[[Report], Sequence[str]]] = None) -> Any:
    """Register ``command`` (default: the job's name) running ``spec`` with the one progress helper
    (:func:`lib_sdtoolkit.progress.tqdm_progress`: bars on stderr when it is a terminal, nothing in logs and pipes;
    ``-q/--quiet``: none at all).

    ``render``: the text printed (default ``report.summary()``); ``json_view``: what ``--json`` prints (default
    ``report.to_dict()``); ``stderr``: lines printed on stderr in both modes (files that could not be read);
    ``exit_code``: the exit status from the report (default 0). While the job runs, whatever a library prints
    goes to stderr, so stdout holds the report alone (``--json`` output stays valid JSON). Errors name the
    command line's flags (``--overwrite``, not ``overwrite``)."""
    import argparse

    p = subparsers.add_parser(command or spec.name, help=spec.help, description=spec.description or spec.help,
                              epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_arguments(p, spec.request)
    p.add_argument("--json", dest="_json", action="store_true",
                   help="print the report as JSON on stdout (nothing else goes to stdout)")
    if quiet_flag and not any(s.name == "quiet" for s in spec.request.fields()):  # vae: the request's own
        p.add_argument("-q", "--quiet", dest="_quiet", action="store_true", help="no progress bars")

    def handler(args: argparse.Namespace) -> int:
        from ..host import LocalHost

        try:
            req = request_from_args(spec.request, args)
            host = host_factory(args) if host_factory is not None else LocalHost()
            with contextlib.redirect_stdout(sys.stderr):  # libraries' prints ("No module 'xformers'") off stdout
                report = spec.run(host, req, Progress() if getattr(args, "_quiet", False) else tqdm_progress())
        except SdToolkitError as e:
            text = cli_error_text(str(e), spec.request)
            if text != str(e):
                e.args = (text,)
            raise
        if getattr(args, "_json", False):
            view = json_view(report) if json_view is not None else report.to_dict()
            print(json.dumps(view, indent=2, default=str))
        else:
            print(render(report) if render is not None else report.summary())
        for line in (stderr(report) if stderr is not None else ()):
            print(line, file=sys.stderr)
        return exit_code(report) if exit_code is not None else 0

    p.set_defaults(func=handler)
    return p


# ------------------------------------------------------------------------------------------------- the API
_MODELS: Dict[Tuple[type, Tuple[str, ...]], Any] = {}


def body_model(request: type, exclude: Sequence[str] = ()) -> Any:
    """The pydantic model of ``request``'s API body: its API fields, their defaults, ``extra="forbid"``."""
    key = (request, tuple(exclude))
    got = _MODELS.get(key)
    if got is not None:
        return got
    import pydantic
    from pydantic import Field, create_model

    fields: Dict[str, Any] = {}
    for s in request.fields():
        if not s.api or s.name in exclude:
            continue
        tp = s.type
        kw: Dict[str, Any] = {"description": (s.help() if callable(s.help) else s.help) or None}
        if s.required:
            fields[s.name] = (tp, Field(..., **kw))
        elif isinstance(s.default, (list, dict)):
            fields[s.name] = (tp, Field(default_factory=lambda d=s.default: type(d)(d), **kw))
        else:
            fields[s.name] = (tp, Field(s.default, **kw))
    name = request.__name__.replace("Request", "") + "Body"
    if int(pydantic.VERSION.split(".")[0]) >= 2:
        from pydantic import ConfigDict

        model = create_model(name, __config__=ConfigDict(extra="forbid"), **fields)
    else:  # pragma: no cover - pydantic 1 (A1111's pin)
        class Config:
            extra = pydantic.Extra.forbid

        model = create_model(name, __config__=Config, **fields)
    _MODELS[key] = model
    return model


def dump_body(body: Any) -> Dict[str, Any]:
    """The fields the client sent (unsent ones keep the request's defaults, as on the CLI)."""
    if body is None:
        return {}
    if hasattr(body, "model_dump"):
        return body.model_dump(exclude_unset=True)
    return body.dict(exclude_unset=True)  # pragma: no cover - pydantic 1


def host_progress(host: Any) -> Progress:
    """A Progress reporting through the host's own progress sink (``Host.progress_callback``: the face's bar,
    the server's log), one ``update`` per phase."""
    ticks: Dict[str, Any] = {}

    def sink(phase: str, done: int, total: Optional[int], detail: str) -> None:
        tick = ticks.get(phase)
        if tick is None:
            tick = ticks[phase] = host.progress_callback(phase, total)
        tick(done, total)

    return Progress(sink)


def add_route(router: Any, host: Any, spec: JobSpec, path: str, *, optional_body: bool = False,
              answer: Optional[Callable[[Report], Dict[str, Any]]] = None,
              progress: Optional[Callable[[Any], Progress]] = None) -> None:
    """``POST path`` running ``spec`` on ``host`` with the body checked against the request dataclass
    (``progress(host)``, e.g. :func:`host_progress`, makes each run's Progress; default: silent)."""
    Body = body_model(spec.request)

    def endpoint(body):  # annotations set below: FastAPI reads them at registration
        req = spec.request.from_dict(dump_body(body))
        report = spec.run(host, req, progress(host) if progress is not None else Progress())
        return answer(report) if answer is not None else report.to_dict()

    endpoint.__annotations__ = {"body": Optional[Body] if optional_body else Body, "return": dict}
    if optional_body:
        endpoint.__defaults__ = (None,)
    endpoint.__name__ = spec.name.replace("-", "_")
    endpoint.__doc__ = spec.description or spec.help
    router.post(path)(endpoint)
    # which job answers which path: the route tests walk this to check every job route against the gate
    if not hasattr(router, "sdtoolkit_job_routes"):
        router.sdtoolkit_job_routes = {}
    router.sdtoolkit_job_routes[path] = spec


# ------------------------------------------------------------------------------------------------- the UI
def ui_request(request: type, values: Mapping[str, Any], **fixed: Any) -> Request:
    """A request from a tab's values (``{field: value}``; blank strings of optional fields become None)."""
    specs = {s.name: s for s in request.fields()}
    data: Dict[str, Any] = {}
    for k, v in {**values, **fixed}.items():
        s = specs.get(k)
        if s is not None and isinstance(v, str) and not v.strip() and (s.optional or s.base is not str):
            continue  # an empty textbox means "not given"
        data[k] = v
    return request.from_dict(data, face="ui")


def bind(components: Mapping[str, Any]) -> Tuple[List[Any], Callable[..., Dict[str, Any]]]:
    """``(inputs, unpack)`` for a gradio event: ``inputs`` is the component list in a fixed order and
    ``unpack(*values)`` gives ``{field: value}`` back (no positional tuples to keep in step by hand)."""
    names = list(components)
    comps = [components[n] for n in names]

    def unpack(*values: Any) -> Dict[str, Any]:
        return dict(zip(names, values[:len(names)]))

    return comps, unpack


def error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SdToolkitError) else f"{type(exc).__name__}: {exc}"


__all__ = ["add_request_arguments", "request_from_args", "add_cli", "body_model", "dump_body", "host_progress",
           "add_route", "format_table", "key_value_table", "cli_label", "cli_error_text",
           "ui_request", "bind", "error_text"]
