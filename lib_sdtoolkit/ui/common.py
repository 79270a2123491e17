"""Small helpers shared by the tab builders: model pickers, sizes, error display."""
from __future__ import annotations

import html
import inspect
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import InvalidInputError, SdToolkitError
from ..host import MODEL_KINDS, Host
from ..inspect import human_bytes  # noqa: F401 - re-exported for the tabs

_CHOICE = re.compile(r"^\[(\w+)\] (.+)$")


def model_choices(host: Host, kinds: Sequence[str] = MODEL_KINDS) -> List[str]:
    """Dropdown entries ``[kind] relative/name.safetensors`` for every model of ``kinds``."""
    out = []
    for kind in kinds:
        for p in host.list_models(kind):
            out.append(f"[{kind}] {host.display_name(p, kind)}")
    return out


def model_picker(host: Host, kinds: Sequence[str], prefix: str):
    """The model picker the tabs share: a dropdown of ``kinds``, a Refresh button, and a path box. The one touched
    last is used: typing fills the box, picking in the dropdown clears it (so the box never silently wins over a
    later pick; the tabs also say which one they used). Returns ``(dropdown, refresh_button, path_box)``;
    element ids are ``sdtoolkit_<prefix>_model|refresh|path``. The dropdown is registered with
    :func:`register_picker`."""
    import gradio as gr

    choices = model_choices(host, kinds)
    with gr.Row(elem_classes=["sdtoolkit-picker"]):
        model = gr.Dropdown(label="Model", choices=choices, value=choices[0] if choices else None,
                            elem_id=f"sdtoolkit_{prefix}_model", scale=5)
        refresh = gr.Button("Refresh", elem_id=f"sdtoolkit_{prefix}_refresh", elem_classes=["sdtoolkit-tool"],
                            scale=1, min_width=90)
    path = gr.Textbox(label="...or a name / path under the model folders (used while it holds text; picking in the "
                            "list clears it)", lines=1, elem_id=f"sdtoolkit_{prefix}_path")
    register_picker(model, kinds, tagged=True)
    if hasattr(model, "select"):
        model.select(lambda: "", inputs=[], outputs=[path], queue=False)
    return model, refresh, path


def sample_file(host: Host, name: str) -> Optional[str]:
    """The path of a sample library file (``"image"``, ``"latent"``, see ``samples.library.NAMES``) when the host's
    models folder holds it, for a tab's default value; else None."""
    root = getattr(host, "models_root", None)
    if root is None:
        return None
    from ..samples.library import NAMES

    p = Path(root) / NAMES[name]
    return str(p) if p.is_file() else None


def parse_choice(choice: str) -> Tuple[Optional[str], str]:
    """``"[vae] x.safetensors"`` -> ``("vae", "x.safetensors")``; anything else -> ``(None, choice)``."""
    m = _CHOICE.match(choice.strip())
    if m and m.group(1) in MODEL_KINDS:
        return m.group(1), m.group(2)
    return None, choice.strip()


def resolve_input(host: Host, choice: Optional[str], path: Optional[str] = None) -> Path:
    """The file picked in the UI: the path box wins over the dropdown; both go through ``host.resolve``."""
    if path and path.strip():
        return host.resolve(path.strip())
    if choice:
        kind, name = parse_choice(choice)
        return host.resolve(name, kind)
    raise InvalidInputError("pick a model or type its path first")



def supported_kwargs(component: Callable[..., Any], **kwargs: Any) -> Dict[str, Any]:
    """The keyword arguments that ``component``'s constructor names explicitly (feature detection across gradio
    versions): e.g. ``gr.LinePlot`` takes ``tooltip``/``width`` in gradio 3.41 but only warns about them (deprecated,
    ignored) in 4.40, where they fall into ``**kwargs``."""
    try:
        params = inspect.signature(component).parameters
    except (TypeError, ValueError):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params and params[k].kind is not inspect.Parameter.VAR_KEYWORD}


def empty_table(headers: Sequence[str]) -> Any:
    """A table value with the column headers and no rows, for a ``gr.Dataframe`` (gradio 3.41 and 4.x).

    Returning ``[]`` instead makes gradio 3.41 cut the headers down to the width of the first row, i.e. to none;
    leaving the initial value at None shows one placeholder row (``0`` in a number column)."""
    import pandas as pd

    return pd.DataFrame(columns=list(headers))


def error_html(exc: BaseException) -> str:
    kind = "Error" if isinstance(exc, SdToolkitError) else type(exc).__name__
    return f'<div class="sdtoolkit-error"><b>{html.escape(kind)}:</b> {html.escape(str(exc))}</div>'


