"""The command line as a user meets it (issue 15, item 8): ``--help`` of every command and sub-command leaves torch
unimported (read from ``sys.modules``, not timed); every command has ``--json`` and prints valid JSON with it on
real files, with nothing else on stdout and no progress bars in a redirected stderr; every option has help text;
errors name the real flags; ``merge --list-presets``; a taken port gives a clear error naming a free one."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
from PIL import Image

from lib_sdtoolkit import cli

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser, bool]]:
    """(command path, parser, is_leaf) for the root and every command and sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, not subs
    for a in subs:
        for name, sp in a.choices.items():
            yield from _commands(sp, path + (name,))


def _leaves() -> Dict[Tuple[str, ...], argparse.ArgumentParser]:
    return {path: p for path, p, leaf in _commands(cli.build_parser()) if leaf and path}


_HELP_WALK = r"""
import argparse, contextlib, io, json, sys
from lib_sdtoolkit.cli import build_parser
root = build_parser()
def walk(p, path):
    yield path
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from walk(sp, path + [name])
seen = []
for path in walk(root, []):
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf):
        try:
            root.parse_args(path + ["--help"])
        except SystemExit as e:
            code = e.code
    seen.append([" ".join(path), code, buf.getvalue().startswith("usage:"),
                 sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:3]])
print(json.dumps(seen))
"""


