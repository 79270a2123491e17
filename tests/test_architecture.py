"""DESIGN.md's arrows, read from the code: faces -> jobs -> features -> ops/arch/files, no import cycles, no
timing assertions in tests, and a command line whose ``--help`` does not import torch.

The import graph counts every import statement, at module level or inside a function (a function-level import
is still a dependency; it only hides a cycle from the interpreter)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lib_sdtoolkit"

FACES = ("lib_sdtoolkit.cli", "lib_sdtoolkit.__main__", "lib_sdtoolkit.maintenance_cli", "lib_sdtoolkit.server",
         "lib_sdtoolkit.ui", "lib_sdtoolkit.merge.cli", "lib_sdtoolkit.lora.cli", "lib_sdtoolkit.tiled_vae_cli",
         "lib_sdtoolkit.controlnet.cli", "lib_sdtoolkit.workflow_cli", "lib_sdtoolkit.serve_cli")
JOBS = ("lib_sdtoolkit.jobs",)
GATE = ("lib_sdtoolkit.host", "lib_sdtoolkit.outputs")
BASE = ("lib_sdtoolkit.ops", "lib_sdtoolkit.arch", "lib_sdtoolkit.files", "lib_sdtoolkit.errors",
        "lib_sdtoolkit.validate", "lib_sdtoolkit.progress", "lib_sdtoolkit.plugins")


def _modules() -> Dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    graph: Dict[str, Set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                subs = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in mods]
                if subs:
                    deps.update(subs)  # `from . import presets`: the submodule
                if len(subs) < len(node.names) and prefix in mods:
                    deps.add(prefix)   # names defined in the module / package itself
        deps.discard(mod)
        graph[mod] = deps
    return graph


def _layer(mod: str) -> str:
    def within(prefixes) -> bool:
        return any(mod == p or mod.startswith(p + ".") for p in prefixes)

    if within(FACES):
        return "face"
    if within(JOBS):
        return "job"
    if within(GATE):
        return "gate"
    if within(BASE) or mod == "lib_sdtoolkit":
        return "base"
    return "feature"


ALLOWED = {
    "face": {"face", "job", "gate", "feature", "base"},
    "job": {"job", "gate", "feature", "base"},
    "gate": {"gate", "base"},
    "feature": {"feature", "base"},
    "base": {"base"},
}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    assert _cycles(_graph()) == []


def test_imports_follow_the_design_arrows():
    bad = sorted(f"{m} ({_layer(m)}) imports {d} ({_layer(d)})" for m, deps in _graph().items() for d in deps
                 if _layer(d) not in ALLOWED[_layer(m)])
    assert bad == [], "\n".join(bad)


def test_the_checker_sees_a_cycle_and_a_wrong_arrow():
    """The two checks above can fail: a made-up graph with a cycle and a feature importing a job."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _layer("lib_sdtoolkit.prune") == "feature" and "job" not in ALLOWED["feature"]
    assert _layer("lib_sdtoolkit.server.routes_merge") == "face" and _layer("lib_sdtoolkit.jobs.merge") == "job"


def test_no_library_module_imports_the_webui_or_gradio_outside_ui():
    bad = []
    for mod, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from|import) modules\b", text, re.M):
            bad.append(f"{mod} imports the WebUI's modules")
        if not mod.startswith("lib_sdtoolkit.ui") and re.search(r"^\s*(from|import) gradio\b", text, re.M):
            bad.append(f"{mod} imports gradio")
    assert bad == []


_TIMING = re.compile(r"assert[^\n]*(perf_counter|monotonic|time\.time|elapsed|seconds)\b[^\n]*[<>]")


def test_no_timing_assertions_in_tests():
    """Speed belongs in bench/ (a perf_counter assertion once failed CI on a loaded machine)."""
    bad = [f"{p.name}:{i}" for p in (ROOT / "tests").rglob("test_*.py") if p.name != Path(__file__).name
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if _TIMING.search(line)]
    assert bad == []
    # the pattern does catch one (the probe is assembled so that this file holds no timing assertion itself)
    head, clock = "ass" + "ert", "perf" + "_counter"
    assert _TIMING.search(f"    {head} time.{clock}() - t0 < 0.005")


def test_cli_help_does_not_import_torch():
    code = ("import sys; from lib_sdtoolkit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