def keep_value(choices: Iterable[str], current: Optional[str]) -> Optional[str]:
    choices = list(choices)
    if current in choices:
        return current
    return choices[0] if choices else None


# ------------------------------------------------------------------------------------------------ progress and Stop
def eta_text(seconds: float) -> str:
    """``ETA 5 s`` / ``ETA 2 min 5 s`` / ``ETA 1 h 2 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"ETA {s} s"
    if s < 3600:
        return f"ETA {s // 60} min {s % 60} s"
    return f"ETA {s // 3600} h {(s % 3600) // 60} min"


class _PhaseClock:
    """Per phase: when it started and how far it got, for the ETA (time so far / share done * share left)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.phase: Optional[str] = None
        self.start = 0.0

    def describe(self, phase: str, done: int, total: Optional[int], detail: str = "") -> Tuple[Optional[float], str]:
        now = self.clock()
        if phase != self.phase:
            self.phase, self.start = phase, now
        if not total:
            return None, phase + (f" ({detail})" if detail else "")
        frac = min(1.0, max(0.0, done / total))
        text = f"{phase}: {done}/{total}" if total < 100_000 else f"{phase}: {frac:.0%}"
        elapsed = now - self.start
        if 0 < frac < 1 and elapsed > 0.5:
            text += " · " + eta_text(elapsed / frac * (1 - frac))
        return frac, text


#: the jobs each page is running now, by Stop key: weak, so a finished job's Progress disappears by itself
_RUNNING: Dict[str, "weakref.WeakSet[Any]"] = {}


def gradio_progress(progress: Any, stop_key: Optional[str] = None,
                    clock: Callable[[], float] = time.monotonic) -> "Any":
    """The job layer's :class:`~lib_sdtoolkit.progress.Progress` drawing on a ``gr.Progress`` (None: silent): the
    phase's name, done/total and an ETA per phase. With ``stop_key`` the tab's Stop button (:func:`stop_button`)
    cancels it: the job's next ``check`` raises ``Cancelled`` and the job removes what it started writing."""
    from ..progress import Progress

    if progress is None:
        out = Progress()
    else:
        eta = _PhaseClock(clock)

        def sink(phase: str, done: int, total: Optional[int], detail: str) -> None:
            frac, desc = eta.describe(phase, done, total, detail)
            try:
                progress(frac, desc=desc)
            except Exception:  # noqa: BLE001 - a closed page must not stop the job
                pass

        out = Progress(sink)
    if stop_key is not None:
        _RUNNING.setdefault(stop_key, weakref.WeakSet()).add(out)
    return out


def stop_jobs(stop_key: str) -> int:
    """Cancel every job running under ``stop_key``; returns how many were told."""
    running = list(_RUNNING.get(stop_key, ()))
    for p in running:
        p.cancel()
    return len(running)


def stop_button(stop_key: str, status: Any = None):
    """A Stop button for the tab's long jobs (``queue=False``: it must not wait behind the job it stops)."""
    import gradio as gr

    btn = gr.Button("Stop", variant="stop", elem_id=f"sdtoolkit_{stop_key}_stop", elem_classes=["sdtoolkit-stop"],
                    min_width=80)

    def do_stop():
        n = stop_jobs(stop_key)
        msg = "Stopping: the job ends at its next step and removes its partial output." if n else "Nothing runs."
        return f'<div class="sdtoolkit-warn">{html.escape(msg)}</div>'

    btn.click(do_stop, inputs=[], outputs=[status] if status is not None else [], queue=False)
    return btn


# ------------------------------------------------------------------------------------------------ model pickers
@dataclass
class _Picker:
    component: Any
    kinds: Tuple[str, ...]
    tagged: bool           # entries "[kind] name" (else the display name alone)
    extra: Tuple[str, ...]  # entries before the models ("", "None")
    multiselect: bool
    keep_empty: bool       # an empty value stays empty (an optional picker) instead of taking the first entry
    default_index: int = 0  # the entry an empty / vanished value falls back to (Model B: the second one)


