"""Issue 11: every CLI model command and every API route that takes a model file, over the malformed corpus.

The corpus is ``tests/corpus/malformed`` (checked in, written by ``tests/make_malformed_corpus.py``) plus the
cases that cannot live in git (a FIFO, a socket, links to /dev/zero, /dev/urandom and /dev/null, a symlink loop, a
dangling link, a header of too many tensors), made at test time.

CLI: ``lib_sdtoolkit.cli.main(argv)`` in-process. A file no reader can accept must give exit code 2 and exactly
one stderr line (warnings count as lines) that names the file; a well-formed file with odd content may also give a
result (exit 0). Anything else (a traceback, another exit code, several lines, a hang) fails. A hang is caught
by a SIGALRM guard (generous: it only turns "blocks forever" into a failure; no time is asserted).

API: the standalone app (``create_app(host, ui=False)``) through ``TestClient``: never a 500; a 4xx answer is JSON
with a ``detail``; the hash and dedup routes answer 200 and list the bad file under ``problems``.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import shutil
import signal
import stat
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import make_malformed_corpus as mc  # noqa: E402

CORPUS = ROOT / "tests" / "corpus" / "malformed"
HANG_GUARD_S = float(os.environ.get("SDTOOLKIT_HANG_GUARD_S", "120"))  # blocking this long counts as hung (forever)
#: the reader's tensor-count limit (falls back to 100_000 against code that has none)
try:
    from lib_sdtoolkit.files.reader import MAX_TENSORS
except ImportError:  # pragma: no cover - the base commit, for the before/after counts
    MAX_TENSORS = 100_000


class Hung(Exception):
    pass


@dataclass
class Outcome:
    argv: Sequence[str]
    case: str
    code: Optional[int] = None
    stdout: str = ""
    stderr_lines: List[str] = field(default_factory=list)
    crash: Optional[str] = None
    hung: bool = False


def run_cli(argv: Sequence[str], case: str) -> Outcome:
    from lib_sdtoolkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    res = Outcome(list(argv), case)

    def alarm(signum, frame):
        raise Hung()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_GUARD_S)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                res.code = main(list(argv))
            except SystemExit as e:  # argparse
                res.code = e.code if isinstance(e.code, int) else 2
            except Hung:
                res.hung = True
            except BaseException as e:  # noqa: BLE001 - this is what the test looks for
                res.crash = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    res.stdout = out.getvalue()
    res.stderr_lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    res.stderr_lines += [f"warning: {w.category.__name__}: {w.message}" for w in caught]
    return res


def verdict(o: Outcome, name: str, may_succeed: bool) -> str:
    """'clean', 'crashed', 'hung' or 'unclean: why'."""
    if o.hung:
        return "hung"
    if o.crash is not None:
        return "crashed"
    if o.code == 0 and may_succeed and not [ln for ln in o.stderr_lines if ln.startswith("warning:")]:
        return "clean"
    if o.code != 2:
        return f"unclean: exit {o.code}"
    if len(o.stderr_lines) != 1:
        return f"unclean: {len(o.stderr_lines)} stderr lines"
    if name not in o.stderr_lines[0]:
        return "unclean: the error does not name the file"
    return "clean"


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, Tuple[Path, str]]:
    """name -> (path, kind) for every case: the checked-in files and the runtime ones (kind 'special')."""
    d = tmp_path_factory.mktemp("corpus")
    cases: Dict[str, Tuple[Path, str]] = {}
    for c in mc.CASES:
        p = d / c.name
        shutil.copyfile(CORPUS / c.name, p)
        cases[c.name] = (p, c.kind)
    for name, p in mc.write_runtime_cases(d, MAX_TENSORS).items():
        kind = "unreadable"
        if name != "st_too_many_tensors.safetensors":
            kind = "special"  # not a regular file: hash refuses it too
        cases[name] = (p, kind)
    return cases


@pytest.fixture(scope="module")
def good(fixture_files, models_dir, tmp_path_factory):
    """Valid companions: an SD1 checkpoint, a VAE, a LoRA, a latent and an image that fits the VAE."""
    from PIL import Image

    d = tmp_path_factory.mktemp("good")
    latent = d / "latent.safetensors"
    latent.write_bytes(mc.latent_file([1, 4, 8, 8], {"sdtoolkit.latent_scaled": "true"}))
    img = d / "image.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(img)
    return {"sd1": fixture_files["sd1"], "vae": fixture_files["vae"],
            "lora": Path(models_dir) / "Lora" / "sample-lora-sd15.safetensors", "latent": latent, "image": img}


def test_corpus_is_what_the_script_writes(tmp_path):
    """The checked-in corpus and its README match the generator (regenerable, one README line per file)."""
    mc.write_corpus(tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in CORPUS.iterdir())
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    for c in mc.CASES:
        assert readme.count(f"`{c.name}`") == 1
        assert (CORPUS / c.name).stat().st_size <= 512 * 1024
    assert readme == (tmp_path / "README.md").read_text(encoding="utf-8")
    # the cases whose bytes do not depend on the torch version are byte-identical
    for c in mc.CASES:
        if c.name.startswith(("st_", "latent_")):
            assert (tmp_path / c.name).read_bytes() == (CORPUS / c.name).read_bytes(), c.name


# ------------------------------------------------------------------------------------------------ the CLI

#: command -> argv builder (f: the corpus file, g: good companions, o: an output folder)
COMMANDS = {
    "inspect": lambda f, g, o: ["inspect", str(f)],
    "prune": lambda f, g, o: ["prune", str(f), "-o", str(o / "pruned.safetensors")],
    "merge A": lambda f, g, o: ["merge", str(f), str(g["sd1"]), "-o", str(o / "m.safetensors"), "--no-metadata"],
    "merge B": lambda f, g, o: ["merge", str(g["sd1"]), str(f), "-o", str(o / "m.safetensors"), "--no-metadata"],
    "merge --bake-vae": lambda f, g, o: ["merge", str(g["sd1"]), str(g["sd1"]), "--bake-vae", str(f),
                                         "-o", str(o / "m.safetensors"), "--no-metadata"],
    "lora inspect": lambda f, g, o: ["lora", "inspect", str(f)],
    "lora bake (lora)": lambda f, g, o: ["lora", "bake", str(g["sd1"]), str(f), "-o", str(o / "b.safetensors"),
                                         "-q"],
    "lora bake (checkpoint)": lambda f, g, o: ["lora", "bake", str(f), str(g["lora"]),
                                               "-o", str(o / "b.safetensors"), "-q"],
    "lora extract (tuned)": lambda f, g, o: ["lora", "extract", str(f), str(g["sd1"]), "-o",
                                             str(o / "l.safetensors"), "-q", "--rank", "2"],
    "lora extract (base)": lambda f, g, o: ["lora", "extract", str(g["sd1"]), str(f), "-o",
                                            str(o / "l.safetensors"), "-q", "--rank", "2"],
    "vae decode (latent)": lambda f, g, o: ["vae", "decode", str(f), "--vae", str(g["vae"]), "-o",
                                            str(o / "d.png"), "--quiet", "--device", "cpu"],
    "vae decode (vae)": lambda f, g, o: ["vae", "decode", str(g["latent"]), "--vae", str(f), "-o",
                                         str(o / "d.png"), "--quiet", "--device", "cpu"],
    "vae encode (vae)": lambda f, g, o: ["vae", "encode", str(g["image"]), "--vae", str(f), "-o",
                                         str(o / "e.safetensors"), "--quiet", "--device", "cpu"],
    "controlnet info": lambda f, g, o: ["controlnet", "info", str(f)],
    "hash": lambda f, g, o: ["hash", "--no-cache", str(f)],
    "dedup": None,  # a folder holding the file: built in the test
}


def _may_succeed(command: str, kind: str) -> bool:
    if kind in ("unreadable", "special"):
        return False
    if kind == "latent" and command == "vae decode (latent)":
        return False
    return True


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_command_over_the_corpus(command, corpus, good, tmp_path):
    bad: List[str] = []
    counts: Dict[str, int] = {}
    spent: List[Tuple[float, str]] = []  # reported, never asserted
    for i, (name, (path, kind)) in enumerate(sorted(corpus.items())):
        out = tmp_path / f"out{i}"
        out.mkdir()
        if command == "dedup":
            folder = tmp_path / f"scan{i}"
            folder.mkdir()
            os.symlink(path, folder / name)
            argv = ["dedup", "--no-cache", str(folder)]
        else:
            argv = COMMANDS[command](path, good, out)
        t0 = time.perf_counter()
        o = run_cli(argv, name)
        spent.append((time.perf_counter() - t0, name))
        if command == "hash" and kind != "special":
            # any regular file has hashes, whatever its bytes
            want = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            v = "clean" if o.code == 0 and want in o.stdout and not o.stderr_lines else \
                f"unclean: exit {o.code}" if o.crash is None and not o.hung else verdict(o, name, False)
        else:
            v = verdict(o, name, _may_succeed(command, kind))
        key = v.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
        if v != "clean":
            bad.append(f"{name}: {v} {o.crash or ''} {o.stderr_lines[:3]}")
        assert not list(out.glob("*.tmp")), f"{name}: temp file left by {command}"
    print(f"\n[corpus] {command}: tried {len(corpus)}, " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
          + "; slowest: " + ", ".join(f"{n} {t:.1f}s" for t, n in sorted(spent, reverse=True)[:3]))
    assert not bad, f"{command}: {len(bad)} of {len(corpus)} cases not clean:\n" + "\n".join(bad)


def test_dedup_and_hash_scan_skip_bad_files_and_go_on(corpus, good, tmp_path):
    """One folder with every bad file and a valid VAE: each bad file is one stderr line, the VAE is scanned."""
    folder = tmp_path / "lib"
    folder.mkdir()
    for name, (path, kind) in corpus.items():
        os.symlink(path, folder / name)
    shutil.copyfile(good["vae"], folder / "zz-good-vae.safetensors")
    o = run_cli(["dedup", "--no-cache", "--json", str(folder)], "folder")
    assert o.crash is None and not o.hung, o.crash
    assert o.code == 2
    import json

    rep = json.loads(o.stdout)
    flagged = [Path(p["path"]).name for p in rep["problems"]]
    assert "zz-good-vae.safetensors" not in flagged
    assert rep["files_scanned"] == len(corpus) + 1 - len(flagged) >= 1  # the good VAE and the odd-but-valid files
    for name, (path, kind) in corpus.items():
        if kind in ("unreadable", "special"):
            assert sum(name in ln for ln in o.stderr_lines) == 1, (name, o.stderr_lines)
    o = run_cli(["hash", "--no-cache", "--algo", "sha256", str(folder)], "folder")
    assert o.crash is None and not o.hung and o.code == 2
    assert hashlib.sha256(Path(good["vae"]).read_bytes()).hexdigest() in o.stdout
    for name, (path, kind) in corpus.items():
        n = sum(name in ln for ln in o.stderr_lines)
        assert n == (1 if kind == "special" else 0), (name, o.stderr_lines)


# ------------------------------------------------------------------------------------------------ the API

@pytest.fixture(scope="module")
def api(corpus, good, tmp_path_factory):
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server.app import create_app

    root = tmp_path_factory.mktemp("api") / "models"
    for sub in ("Stable-diffusion", "VAE", "Lora", "ControlNet"):
        (root / sub / "bad").mkdir(parents=True)
        for name, (path, kind) in corpus.items():
            os.symlink(path, root / sub / "bad" / name)
    shutil.copyfile(good["sd1"], root / "Stable-diffusion" / "good.safetensors")
    shutil.copyfile(good["vae"], root / "VAE" / "good-vae.safetensors")
    shutil.copyfile(good["lora"], root / "Lora" / "good-lora.safetensors")
    host = StandaloneHost(models_dir=root)
    host.settings["sdtoolkit_hash_cache"] = str(tmp_path_factory.mktemp("api_cache") / "hashes.sqlite")
    return TestClient(create_app(host, ui=False), raise_server_exceptions=False)


def _b64(path: Path) -> Optional[str]:
    st = os.stat(path) if os.path.exists(path) else None
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


ROUTES = {
    "GET inspect": lambda n, p: ("GET", "/sdtoolkit/v1/inspect", {"path": f"bad/{n}"}),
    "GET inspect (vae)": lambda n, p: ("GET", "/sdtoolkit/v1/inspect", {"path": f"bad/{n}", "kind": "vae"}),
    "POST prune": lambda n, p: ("POST", "/sdtoolkit/v1/prune", {"path": f"bad/{n}", "output": "p.safetensors"}),
    "POST merge A": lambda n, p: ("POST", "/sdtoolkit/v1/merge", {"model_a": f"bad/{n}", "model_b": "good",
                                                                  "output": "m.safetensors", "save_metadata": False}),
    "POST merge B": lambda n, p: ("POST", "/sdtoolkit/v1/merge", {"model_a": "good", "model_b": f"bad/{n}",
                                                                  "output": "m.safetensors", "save_metadata": False}),
    "POST merge bake_vae": lambda n, p: ("POST", "/sdtoolkit/v1/merge", {
        "model_a": "good", "model_b": "good", "bake_vae": f"bad/{n}", "output": "m.safetensors",
        "save_metadata": False}),
    "POST lora/extract": lambda n, p: ("POST", "/sdtoolkit/v1/lora/extract", {"tuned": f"bad/{n}", "base": "good",
                                                                             "output": "x", "rank": 2}),
    "POST lora/bake (checkpoint)": lambda n, p: ("POST", "/sdtoolkit/v1/lora/bake", {
        "checkpoint": f"bad/{n}", "loras": [{"lora": "good-lora"}], "output": "b"}),
    "POST lora/bake (lora)": lambda n, p: ("POST", "/sdtoolkit/v1/lora/bake", {
        "checkpoint": "good", "loras": [{"lora": f"bad/{n}"}], "output": "b"}),
    "POST vae/decode (vae)": lambda n, p: ("POST", "/sdtoolkit/v1/vae/decode", {
        "vae": f"bad/{n}", "latent": [[[0.1] * 8] * 8] * 4, "device": "cpu"}),
    "POST vae/decode (latent)": lambda n, p: ("POST", "/sdtoolkit/v1/vae/decode", {
        "vae": "good-vae", "latent_safetensors_b64": _b64(p), "device": "cpu"}),
    "POST hash": lambda n, p: ("POST", "/sdtoolkit/v1/hash", {"paths": [f"bad/{n}"], "algos": ["sha256"]}),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_api_route_over_the_corpus(route, api, corpus, tmp_path):
    bad: List[str] = []
    counts: Dict[str, int] = {}
    for name, (path, kind) in sorted(corpus.items()):
        method, url, body = ROUTES[route](name, path)
        if route == "POST vae/decode (latent)" and body["latent_safetensors_b64"] is None:
            continue  # not a regular file: nothing to upload
        o = Outcome([route], name)

        def alarm(signum, frame):
            raise Hung()

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_GUARD_S)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = api.get(url, params=body) if method == "GET" else api.post(url, json=body)
        except Hung:
            o.hung = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if o.hung:
            v = "hung"
        elif r.status_code >= 500:
            v = f"crashed ({r.status_code})"
        elif route == "POST hash" and r.status_code == 200:
            js = r.json()
            if kind == "special":
                v = "clean" if r.status_code == 200 and any(name in p["path"] for p in js["problems"]) else \
                    f"unclean: {r.status_code} {js}"
            else:
                v = "clean" if r.status_code == 200 and js["results"] else f"unclean: {r.status_code} {js}"
        elif 400 <= r.status_code < 500:
            js = r.json()
            v = "clean" if isinstance(js.get("detail"), (str, list)) else f"unclean: {js}"
            if kind in ("unreadable", "special") and route != "POST vae/decode (latent)" and \
                    isinstance(js.get("detail"), str) and name not in js["detail"]:
                v = f"unclean: the answer does not name the file: {js['detail'][:200]}"
        elif r.status_code == 200:
            may = kind == "semantic" or (kind == "latent" and route != "POST vae/decode (latent)")
            v = "clean" if may else "unclean: 200 for a bad file"
        else:
            v = f"unclean: {r.status_code}"
        counts[v.split(" ")[0].rstrip(":")] = counts.get(v.split(" ")[0].rstrip(":"), 0) + 1
        if v != "clean":
            bad.append(f"{name}: {v[:300]}")
    print(f"\n[corpus] {route}: tried {sum(counts.values())}, " +
          ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    assert not bad, f"{route}: {len(bad)} cases not clean:\n" + "\n".join(bad)


def test_api_listings_and_dedup_with_bad_files(api, corpus):
    """Model lists, the LoRA list (which reads LoRA metadata) and a dedup over the folders stay up."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = api.get("/sdtoolkit/v1/models")
        assert r.status_code == 200
        r = api.get("/sdtoolkit/v1/loras")
        assert r.status_code == 200, r.text[:300]
        assert any(e["path"] == "good-lora.safetensors" for e in r.json())
        r = api.get("/controlnet/model_list")
        assert r.status_code == 200
        r = api.post("/sdtoolkit/v1/dedup", json={"kind": "any"})
    assert r.status_code == 200, r.text[:300]
    problems = " ".join(p["path"] for p in r.json()["problems"])
    for name, (path, kind) in corpus.items():
        if kind in ("unreadable", "special"):
            assert name in problems, name
