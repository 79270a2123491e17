"""install.py against what a stock WebUI really holds (issue 10, defect 3: the Hashes tab and
``/sdtoolkit/v1/hash`` died with ``No module named 'blake3'`` in a real A1111 1.10.1 because install.py never asked for
it, and the double's ``is_installed`` answered from this test machine's full environment).

1. A static walk of every import in ``lib_sdtoolkit/`` and ``scripts/`` (function-level ones too): each third-party
   module is pinned by the WebUI (``tests/webui_double/requirements_versions.txt``, A1111 1.10.1), a declared
   dependency of a pin (named below with the pin that requires it), installed by install.py, provided by the WebUI
   itself (``modules``, ``ldm``...), or imported only under a ``try``/``except ImportError`` guard.
2. install.py run for real by a venv's python made with ``--without-pip`` (no system site-packages), whose
   site-packages holds the distributions the WebUI's venv holds (metadata only: ``is_installed`` reads nothing else),
   with the double's unmodified ``launch``: what it asks ``run_pip`` for is exactly what the WebUI lacks.
3. Without the optional ``blake3`` package, hashing and dedup still work and asking for BLAKE3 gives a clear 4xx.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = ROOT / "tests" / "webui_double"
PINS_FILE = DOUBLE / "requirements_versions.txt"

#: top-level module -> distribution name, where they differ
MODULE_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python", "skimage": "scikit-image"}
#: distributions the WebUI's venv holds because a pin requires them (the pin and its requirement, from each
#: package's own metadata at the pinned version)
DEPENDENCIES_OF_PINS = {
    "pandas": "gradio==3.41.2 requires pandas<3.0,>=1.0",
    "uvicorn": "gradio==3.41.2 requires uvicorn>=0.14.0",
    "pydantic": "fastapi==0.94.0 requires pydantic<2.0.0,>=1.6.2",
    "pyyaml": "gradio==3.41.2 requires pyyaml<7.0,>=5.0",
    "tqdm": "transformers==4.30.2 requires tqdm>=4.27",
    "scipy": "scikit-image==0.21.0 requires scipy>=1.8",
    "triton": "torch==2.1.2 (Linux x86_64) requires triton==2.1.0",
    "huggingface-hub": "transformers==4.30.2 requires huggingface-hub<1.0,>=0.14.1",
    "starlette": "fastapi==0.94.0 requires starlette<0.27.0,>=0.26.0",
    "opencv-python": "facexlib==0.3.0 requires opencv-python (its requirements.txt); A1111's own modules import cv2",
}
#: modules the WebUI itself puts on sys.path (its own package, its repositories/, Forge's packages)
WEBUI_PROVIDED = {"modules", "modules_forge", "backend", "ldm", "sgm", "k_diffusion", "launch"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def webui_pins() -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in PINS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[_norm(name)] = version
    return out


def install_requirements() -> Dict[str, str]:
    """install.py's REQUIREMENTS, read from its source (importing it would run it)."""
    tree = ast.parse((ROOT / "install.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "REQUIREMENTS" for t in node.targets):
            return {_norm(name): req for name, req in ast.literal_eval(node.value)}
    raise AssertionError("install.py has no REQUIREMENTS")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(t, "id", "") in ("ImportError", "ModuleNotFoundError", "Exception") for t in types)


def _imports(path: Path) -> Iterator[Tuple[str, int, bool, int]]:
    """(module, line, guarded, level) for each import statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents: Dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def guarded(node: ast.AST) -> bool:
        cur = node
        while cur in parents:
            up = parents[cur]
            if isinstance(up, ast.Try) and cur in up.body and any(_catches_import_error(h) for h in up.handlers):
                return True
            cur = up
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, guarded(node), 0
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0:
                yield mod, node.lineno, guarded(node), 0
            else:  # relative: resolve to lib_sdtoolkit.<...> for the guarded-module rule
                for a in node.names:
                    yield (f"{mod}.{a.name}" if mod else a.name), node.lineno, guarded(node), node.level


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve_relative(importer: str, is_pkg: bool, target: str, level: int) -> str:
    base = importer.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + [target])


def _sources() -> List[Path]:
    return sorted((ROOT / "lib_sdtoolkit").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


@functools.lru_cache(maxsize=None)
def third_party_imports() -> Tuple[Tuple[str, str, bool], ...]:
    """(top-level module, 'file:line', guarded) for every third-party import; an import inside one of our modules
    that is itself only ever imported under a guard counts as guarded."""
    stdlib = set(sys.stdlib_module_names)
    own = {"lib_sdtoolkit"} | {p.stem for p in (ROOT / "scripts").glob("*.py")}
    found: List[Tuple[str, str, bool, str]] = []
    internal_sites: Dict[str, List[bool]] = {}
    for path in _sources():
        me = _module_name(path)
        for mod, line, guarded, level in _imports(path):
            if level:
                target = _resolve_relative(me, path.name == "__init__.py", mod, level)
                internal_sites.setdefault(target, []).append(guarded)
                continue
            top = mod.split(".")[0]
            if top in own:
                internal_sites.setdefault(mod, []).append(guarded)
                continue
            if top in stdlib or top == "__future__":
                continue
            found.append((top, f"{path.relative_to(ROOT)}:{line}", guarded, me))
    only_guarded = {m for m, sites in internal_sites.items() if sites and all(sites)}
    return tuple((top, where, guarded or me in only_guarded) for top, where, guarded, me in found)


def test_the_walk_sees_the_imports_that_matter():
    seen = {(top, g) for top, _, g in third_party_imports()}
    assert ("torch", False) in seen and ("gradio", False) in seen and ("PIL", False) in seen
    # blake3 (not in a stock A1111) and diffusers (not in A1111 at all) only under a guard
    assert ("blake3", True) in seen and ("blake3", False) not in seen
    assert ("diffusers", True) in seen and ("diffusers", False) not in seen


def test_every_runtime_import_is_pinned_installed_or_guarded():
    pins = webui_pins()
    ours = install_requirements()
    assert "torch" in pins and "gradio" in pins and "blake3" not in pins
    bad = []
    for top, where, guarded in third_party_imports():
        dist = _norm(MODULE_TO_DIST.get(top, top))
        if (top in WEBUI_PROVIDED or dist in pins or dist in DEPENDENCIES_OF_PINS or dist in ours or guarded):
            continue
        bad.append(f"{where}: imports {top!r}, which the WebUI does not pin, install.py does not install, and "
                   f"no try/except ImportError guards")
    assert not bad, "\n".join(bad)
    # install.py never installs what the WebUI pins (that breaks WebUI installs), nor anything we do not import
    imported = {_norm(MODULE_TO_DIST.get(t, t)) for t, _, _ in third_party_imports()}
    assert not (set(ours) & set(pins)) - {"safetensors", "einops"}, "install.py must not install WebUI pins"
    assert set(ours) <= imported | {"safetensors", "einops"}


def test_dependency_records_match_the_installed_gradio_when_it_is_the_pinned_one():
    import importlib.metadata as md

    if md.version("gradio") != "3.41.2":
        pytest.skip("the installed gradio is not the one A1111 pins")
    reqs = {_norm(re.split(r"[<>=!~; \[]", r, 1)[0]) for r in md.requires("gradio") or [] if "extra ==" not in r}
    for dist, why in DEPENDENCIES_OF_PINS.items():
        if why.startswith("gradio=="):
            assert dist in reqs, why


# ------------------------------------------------------------------------------------------- a real install.py run

def _site_packages(env_dir: Path) -> Path:
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                          "['purelib'])"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def webui_like_venv(tmp_path_factory) -> Path:
    """A venv without pip and without the system site-packages, holding (as installed-distribution metadata) the
    WebUI's pins and the dependencies of pins we rely on: what ``launch.is_installed`` sees in a stock A1111."""
    if os.name == "nt":
        pytest.skip("POSIX venv layout")
    env_dir = tmp_path_factory.mktemp("webui-venv")
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(env_dir)
    site = _site_packages(env_dir)
    dists = dict(webui_pins())
    dists.update({d: why.split("requires ")[1].split("==")[-1] if "==" in why.split("requires ")[1] else "0"
                  for d, why in DEPENDENCIES_OF_PINS.items()})
    for name, version in dists.items():
        info = site / f"{name.replace('-', '_')}-{version or '0'}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version or '0'}\n")
        (info / "INSTALLER").write_text("pip\n")
    return env_dir


