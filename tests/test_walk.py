"""The one folder walker (files.walk) and the listings built on it: symlink loops end, FIFOs are not models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lib_sdtoolkit.files.walk import walk_files
from lib_sdtoolkit.host import StandaloneHost


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    lora = root / "Lora"
    (lora / "sub").mkdir(parents=True)
    (lora / "b.safetensors").write_bytes(b"x")
    (lora / "sub" / "a.safetensors").write_bytes(b"x")
    (lora / ".hidden.safetensors").write_bytes(b"x")
    (lora / "notes.txt").write_text("not a model")
    os.symlink("..", lora / "sub" / "loop")           # a link back up the tree
    os.symlink(lora / "sub", lora / "again")           # a second way into the same real folder
    os.mkfifo(lora / "pipe.safetensors")                # reading it would block forever
    for sub in ("Stable-diffusion", "VAE", "ControlNet"):
        (root / sub).mkdir()
    return root


def test_walk_ends_on_symlink_loops_and_skips_fifos_and_hidden_files(tree):
    found = [p.relative_to(tree / "Lora").as_posix() for p in walk_files(tree / "Lora")]
    # each real folder once (sub/ reached through "again" first in sorted order), no FIFO, no hidden file
    assert sorted(Path(f).name for f in found) == ["a.safetensors", "b.safetensors"]
    assert not any("loop" in f for f in found)
    assert list(walk_files(tree / "missing")) == []


def test_host_lists_and_lora_registry_use_the_same_rules(tree):
    from lib_sdtoolkit.lora.registry import LoraRegistry

    host = StandaloneHost(models_dir=tree)
    names = [p.name for p in host.list_models("lora")]
    assert sorted(names) == ["a.safetensors", "b.safetensors"]
    reg = LoraRegistry([tree / "Lora"])
    assert sorted(e.path.name for e in reg.entries) == ["a.safetensors", "b.safetensors"]
