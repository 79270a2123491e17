"""The merge-method registry (``lib_sdtoolkit.merge.methods``): every fact of a method is read from its declaration.

Parametrized over the registry, so a method added there is checked here without a new test: it is a choice of the
CLI and of the Merge tab, its declared arguments fit its function, and validation enforces its declared ranges. A
method registered by the test itself (a new range, a Python function) shows that the CLI, the tab, validation and
the engine read the declaration rather than lists of their own."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_sdtoolkit.errors import InvalidInputError
from lib_sdtoolkit.files import open_model
from lib_sdtoolkit.merge import MergeRecipe, merge_files
from lib_sdtoolkit.merge import engine as merge_engine
from lib_sdtoolkit.merge import methods as mm

ROOT = Path(__file__).resolve().parent.parent
NAMES = mm.names()


def _cli_method_choices() -> list:
    from lib_sdtoolkit.merge import cli as merge_cli

    parser = argparse.ArgumentParser()
    merge_cli.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["merge"]
    return list(next(a for a in sub._actions if a.dest == "method").choices), sub.format_help()


def _tab_method_choices(tmp_path: Path) -> list:
    import gradio as gr

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.ui import merge_tab

    host = StandaloneHost(models_dir=tmp_path / "models", create=True)
    with gr.Blocks() as demo:
        merge_tab.build(host)
    for block in demo.blocks.values():
        if getattr(block, "elem_id", None) == "sdtoolkit_merge_method":
            # gradio 3: ["name", ...]; gradio 4: [("name", "name"), ...]
            return [c[1] if isinstance(c, (tuple, list)) else c for c in block.choices]
    raise AssertionError("the Merge tab has no method dropdown")


@pytest.fixture(scope="module")
def cli_choices():
    return _cli_method_choices()


@pytest.fixture(scope="module")
def tab_choices(tmp_path_factory):
    return _tab_method_choices(tmp_path_factory.mktemp("tab"))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_is_offered_by_the_cli_and_the_tab(name, cli_choices, tab_choices):
    assert name in cli_choices[0]
    assert name in tab_choices
    spec = mm.get(name)
    if spec.beta is not None:  # --beta's help says what beta means for it
        assert f"{name}: {spec.beta.meaning}" in " ".join(cli_choices[1].split())


@pytest.mark.parametrize("name", NAMES)
def test_declared_args_fit_the_function(name):
    spec = mm.get(name)
    params = list(inspect.signature(spec.resolve()).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(spec.args) <= len(positional)
    required = [p for p in positional if p.default is p.empty]
    assert len(spec.args) >= len(required), f"{name} leaves required parameters unset"
    if "inplace" in spec.args:
        assert positional[spec.args.index("inplace")].name == "inplace"


def _outside(r: mm.Ratio) -> list:
    """Values just outside the range, and the open ends themselves."""
    vals = [r.low - 0.01, r.high + 0.01]
    if r.low_open:
        vals.append(r.low)
    if r.high_open:
        vals.append(r.high)
    return vals


def _inside(r: mm.Ratio) -> list:
    return [v for v in (r.low, r.high, (r.low + r.high) / 2) if r.contains(v)]


@pytest.mark.parametrize("name", NAMES)
def test_validation_uses_the_declared_ranges_and_model_counts(name):
    spec = mm.get(name)
    lo, hi = spec.models
    c = "c.safetensors" if lo >= 3 else None
    base = dict(model_a="a.safetensors", model_b="b.safetensors", model_c=c, method=name)
    if spec.beta is not None and spec.beta.default is None:
        with pytest.raises(InvalidInputError, match=f"needs beta .*{spec.beta.meaning}"):
            MergeRecipe(**base).validate()
        base["beta"] = _inside(spec.beta)[0]
    MergeRecipe(**base).validate()
    for v in _inside(spec.alpha):
        MergeRecipe(**{**base, "alpha": v}).validate()
    for v in _outside(spec.alpha):
        with pytest.raises(InvalidInputError, match="outside"):
            MergeRecipe(**{**base, "alpha": v}).validate()
        if not spec.alpha.strict:
            MergeRecipe(**{**base, "alpha": v, "allow_extrapolation": True}).validate()
    if spec.beta is not None:
        for v in _inside(spec.beta):
            MergeRecipe(**{**base, "beta": v}).validate()
        for v in _outside(spec.beta):
            with pytest.raises(InvalidInputError, match=r"outside|must be in"):
                MergeRecipe(**{**base, "beta": v}).validate()
            extra = MergeRecipe(**{**base, "beta": v, "allow_extrapolation": True})
            if spec.beta.strict:
                with pytest.raises(InvalidInputError, match="must be in"):
                    extra.validate()
            else:
                extra.validate()
            # per-block beta values are held to the same range
            blocks = [_inside(spec.beta)[0]] * 24 + [v]
            with pytest.raises(InvalidInputError, match=r"outside|must be in"):
                MergeRecipe(**{**base, "blocks_beta": blocks}).block_ratios("SD1")
    # model counts
    if lo == 3:
        with pytest.raises(InvalidInputError, match="takes 3 models"):
            MergeRecipe(**{**base, "model_c": None}).validate()
    if hi == 2:
        with pytest.raises(InvalidInputError, match="takes 2 models"):
            MergeRecipe(**{**base, "model_c": "c.safetensors"}).validate()
    if lo == 2 and hi == 3:
        MergeRecipe(**{**base, "model_c": "c.safetensors"}).validate()


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(InvalidInputError) as e:
        MergeRecipe("a", "b", method="nope").validate()
    assert all(n in str(e.value) for n in NAMES)


def test_dare_block_beta_of_one_is_refused_before_merging():
    """A drop rate of 1 would divide by zero: refused as bad input for per-block values too (it used to reach
    ``dare_delta`` mid-merge and escape as a ValueError)."""
    r = MergeRecipe("a", "b", method="dare", blocks_beta=[0.5] * 24 + [1.0])
    r.validate()
    with pytest.raises(InvalidInputError, match="drop rate"):
        r.block_ratios("SD1")


def test_declarations_are_checked():
    ok = dict(title="T", formula="f", help="h", function=lambda a, b, alpha: a, models=(2, 2))
    with pytest.raises(ValueError, match="already registered"):
        mm.register(mm.MergeMethod("weighted_sum", args=("a", "b", "alpha"), elementwise=True, **ok))
    with pytest.raises(ValueError, match="unknown args"):
        mm.register(mm.MergeMethod("t_bad", args=("a", "b", "gamma"), elementwise=True, **ok))
    with pytest.raises(ValueError, match="elementwise"):
        mm.register(mm.MergeMethod("t_bad", args=("a", "others", "alpha"), elementwise=True, **ok))
    with pytest.raises(ValueError, match="no beta"):
        mm.register(mm.MergeMethod("t_bad", args=("a", "b", "alpha", "beta"), elementwise=False, **ok))
    assert "t_bad" not in mm.REGISTRY


def test_registry_and_merge_cli_import_no_torch():
    """``merge --help`` (the parser and the registry) must not import torch; the maths is resolved on first use."""
    code = ("import sys, argparse\n"
            "import lib_sdtoolkit.merge.methods as mm\n"
            "from lib_sdtoolkit.merge import cli\n"
            "cli.register(argparse.ArgumentParser().add_subparsers())\n"
            "print(len(mm.names()), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(NAMES)), "False"]


# ------------------------------------------------------------------------------------- a method registered here

def _scaled_sum(a, b, alpha, beta, inplace):
    """The test method: ``alpha*A + beta*B`` (not one of ours), recording the size of each call."""
    _CALLS.append(a.numel())
    return a * float(alpha) + b * float(beta)


_CALLS: list = []


@pytest.fixture
def test_method():
    spec = mm.register(mm.MergeMethod(
        "test_scaled_sum", "Test scaled sum", "M*A + beta*B", "a method registered by the test",
        _scaled_sum, ("a", "b", "alpha", "beta", "inplace"), (2, 2), elementwise=True,
        alpha=mm.Ratio("alpha", "scale of A", 0.5, low=0.1, high=2.0),
        beta=mm.Ratio("beta", "scale of B", 0.3, low=0.25, high=0.75, high_open=True, strict=True)))
    _CALLS.clear()
    yield spec
    mm.unregister("test_scaled_sum")


def test_a_registered_method_reaches_every_face_and_its_range_is_enforced(test_method, fixture_files, tmp_path,
                                                                         monkeypatch):
    choices, help_text = _cli_method_choices()
    assert "test_scaled_sum" in choices and "scale of B [0.25, 0.75)" in " ".join(help_text.split())
    assert "test_scaled_sum" in _tab_method_choices(tmp_path)
    a, b = str(fixture_files["sd1_fp16"]), str(fixture_files["sd1_bf16"])
    MergeRecipe(a, b, method="test_scaled_sum", alpha=1.5).validate()  # alpha up to 2 for this method
    MergeRecipe(a, b, method="test_scaled_sum", beta=0.25).validate()
    for beta in (0.2, 0.75, 0.9):
        with pytest.raises(InvalidInputError, match=r"scale of B and must be in \[0.25, 0.75\)"):
            MergeRecipe(a, b, method="test_scaled_sum", beta=beta, allow_extrapolation=True).validate()
    with pytest.raises(InvalidInputError, match="outside"):
        MergeRecipe(a, b, method="test_scaled_sum", alpha=0.05).validate()
    with pytest.raises(InvalidInputError, match="takes 2 models"):
        MergeRecipe(a, b, "c", method="test_scaled_sum").validate()

    # the engine calls the declared function, chunk by chunk because it is declared elementwise
    monkeypatch.setattr(merge_engine, "SMALL_ELEMENTS", 20000)
    monkeypatch.setattr(merge_engine, "CHUNK_ELEMENTS", 7777)
    out = tmp_path / "t.safetensors"
    rep = merge_files(MergeRecipe(a, b, method="test_scaled_sum", alpha=1.5, dtype="fp32"), out)
    # tensors up to SMALL_ELEMENTS in one piece, larger ones in chunks of CHUNK_ELEMENTS
    assert rep.method == "test_scaled_sum" and max(_CALLS) <= 20000 and 7777 in _CALLS
    A, B, O = load_file(a), load_file(b), load_file(str(out))
    merged = [k for k, t in A.items() if t.is_floating_point() and not k.endswith("position_ids")]
    assert max(A[k].numel() for k in merged) > 20000
    for k in merged:
        assert torch.equal(O[k], A[k].float() * 1.5 + B[k].float() * 0.3), k  # 0.3: the declared default beta
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["interp_method"] == "test_scaled_sum" and recipe["beta"] == 0.3


def test_a_method_not_declared_elementwise_gets_whole_tensors(fixture_files, tmp_path, monkeypatch):
    spec = mm.register(mm.MergeMethod(
        "test_whole", "Test whole", "A*(1-M) + B*M", "weighted sum, declared not elementwise", _scaled_sum,
        ("a", "b", "alpha", "beta", "inplace"), (2, 2), elementwise=False,
        beta=mm.Ratio("beta", "scale of B", 0.5)))
    try:
        _CALLS.clear()
        monkeypatch.setattr(merge_engine, "SMALL_ELEMENTS", 20000)
        monkeypatch.setattr(merge_engine, "CHUNK_ELEMENTS", 7777)
        a, b = str(fixture_files["sd1_fp16"]), str(fixture_files["sd1_bf16"])
        merge_files(MergeRecipe(a, b, method=spec.name), tmp_path / "w.safetensors")
        with open_model(a) as r:
            biggest = max(i.numel for i in r.infos().values() if i.dtype.is_floating_point)
        assert max(_CALLS) == biggest > 20000
    finally:
        mm.unregister(spec.name)