def test_help_of_every_command_leaves_torch_unimported():
    out = subprocess.run([sys.executable, "-c", _HELP_WALK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    names = {s[0] for s in seen}
    assert {"", "merge", "lora extract", "vae decode", "controlnet detect", "controlnet modules", "serve"} <= names
    for name, code, usage, torch_mods in seen:
        assert code == 0 and usage, name
        assert torch_mods == [], f"`{name} --help` imported {torch_mods}"


def test_every_command_has_json_and_every_option_has_help():
    leaves = _leaves()
    assert len(leaves) >= 15
    for path, p in leaves.items():
        opts = {o for a in p._actions for o in a.option_strings}
        assert "--json" in opts, f"`{' '.join(path)}` has no --json"
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"`{' '.join(path)}` {a.option_strings or a.dest} has no help"
    # defaults are shown; a --no-X flag says what it turns off
    merge = leaves[("merge",)].format_help()
    assert "(default: 0.5)" in merge and "turn off (on by default): hash the inputs" in merge


# ------------------------------------------------------------------------------------- --json on real files

def _tiny_controlnet(path: Path) -> Path:
    from lib_sdtoolkit.controlnet.cldm import ControlNet
    from lib_sdtoolkit.files import save_safetensors
    from lib_sdtoolkit.samples import factory

    cfg = factory.get_config("SD1", "tiny")
    kw = {k: v for k, v in cfg.ldm_unet.items() if k not in ("image_size", "out_channels", "use_spatial_transformer")}
    sd = {"control_model." + k: v.contiguous() for k, v in ControlNet(hint_channels=3, **kw).state_dict().items()}
    save_safetensors(path, sd)
    return path


@pytest.fixture(scope="module")
def files(fixture_files, tmp_path_factory) -> Dict[str, Path]:
    import shutil

    d = tmp_path_factory.mktemp("cli")
    models = d / "models"
    (models / "ControlNet").mkdir(parents=True)
    cn = _tiny_controlnet(models / "ControlNet" / "control_tiny.safetensors")
    img = d / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(img)
    dup = d / "dups"
    dup.mkdir()
    for n in ("a", "b"):
        shutil.copy(fixture_files["vae"], dup / f"{n}.safetensors")
    return {"sd1": fixture_files["sd1"], "sd1b": fixture_files["sd1_fp16"], "vae": fixture_files["vae"], "img": img,
            "cn": cn, "models": models, "dups": dup, "out": d}


def _invocations(f: Dict[str, Path]) -> Dict[Tuple[str, ...], List[str]]:
    o = f["out"]
    return {
        ("inspect",): [str(f["sd1"])],
        ("prune",): [str(f["sd1"]), "-o", str(o / "pruned.safetensors")],
        ("hash",): [str(f["vae"]), "--no-cache"],
        ("dedup",): [str(f["dups"])],
        ("merge",): [str(f["sd1"]), str(f["sd1b"]), "-o", str(o / "merged.safetensors"), "--no-metadata"],
        ("lora", "extract"): [str(f["sd1b"]), str(f["sd1"]), "-o", str(o / "ex.safetensors"), "--rank", "2"],
        ("lora", "bake"): [str(f["sd1"]), f"{o / 'ex.safetensors'}:0.5", "-o", str(o / "baked.safetensors")],
        ("lora", "inspect"): [str(o / "ex.safetensors")],
        ("lora", "resize"): [str(o / "ex.safetensors"), "-o", str(o / "ex-r1.safetensors"), "--rank", "1"],
        ("lora", "convert"): [str(o / "ex.safetensors"), "--to", "diffusers", "-o", str(o / "ex-diffusers.safetensors")],
        ("lora", "merge"): [f"{o / 'ex.safetensors'}:0.5", f"{o / 'ex-r1.safetensors'}:0.5", "-o",
                            str(o / "ex-merged.safetensors")],
        ("vae", "encode"): [str(f["img"]), "--vae", str(f["vae"]), "-o", str(o / "lat.safetensors")],
        ("vae", "decode"): [str(o / "lat.safetensors"), "--vae", str(f["vae"]), "-o", str(o / "dec.png")],
        ("controlnet", "detect"): [str(f["img"]), "-m", "canny", "-o", str(o / "edges.png")],
        ("controlnet", "models"): ["--models-dir", str(f["models"])],
        ("controlnet", "modules"): [],
        ("controlnet", "info"): [str(f["cn"])],
        ("compare",): [str(f["sd1"]), str(f["sd1b"])],
        ("history",): [str(o)],
        # the merge above was recorded in o's history: re-run that entry (its id is known once the merge ran)
        ("history-rerun",): lambda: [_last_entry(o, "merge"), "--folder", str(o), "--overwrite"],
        ("recipe",): [str(f["sd1"])],
    }


def _last_entry(folder: Path, job: str) -> str:
    lines = (folder / "sdtoolkit-history.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if json.loads(x)["job"] == job][-1]["id"]


#: commands whose --json is checked elsewhere in this file (a server runs until stopped)
RUN_ELSEWHERE = {("serve",)}


def test_every_command_prints_valid_json_and_nothing_else(files, capsys):
    calls = _invocations(files)
    missing = set(_leaves()) - set(calls) - RUN_ELSEWHERE
    assert not missing, f"add an invocation for {sorted(' '.join(m) for m in missing)}"
    for path, argv in calls.items():
        if path not in _leaves():
            continue  # a command another branch has not merged yet
        rc = cli.main(list(path) + (argv() if callable(argv) else argv) + ["--json"])
        out, err = capsys.readouterr()
        assert rc == 0, (path, err)
        try:
            json.loads(out)
        except json.JSONDecodeError:
            pytest.fail(f"`{' '.join(path)} --json` printed no valid JSON: {out[:300]!r}")
        # stderr is not a terminal here: the one progress helper draws no bars into it
        assert "\r" not in err and "it/s" not in err and "%|" not in err, (path, err[:300])


def test_json_stdout_holds_only_json_in_a_fresh_process(files):
    """A fresh process imports the ldm VAE modules during the job, and ldm prints "No module 'xformers'" on
    stdout at import: that line must not land in front of the JSON."""
    out = files["out"] / "fresh-lat.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "lib_sdtoolkit", "vae", "encode", str(files["img"]), "--vae",
                          str(files["vae"]), "-o", str(out), "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["output"] == str(out)


def test_human_output_is_a_table(files, capsys):
    assert cli.main(["hash", str(files["dups"]), "--algo", "sha256,crc32", "--no-cache"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "AutoV2", "SHA256", "CRC32"] and set(lines[1]) <= {"-", " "}
    assert len(lines) == 4 and all(len(line.split()) == 4 for line in lines[2:])
    assert cli.main(["controlnet", "modules"]) == 0
    out = capsys.readouterr().out
    assert "Low Threshold 1..255 (default 100)" in out and "Gamma Correction 0.1..2 (default 1)" in out
    with pytest.raises(SystemExit) as e:  # like --help: no models needed, exits 0
        cli.main(["merge", "--list-presets"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("preset") and "GRAD_V" in out and "0.917" in out
    assert "0.9166666" not in out  # 3 decimals for people
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", "--json", "--list-presets"])
    assert e.value.code == 0
    presets = json.loads(capsys.readouterr().out)
    assert len(presets["GRAD_V"]["blocks"]) == 25 and presets["FLAT_25"]["blocks"][3] == 0.25


def test_errors_name_the_flags(files, capsys):
    out = files["out"] / "exists.png"
    out.write_bytes(b"x")
    assert cli.main(["controlnet", "detect", str(files["img"]), "-o", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert cli.main(["controlnet", "detect", str(files["img"]), "-o", str(out), "--overwrite", "--pixel-perfect",
                     "--width", "10"]) == 2
    assert "--width must be >= 64" in capsys.readouterr().err
    assert cli.main(["lora", "extract", "a", "b", "-o", "x", "--clamp-quantile", "1.5"]) == 2
    assert "--clamp-quantile must be <= 1" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_on_a_taken_port_names_a_free_one(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert cli.main(["serve", "--models-dir", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "is free" in err
    assert "SD Toolkit on http" not in err  # no URL for a server that never started


def test_serve_json_prints_one_json_line(files):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lib_sdtoolkit", "serve", "--models-dir", str(files["models"]),
                             "--port", str(port), "--no-ui", "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # printed once the address was checked, before the server runs
        info = json.loads(line)
        assert info == {"url": f"http://127.0.0.1:{port}/", "models_dir": str(files["models"]), "ui": False}
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()


def test_a_fresh_process_ends_at_once_with_its_exit_code_and_all_its_output(files, tmp_path):
    """``python -m lib_sdtoolkit`` skips Python's shutdown once torch is loaded (``__main__._quick_exit_ok``): the
    exit code and every byte of stdout and stderr must still be there, as with the full shutdown
    (SDTOOLKIT_FULL_EXIT=1). stdout is a block-buffered pipe here, as for most users. (A fresh ``vae encode``, which
    writes a file, is in the test above.)"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SDTOOLKIT_FULL_EXIT", None)
    env.pop("PYTHONUNBUFFERED", None)   # stdout block-buffered into the pipe, as for most users
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)

    def run(args, **extra):
        return subprocess.run([sys.executable, "-m", "lib_sdtoolkit", *args], cwd=ROOT, env=dict(env, **extra),
                              capture_output=True, text=True, timeout=600)

    quick, full = (run(["inspect", str(files["vae"]), "--json"], **extra) for extra in ({}, {"SDTOOLKIT_FULL_EXIT": "1"}))
    assert quick.returncode == full.returncode == 0, (quick.stderr, full.stderr)
    assert quick.stdout == full.stdout and json.loads(quick.stdout)["architecture"] == "VAE"
    err = run(["merge", str(bad), str(files["vae"]), "-o", str(tmp_path / "m.safetensors")])
    assert err.returncode == 2 and err.stderr.startswith("error: ") and "bad.safetensors" in err.stderr
    assert not (tmp_path / "m.safetensors").exists()