def _run_installer(env_dir: Path, log: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WEBUI_DOUBLE_MISSING", "PYTHONHOME")}
    env.update(PYTHONPATH=str(DOUBLE), WEBUI_DOUBLE_PIP_LOG=str(log), PYTHONNOUSERSITE="1")
    return subprocess.run([str(env_dir / "bin" / "python"), str(ROOT / "install.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_install_py_in_a_venv_holding_only_the_webui_pins(webui_like_venv, tmp_path):
    py = webui_like_venv / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'), "
                            "u.find_spec('blake3'))"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert probe.stdout.split() == ["None", "None"], "the venv must not see this machine's packages"
    log = tmp_path / "pip.log"
    r = _run_installer(webui_like_venv, log)
    assert r.returncode == 0, r.stderr
    asked = [json.loads(line)["command"] for line in log.read_text().splitlines()] if log.exists() else []
    pins = webui_pins()
    for cmd in asked:
        name = _norm(re.split(r"[<>=!~ ]", cmd.split()[1], 1)[0])
        assert name not in pins, f"install.py tried to install the WebUI's own pin: {cmd}"
    needed = {_norm(MODULE_TO_DIST.get(t, t)) for t, _, g in third_party_imports()
              if not g and t not in WEBUI_PROVIDED} - set(pins) - set(DEPENDENCIES_OF_PINS)
    got = {_norm(re.split(r"[<>=!~ ]", c.split()[1], 1)[0]) for c in asked}
    assert got == needed | {"blake3"}, (asked, needed)
    assert any(c.startswith("install blake3") for c in asked)


# --------------------------------------------------------------------------------- hashing without blake3 installed

@pytest.fixture
def no_blake3(monkeypatch):
    """The interpreter as a stock WebUI has it: ``import blake3`` fails."""
    monkeypatch.setitem(sys.modules, "blake3", None)


def test_hashes_and_dedup_work_without_blake3(no_blake3, fixture_files, tmp_path, monkeypatch):
    import hashlib

    from lib_sdtoolkit.dedup import content_hash
    from lib_sdtoolkit.errors import MissingDependencyError
    from lib_sdtoolkit.files.hashes import hash_file, normalize_algos

    r = hash_file(fixture_files["vae"])
    assert r.blake3 is None
    assert r.sha256 == hashlib.sha256(Path(fixture_files["vae"]).read_bytes()).hexdigest()
    assert normalize_algos(["all"]) == ("sha256", "autov1", "autov3", "crc32")
    with pytest.raises(MissingDependencyError, match="pip install blake3"):
        normalize_algos(["blake3"])
    assert len(content_hash(fixture_files["vae"]).hash) == 64


def test_api_hash_and_dedup_without_blake3(no_blake3, fixture_files, tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router

    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "models"
    host = StandaloneHost(models_dir=root, create=True)
    shutil.copy(fixture_files["vae"], root / "VAE" / "a.safetensors")
    shutil.copy(fixture_files["vae"], root / "VAE" / "b.safetensors")
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/sdtoolkit/v1/hash", json={"paths": ["a.safetensors"], "kind": "vae"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["blake3"] is None and r.json()["results"][0]["sha256"]
    r = client.post("/sdtoolkit/v1/hash", json={"paths": ["a.safetensors"], "algos": ["blake3"]})
    assert r.status_code == 424 and "pip install blake3" in r.text, r.text
    r = client.post("/sdtoolkit/v1/dedup", json={"kind": "vae"})
    assert r.status_code == 200, r.text
    assert len(r.json()["groups"]) == 1
