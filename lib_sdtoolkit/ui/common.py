"""Small helpers shared by the tab builders: model pickers, sizes, error display."""
from __future__ import annotations

import html
import inspect
import re
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
    """The model picker the tabs share: a dropdown of ``kinds``, a Refresh button, and a path box that takes
    precedence (resolve both with :func:`resolve_input`). Returns ``(dropdown, refresh_button, path_box)``;
    element ids are ``sdtoolkit_<prefix>_model|refresh|path``."""
    import gradio as gr

    choices = model_choices(host, kinds)
    with gr.Row(elem_classes=["sdtoolkit-picker"]):
        model = gr.Dropdown(label="Model", choices=choices, value=choices[0] if choices else None,
                            elem_id=f"sdtoolkit_{prefix}_model", scale=5)
        refresh = gr.Button("Refresh", elem_id=f"sdtoolkit_{prefix}_refresh", elem_classes=["sdtoolkit-tool"],
                            scale=1, min_width=90)
    path = gr.Textbox(label="...or a name / path under the model folders (takes precedence)", lines=1,
                      elem_id=f"sdtoolkit_{prefix}_path")
    return model, refresh, path


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


def gradio_progress(progress: Any) -> "Any":
    """The job layer's :class:`~lib_sdtoolkit.progress.Progress` drawing on a ``gr.Progress`` (None: silent)."""
    from ..progress import Progress

    if progress is None:
        return Progress()

    def sink(phase: str, done: int, total: Optional[int], detail: str) -> None:
        try:
            if total:
                progress(min(1.0, done / total), desc=f"{phase} {done}/{total}")
            else:
                progress(None, desc=phase)
        except Exception:  # noqa: BLE001 - a closed page must not stop the job
            pass

    return Progress(sink)
