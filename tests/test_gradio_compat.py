"""UI code must run on gradio 3.41 (A1111) and 4.x (Forge). CI has gradio 3 only, so the gradio-3-only spellings
found when the app was driven under gradio 4.40 are checked statically here, plus the two runtime fixes."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import gradio as gr
import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "lib_sdtoolkit" / "ui").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
PLOTS = {"LinePlot", "ScatterPlot", "BarPlot"}


def _calls(path: Path) -> Iterator[Tuple[ast.Call, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, f"{path.relative_to(ROOT)}:{node.lineno}"


def _gr_attr(func: ast.AST) -> str:
    """``gr.X`` -> ``"X"``; anything else -> ``""``."""
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "gr":
        return func.attr
    return ""


def test_the_scan_sees_the_ui_files() -> None:
    names = {p.name for p in UI_FILES}
    assert {"merge_tab.py", "controlnet_tab.py", "sdtoolkit_controlnet.py", "sdtoolkit_tiled_vae.py"} <= names


def test_no_gradio3_only_calls_in_ui_code() -> None:
    bad: List[str] = []
    for path in UI_FILES:
        for call, where in _calls(path):
            func = call.func
            kws = {k.arg for k in call.keywords if k.arg}
            # gr.Textbox.update(...) etc.: gone in 4.x (gr.update(...) works in both)
            if isinstance(func, ast.Attribute) and func.attr == "update" and _gr_attr(func.value):
                bad.append(f"{where}: gr.{_gr_attr(func.value)}.update(...) -> gr.update(...)")
            # component.style(...): removed in 4.x
            if isinstance(func, ast.Attribute) and func.attr == "style":
                bad.append(f"{where}: .style(...) was removed in gradio 4; pass the arguments to the constructor")
            name = _gr_attr(func)
            if name in ("Box", "Variable"):
                bad.append(f"{where}: gr.{name} does not exist in gradio 4 (gr.Group / gr.State)")
            if "_js" in kws:
                bad.append(f"{where}: _js= is js= in gradio 4; feature-detect it")
            if name in ("Image", "Audio", "Video") and ({"source", "tool"} & kws):
                bad.append(f"{where}: gr.{name}(source=/tool=) are gradio-3-only (4.x: sources=[...])")
            if name == "Dataframe" and ({"max_rows", "overflow_row_behaviour"} & kws):
                bad.append(f"{where}: gr.Dataframe(max_rows/overflow_row_behaviour) are gone in gradio 4")
            if name in PLOTS and ({"tooltip", "width"} & kws):
                bad.append(f"{where}: gr.{name}(tooltip=/width=) are deprecated no-ops in 4.40; "
                           "pass them through common.supported_kwargs")
            if isinstance(func, ast.Attribute) and func.attr == "queue" and "concurrency_count" in kws:
                bad.append(f"{where}: queue(concurrency_count=) is gone in gradio 4")
    assert not bad, "\n".join(bad)


def _truth_tested_names(path: Path) -> Iterator[Tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        tests: List[ast.AST] = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            tests.append(node.test)
        elif isinstance(node, ast.BoolOp):
            tests.extend(node.values)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            tests.append(node.operand)
        for t in tests:
            if isinstance(t, ast.Name):
                yield t.id, t.lineno


def test_progress_objects_are_never_truth_tested() -> None:
    """``if progress`` calls ``gr.Progress.__len__``, which raises IndexError (both 3.41 and 4.40) until a tracked
    iterable exists: the handler dies with gradio's bare "Error". Compare with None instead."""
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in UI_FILES for name, line in _truth_tested_names(p)
           if name == "progress"]
    assert not bad, "truth-tested progress objects: " + ", ".join(bad)


def test_a_real_progress_object_reaches_the_lora_handlers(tmp_path: Path) -> None:
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.ui import lora_tab

    with pytest.raises(IndexError):
        bool(gr.Progress())  # the trap the handlers must avoid
    host = StandaloneHost(models_dir=tmp_path, create=True)
    out, rep = lora_tab.run_action(host, "extract", {
        "tuned": "missing-a.safetensors", "base": "missing-b.safetensors", "output": "x.safetensors", "rank": 4,
        "conv_rank": 0, "clamp_quantile": 1.0, "device": "cpu", "dtype": "fp16", "overwrite": False}, gr.Progress())
    assert "sdtoolkit-error" in out and "missing-a" in out and rep is None
    out, rep = lora_tab.run_action(host, "bake", {"checkpoint": "missing.safetensors", "loras": "some-lora:0.5",
                                                  "output": "y.safetensors", "overwrite": False}, gr.Progress())
    assert "sdtoolkit-error" in out and "missing.safetensors" in out and rep is None


def test_supported_kwargs_keeps_only_named_parameters() -> None:
    from lib_sdtoolkit.ui.common import supported_kwargs

    def old_plot(value=None, *, tooltip=None, width=None, **kwargs):  # gradio 3.41's LinePlot shape
        return None

    def new_plot(value=None, *, height=None, **kwargs):  # gradio 4.40's: tooltip/width only reach **kwargs
        return None

    assert supported_kwargs(old_plot, tooltip=["a"], width=600) == {"tooltip": ["a"], "width": 600}
    assert supported_kwargs(new_plot, tooltip=["a"], width=600, height=3) == {"height": 3}
    assert supported_kwargs(new_plot, kwargs=1) == {}
    # the installed gradio: whatever it keeps for LinePlot, the constructor accepts without a warning
    import warnings

    kept = supported_kwargs(gr.LinePlot, tooltip=["block", "ratio"], width=600)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        gr.LinePlot(x="slot", y="ratio", **kept)


def test_every_click_handler_with_a_progress_parameter_gets_it_from_gradio():
    """gradio finds a ``gr.Progress`` default only among the parameters before ``*values`` (checked on 3.41 and
    4.40 with ``gradio.helpers.special_args``): a handler declaring it after ``*values`` never draws its bar."""


    bad = []
    for path in sorted((ROOT / "lib_sdtoolkit" / "ui").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.args.vararg is not None:
                for kw, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
                    if isinstance(default, ast.Call) and ast.unparse(default.func).endswith("Progress"):
                        bad.append(f"{path.name}:{node.lineno} {node.name}")
    assert bad == []
