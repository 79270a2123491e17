"""The faces: Host folders and resolve(), the HTTP router, the `serve` command, the gradio tabs, and the WebUI
adapter loaded through the WebUI double (tests/webui_double) the way the WebUI loads it."""
from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(DOUBLE) not in sys.path:
    sys.path.append(str(DOUBLE))  # appended: webui_harness.use_double() puts it first when a test needs `modules`

from lib_sdtoolkit.errors import AccessDeniedError, FileNotFound, InvalidInputError, ModelFileError  # noqa: E402
from lib_sdtoolkit.host import MODEL_KINDS, StandaloneHost, WebUIHost, natural_key  # noqa: E402
from lib_sdtoolkit.inspect import inspect_file  # noqa: E402
from lib_sdtoolkit.server import make_router  # noqa: E402
from lib_sdtoolkit.server import cli as serve_cli  # noqa: E402

INSPECT = "/sdtoolkit/v1/inspect"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())


@pytest.fixture(scope="module")
def lib_root(models_dir, tmp_path_factory) -> Path:
    """A private WebUI-like models folder: the session's sample checkpoints (hard links) plus bad entries."""
    root = tmp_path_factory.mktemp("faces") / "models"
    for sub in ("Stable-diffusion", "VAE", "Lora", "ControlNet"):
        (root / sub).mkdir(parents=True)
    for f in Path(models_dir).rglob("*.safetensors"):
        _link(f, root / f.relative_to(models_dir))
    sd = root / "Stable-diffusion"
    (sd / "notes.safetensors").write_bytes(b"this is not a model at all, just some text\n" * 4)
    (sd / "folder.safetensors").mkdir()
    (sd / "readme.txt").write_text("not listed")
    _link(sd / "sd15-tiny.safetensors", sd / "sub" / "model10.safetensors")
    _link(sd / "sd15-tiny.safetensors", sd / "sub" / "model2.safetensors")
    (root.parent / "outside.safetensors").write_bytes((sd / "sd15-tiny.safetensors").read_bytes()[:4096])
    return root


@pytest.fixture(scope="module")
def host(lib_root) -> StandaloneHost:
    return StandaloneHost(models_dir=lib_root)


@pytest.fixture(scope="module")
def client(host) -> TestClient:
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    return TestClient(app)


# ---------------------------------------------------------------- Host
def test_host_lists_models_by_kind_in_natural_order(host, lib_root):
    names = [host.display_name(p, "checkpoint") for p in host.list_models("checkpoint")]
    assert names == ["notes.safetensors", "sd15-tiny.safetensors", "sdxl-tiny.safetensors",
                     "sub/model2.safetensors", "sub/model10.safetensors"]
    assert [p.name for p in host.list_models("vae")] == ["vae-tiny-copy.safetensors", "vae-tiny.safetensors"]
    assert [p.name for p in host.list_models("lora")] == ["sample-lora-sd15.safetensors"]
    assert host.list_models("controlnet") == []
    assert host.model_dirs("lora") == [lib_root / "Lora"]
    assert sorted(["a10", "a2", "A1"], key=natural_key) == ["A1", "a2", "a10"]
    with pytest.raises(InvalidInputError):
        host.list_models("embedding")


def test_host_resolve_accepts_names_titles_and_inside_paths(host, lib_root):
    sd15 = lib_root / "Stable-diffusion" / "sd15-tiny.safetensors"
    assert host.resolve("sd15-tiny.safetensors") == sd15
    assert host.resolve("sd15-tiny") == sd15
    assert host.resolve("sd15-tiny.safetensors [0123456789]", "checkpoint") == sd15
    assert host.resolve(str(sd15)) == sd15
    assert host.resolve("sub/model2.safetensors") == lib_root / "Stable-diffusion" / "sub" / "model2.safetensors"
    assert host.resolve("vae-tiny", "vae") == lib_root / "VAE" / "vae-tiny.safetensors"
    with pytest.raises(FileNotFound):
        host.resolve("vae-tiny", "checkpoint")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "Stable-diffusion/../../outside.safetensors",
                                 "sub/../../../outside.safetensors", "..\\outside.safetensors"])
def test_host_resolve_rejects_dotdot(host, bad):
    with pytest.raises(AccessDeniedError):
        host.resolve(bad)