@dataclass
class PickerSet:
    """Every model picker of one built UI and the events that write model files. :meth:`wire` makes each writing
    event refresh every picker once it ends, and the page's load refresh them all: a new file shows up in every list
    without a Refresh click, and a page opened later lists what was written since the UI was built."""

    pickers: List[_Picker] = field(default_factory=list)
    writers: List[Any] = field(default_factory=list)
    #: inputs whose default is a sample library file (image, latent): filled when empty and the file exists
    samples: List[Tuple[Any, str]] = field(default_factory=list)
    #: views of what writes change (the History table): (fn, inputs, outputs), run after writes and on page load
    views: List[Tuple[Callable[..., Any], List[Any], List[Any]]] = field(default_factory=list)

    def components(self) -> List[Any]:
        return [p.component for p in self.pickers] + [c for c, _ in self.samples]

    def refresh(self, host: Host, *current: Any) -> List[Any]:
        """Updates for every picker (then every sample input) given their current values, in that order. The lists
        are read from the folders (``host.list_models`` walks them each time); the host's own lists (the WebUI's)
        are not re-scanned here: a job that writes refreshes them itself, and a page load must not."""
        n = len(self.pickers)
        out = self._refresh_pickers(host, *current[:n])
        for (_, name), cur in zip(self.samples, current[n:]):
            path = sample_file(host, name) if cur is None else None
            out.append(_update(value=path) if path else _update())
        return out

    def _refresh_pickers(self, host: Host, *current: Any) -> List[Any]:
        cache: Dict[Tuple[Tuple[str, ...], bool], List[str]] = {}
        out = []
        for p, cur in zip(self.pickers, current):
            key = (p.kinds, p.tagged)
            if key not in cache:
                cache[key] = (model_choices(host, p.kinds) if p.tagged else
                              [host.display_name(f, k) for k in p.kinds for f in host.list_models(k)])
            choices = list(p.extra) + cache[key]
            if p.multiselect:
                out.append(_update(choices=choices, value=[c for c in (cur or []) if c in choices]))
            elif p.keep_empty and not cur:
                out.append(_update(choices=choices, value=cur))
            elif cur in choices:
                out.append(_update(choices=choices, value=cur))
            else:
                out.append(_update(choices=choices,
                                   value=choices[min(p.default_index, len(choices) - 1)] if choices else None))
        return out

    def wire(self, host: Host, blocks: Any = None) -> None:
        comps = self.components()

        def refresh_all(*current: Any) -> List[Any]:
            return self.refresh(host, *current)

        # the WebUI builds its UI once at start-up: what a tab shows at build time is stale on every later page
        # load unless the load event recomputes it (the History table was, in the real A1111 1.10.1)
        wired = ([(refresh_all, comps, comps)] if comps else []) + [(fn, list(i), list(o)) for fn, i, o in self.views]
        for fn, inputs, outputs in wired:
            for event in self.writers:
                then = getattr(event, "then", None)
                if then is not None:
                    then(fn, inputs=inputs, outputs=outputs)
            if blocks is not None and hasattr(blocks, "load"):
                blocks.load(fn, inputs=inputs, outputs=outputs)


def _update(**kw: Any) -> Any:
    import gradio as gr

    return gr.update(**kw)


#: the PickerSet of the UI being built (set by ``ui.build_tabs``; None: a tab built alone keeps its own Refresh)
_BUILDING: List[PickerSet] = []


def register_picker(component: Any, kinds: Sequence[str], tagged: bool = False, extra: Sequence[str] = (),
                    multiselect: bool = False, keep_empty: bool = False, default_index: int = 0) -> Any:
    """Declare a model dropdown (entries of ``kinds``: ``[kind] name`` when ``tagged``, else display names, after
    ``extra``) so that writes and page loads refresh it. Returns the component."""
    if _BUILDING:
        _BUILDING[-1].pickers.append(_Picker(component, tuple(kinds), tagged, tuple(extra), multiselect, keep_empty,
                                             default_index))
    return component


def writes(event: Any) -> Any:
    """Declare an event (the value a ``.click`` returns) whose job may write or move a model file: every picker is
    refreshed when it ends. Returns the event."""
    if _BUILDING:
        _BUILDING[-1].writers.append(event)
    return event


def register_view(fn: Callable[..., Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
    """Declare a view of what writing events change (the History table and its entry list): ``fn(*inputs)`` returns
    the ``outputs``' new values; it runs after every write and when the page loads (the WebUI built the UI once at
    its start-up, so a value computed at build time is stale on a later page)."""
    if _BUILDING:
        _BUILDING[-1].views.append((fn, list(inputs), list(outputs)))


def register_sample(component: Any, name: str) -> Any:
    """Declare an input whose default is the sample library's ``name`` file (see :func:`sample_file`): when the
    library appears after the UI was built (the Create button), a write or page load fills the empty input."""
    if _BUILDING:
        _BUILDING[-1].samples.append((component, name))
    return component


class building_pickers:
    """``with building_pickers() as pickers: ...build tabs...; pickers.wire(host, blocks)``."""

    def __enter__(self) -> PickerSet:
        _BUILDING.append(PickerSet())
        return _BUILDING[-1]

    def __exit__(self, *exc: Any) -> None:
        _BUILDING.pop()