def test_host_resolve_rejects_paths_elsewhere(host, lib_root):
    with pytest.raises(AccessDeniedError):
        host.resolve(str(lib_root.parent / "outside.safetensors"))
    with pytest.raises(AccessDeniedError):
        host.resolve("/etc/passwd")
    with pytest.raises(ModelFileError):
        host.resolve("folder.safetensors")
    with pytest.raises(ModelFileError):
        host.resolve("readme.txt")
    with pytest.raises(InvalidInputError):
        host.resolve("  ")


def test_standalone_host_maps_a_webui_folder(tmp_path):
    webui = tmp_path / "stable-diffusion-webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    (webui / "extensions" / "sd-webui-controlnet" / "models").mkdir(parents=True)
    h = StandaloneHost(webui_dir=webui)
    assert h.model_dirs("checkpoint") == [webui / "models" / "Stable-diffusion"]
    assert h.model_dirs("controlnet") == [webui / "models" / "ControlNet",
                                          webui / "extensions" / "sd-webui-controlnet" / "models"]
    assert h.is_empty()
    with pytest.raises(FileNotFound):
        StandaloneHost(webui_dir=tmp_path / "nope")
    with pytest.raises(ModelFileError):
        StandaloneHost(webui_dir=tmp_path / "stable-diffusion-webui" / "models")  # no models/ inside
    with pytest.raises(InvalidInputError):
        StandaloneHost(models_dir=tmp_path, webui_dir=webui)


def test_webui_host_uses_cmd_opts_dirs_and_refreshers(tmp_path):
    calls = []
    h = WebUIHost(tmp_path / "models", ckpt_dirs=[tmp_path / "ckpts", None], lora_dirs=[tmp_path / "loras"],
                  output_dir=tmp_path / "out", refreshers={"checkpoint": lambda: calls.append("ckpt")})
    assert h.model_dirs("checkpoint") == [tmp_path / "models" / "Stable-diffusion", tmp_path / "ckpts"]
    assert h.model_dirs("lora") == [tmp_path / "loras"]
    assert h.output_dir("checkpoint") == tmp_path / "out"
    assert h.output_dir("vae") == tmp_path / "models" / "VAE"
    h.refresh("checkpoint")
    h.refresh()
    assert calls == ["ckpt", "ckpt"]


def test_progress_callback_reports_to_the_sink(tmp_path):
    seen = []
    h = StandaloneHost(models_dir=tmp_path, progress_sink=lambda d, n, t: seen.append((d, n, t)))
    tick = h.progress_callback("merging", 3)
    for i in range(1, 4):
        tick(i)
    assert seen == [("merging", 1, 3), ("merging", 2, 3), ("merging", 3, 3)]


# ---------------------------------------------------------------- HTTP router
@pytest.mark.parametrize("name,arch", [("sd15-tiny.safetensors", "SD1"), ("sdxl-tiny", "SDXL"),
                                       ("vae-tiny.safetensors", "VAE")])
def test_api_inspect_reports_the_architecture(client, host, name, arch):
    r = client.get(INSPECT, params={"path": name})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["architecture"] == arch
    expected = inspect_file(host.resolve(name))  # the CLI's --json report of the same file
    assert body["components"] == expected["components"]
    assert body["total_bytes"] == expected["total_bytes"]


def test_api_inspect_kind_and_absolute_path(client, lib_root):
    r = client.get(INSPECT, params={"path": str(lib_root / "Stable-diffusion" / "sdxl-tiny.safetensors"),
                                    "kind": "checkpoint"})
    assert r.status_code == 200 and r.json()["architecture"] == "SDXL"
    assert {"text_encoder", "text_encoder_2", "unet", "vae"} <= set(r.json()["components"])


@pytest.mark.parametrize("path,status", [
    ("missing.safetensors", 404),
    ("notes.safetensors", 400),            # not a model: the reader's error
    ("folder.safetensors", 400),           # a directory
    ("readme.txt", 400),                   # not a model suffix
    ("../outside.safetensors", 403),
    ("Stable-diffusion/../../outside.safetensors", 403),
    ("/etc/passwd", 403),
])
def test_api_inspect_errors_are_json(client, lib_root, path, status):
    r = client.get(INSPECT, params={"path": path})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and path.split("/")[-1] in detail


def test_api_inspect_outside_absolute_and_validation(client, lib_root):
    r = client.get(INSPECT, params={"path": str(lib_root.parent / "outside.safetensors")})
    assert r.status_code == 403 and "outside" in r.json()["detail"]
    assert client.get(INSPECT).status_code == 422                       # path is required
    r = client.get(INSPECT, params={"path": "sd15-tiny", "kind": "embedding"})
    assert r.status_code == 422 and "embedding" in r.json()["detail"]
    r = client.get("/sdtoolkit/v1/inspect?path=%2E%2E%2Foutside.safetensors")  # encoded ../
    assert r.status_code == 403


def test_api_models_and_refresh(client):
    body = client.get("/sdtoolkit/v1/models").json()["models"]
    assert set(body) == set(MODEL_KINDS)
    assert "sd15-tiny.safetensors" in body["checkpoint"] and "vae-tiny.safetensors" in body["vae"]
    assert client.get("/sdtoolkit/v1/models", params={"kind": "vae"}).json()["models"] == {"vae": body["vae"]}
    assert client.post("/sdtoolkit/v1/refresh").json() == {"ok": True}


# ---------------------------------------------------------------- serve command
def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    serve_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_serve_args():
    a = _serve_parser().parse_args(["serve"])
    assert (a.host, a.port, a.sample, a.models_dir, a.webui_dir) == ("127.0.0.1", 7870, False, None, None)
    a = _serve_parser().parse_args(["serve", "--models-dir", "m", "--port", "9000", "--sample"])
    assert (a.models_dir, a.port, a.sample, a.func) == ("m", 9000, True, serve_cli.serve)
    with pytest.raises(SystemExit) as e:
        _serve_parser().parse_args(["serve", "--models-dir", "a", "--webui-dir", "b"])
    assert e.value.code == 2


def test_serve_is_a_cli_command_and_bad_input_exits_2(tmp_path, capsys):
    from lib_sdtoolkit import cli

    assert cli.main(["serve", "--webui-dir", str(tmp_path / "no-such-webui")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-webui" in err[0]
    assert cli.main(["serve", "--models-dir", str(tmp_path), "--port", "70000"]) == 2
    assert "70000" in capsys.readouterr().err


def test_serve_sample_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = serve_cli.make_host(_serve_parser().parse_args(["serve", "--sample"]))
    assert h.models_root == tmp_path / "sample_models" and (tmp_path / "sample_models" / "VAE").is_dir()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_serve_offers_the_sample_library(tmp_path):
    h = StandaloneHost(models_dir=tmp_path / "m", create=True)
    out = io.StringIO()
    assert serve_cli.ensure_models(h, sample=False, stdin=io.StringIO(""), stdout=out) is False
    assert "--sample" in out.getvalue()                      # not a terminal: a hint, nothing written
    out = io.StringIO()
    assert serve_cli.ensure_models(h, sample=False, stdin=_Tty("n\n"), stdout=out) is False
    assert "[Y/n]" in out.getvalue() and h.is_empty()


def test_serve_sample_creates_the_library(tmp_path):
    h = StandaloneHost(models_dir=tmp_path / "m", create=True)
    assert serve_cli.ensure_models(h, sample=True, stdout=io.StringIO()) is True
    archs = {p.name: inspect_file(p)["architecture"] for p in h.list_models("checkpoint")}
    assert archs == {"sd15-tiny.safetensors": "SD1", "sd15-tiny-finetune.safetensors": "SD1",
                     "sdxl-tiny.safetensors": "SDXL"}
    assert serve_cli.ensure_models(h, sample=True, stdout=io.StringIO()) is False  # not empty any more


# ---------------------------------------------------------------- standalone app + tabs
def test_app_serves_ui_and_api(host):
    from lib_sdtoolkit.server.app import create_app

    c = TestClient(create_app(host))
    assert c.get("/").status_code == 200
    config = c.get("/config").json()
    labels = [comp["props"].get("label") for comp in config["components"]]
    assert "Inspect" in labels and "Model" in labels
    dropdown = next(comp for comp in config["components"] if comp["props"].get("elem_id") == "sdtoolkit_inspect_model")
    assert "[checkpoint] sdxl-tiny.safetensors" in json.dumps(dropdown["props"]["choices"])
    r = c.get(INSPECT, params={"path": "sd15-tiny"})
    assert r.status_code == 200 and r.json()["architecture"] == "SD1"
    assert c.get(INSPECT, params={"path": "/etc/passwd"}).status_code == 403


def test_inspect_tab_handler(host):
    from lib_sdtoolkit.ui import discover_tabs
    from lib_sdtoolkit.ui.inspect_tab import run_inspect

    assert [m.TITLE for m in discover_tabs(strict=True)][0] == "Inspect"
    arch_html, rows, text, report = run_inspect(host, "[checkpoint] sdxl-tiny.safetensors", "")
    assert ">SDXL<" in arch_html and report["architecture"] == "SDXL"
    assert {r[0] for r in rows} >= {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert dict((r[0], r[1]) for r in rows)["unet"] == report["components"]["unet"]["keys"]
    arch_html, rows, text, report = run_inspect(host, "[checkpoint] sd15-tiny.safetensors", "../outside.safetensors")
    assert "sdtoolkit-error" in arch_html and report is None and "outside" in text


# ---------------------------------------------------------------- rules
def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_library_never_imports_the_webui_and_gradio_only_in_ui():
    for path in (ROOT / "lib_sdtoolkit").rglob("*.py"):
        mods = set(_imports(path))
        rel = path.relative_to(ROOT).as_posix()
        assert "modules" not in mods and "launch" not in mods, rel
        if not rel.startswith("lib_sdtoolkit/ui/"):
            assert "gradio" not in mods, rel


# ---------------------------------------------------------------- WebUI adapter through the double
@pytest.fixture()
def webui(tmp_path):
    from webui_harness import WebUIDouble

    return WebUIDouble(str(ROOT), str(tmp_path / "webui-data"))


def test_preload_flags_parse_strictly(webui, tmp_path):
    args = webui.preload(["--sdtoolkit-models-dir", str(tmp_path), "--sdtoolkit-device", "cuda:1",
                          "--sdtoolkit-output-dir", str(tmp_path / "out"), "--sdtoolkit-no-api", "--ckpt-dir", "x"])
    assert (args.sdtoolkit_models_dir, args.sdtoolkit_device, args.sdtoolkit_no_api) == (str(tmp_path), "cuda:1", True)
    assert webui.preload([]).sdtoolkit_device == "auto"
    assert webui.reported_errors == []
    with pytest.raises(SystemExit):
        webui.preload(["--sdtoolkit-unknown-flag"])


def test_webui_scripts_register_tab_and_routes(webui, lib_root):
    webui.preload(["--sdtoolkit-models-dir", str(lib_root)])
    before = list(sys.path)
    loaded = webui.load_scripts()
    assert sys.path == before                                   # extension folder only during the exec
    assert {m.__name__ for m in loaded} >= {"sdtoolkit_tabs.py", "sdtoolkit_api.py"}
    assert webui.reported_errors == []
    from modules import script_callbacks

    names = [c.name for c in script_callbacks.callback_map["callbacks_ui_tabs"]]
    assert names == [f"{ROOT.name.lower()}/sdtoolkit_tabs.py/ui_tabs"]
    demo, tabs = webui.create_ui()
    assert [(t[1], t[2]) for t in tabs] == [("SD Toolkit", "sdtoolkit")]
    assert webui.reported_errors == []
    config = demo.get_config_file()
    assert any(c["props"].get("elem_id") == "sdtoolkit_inspect_run" for c in config["components"])
    c = TestClient(webui.start_app(demo))
    r = c.get(INSPECT, params={"path": "sdxl-tiny"})
    assert r.status_code == 200 and r.json()["architecture"] == "SDXL"
    assert c.get(INSPECT, params={"path": "../x.safetensors"}).status_code == 403


def test_webui_nowebui_mounts_routes_without_ui(webui, lib_root):
    webui.preload(["--nowebui", "--sdtoolkit-models-dir", str(lib_root)])
    webui.load_scripts()
    app = webui.start_app(None)                                 # --nowebui: no create_ui, demo=None
    assert webui.reported_errors == []
    c = TestClient(app)
    r = c.get(INSPECT, params={"path": "sd15-tiny.safetensors"})
    assert r.status_code == 200 and r.json()["architecture"] == "SD1"
    assert c.get(INSPECT, params={"path": "missing"}).status_code == 404


def test_webui_no_api_flag(webui, lib_root):
    webui.preload(["--sdtoolkit-no-api"])
    webui.load_scripts()
    c = TestClient(webui.start_app(None))
    assert c.get(INSPECT, params={"path": "x"}).status_code == 404
    assert c.get(INSPECT, params={"path": "x"}).json() == {"detail": "Not Found"}


def test_webui_host_reads_the_webui_dirs(webui, tmp_path):
    webui.preload(["--ckpt-dir", str(tmp_path / "ckpt"), "--vae-dir", str(tmp_path / "vae")])
    from modules import paths, shared

    from lib_sdtoolkit.host import webui_host_from

    h = webui_host_from(paths, shared.cmd_opts, shared.opts)
    models = Path(paths.models_path)
    assert h.model_dirs("checkpoint") == [models / "Stable-diffusion", tmp_path / "ckpt"]
    assert h.model_dirs("vae") == [models / "VAE", tmp_path / "vae"]
    # the built-in Lora's preload.py (run for every built-in extension) adds --lora-dir and --lyco-dir-backcompat
    assert h.model_dirs("lora") == [models / "Lora", models / "LyCORIS"]
    assert h.settings is shared.opts.data


def test_webui_host_reads_forge_neos_folder_lists(tmp_path):
    """Forge Neo replaced ``--ckpt-dir`` & co. by lists (``modules/cmd_args.py``: ``--ckpt-dirs``, ``--lora-dirs``,
    ``--vae-dirs`` with ``action="append"``, ``--forge-ref-a1111-home`` appends to them; ``lora_dir`` stays, from its
    built-in LoRA's preload). Seen in the real Neo: models given by ``--ckpt-dirs`` were missing from our lists."""
    from types import SimpleNamespace

    import torch

    from lib_sdtoolkit.files import save_safetensors
    from lib_sdtoolkit.host import webui_host_from

    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    ck1, ck2, lo = tmp_path / "ck1", tmp_path / "ck2", tmp_path / "loras"
    for d in (ck1, ck2, lo):
        d.mkdir()
    save_safetensors(ck2 / "elsewhere.safetensors", {"x": torch.zeros(2)})
    opts = SimpleNamespace(ckpt_dirs=[str(ck1), str(ck2)], lora_dirs=[str(lo)], vae_dirs=[str(tmp_path / "vae")],
                           text_encoder_dirs=[], lora_dir=str(models / "Lora"))
    h = webui_host_from(SimpleNamespace(models_path=str(models)), opts)
    assert h.model_dirs("checkpoint") == [models / "Stable-diffusion", ck1, ck2]
    assert h.model_dirs("lora") == [models / "Lora", lo]
    assert h.model_dirs("vae") == [models / "VAE", tmp_path / "vae"]
    assert [Path(p).name for p in h.list_models("checkpoint")] == ["elsewhere.safetensors"]
    # A1111's singular flags still read as before
    h = webui_host_from(SimpleNamespace(models_path=str(models)), SimpleNamespace(ckpt_dir=str(ck1)))
    assert h.model_dirs("checkpoint") == [models / "Stable-diffusion", ck1]


def test_install_py_installs_only_what_is_missing(webui, tmp_path):
    log = tmp_path / "pip.log"
    for _ in range(2):                                          # every WebUI start runs it: idempotent
        r = webui.run_installer(env={"WEBUI_DOUBLE_PIP_LOG": str(log)})
        assert r.returncode == 0, r.stderr
    assert not log.exists()                                     # everything present: no pip at all
    r = webui.run_installer(env={"WEBUI_DOUBLE_PIP_LOG": str(log), "WEBUI_DOUBLE_MISSING": "einops"})
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["command"] for c in calls] == ["install einops"]
    src = (ROOT / "install.py").read_text()
    for pinned in ("torch", "gradio", "transformers"):
        assert f'("{pinned}"' not in src
