"""Shared session fixtures: real model files with the exact key layouts of released checkpoints, at tiny width.

Built by :mod:`lib_sdtoolkit.samples.factory` (real ldm / diffusers / transformers modules, see its docstring).
Everything is lazy and session-scoped: a file is written the first time a test asks for it.

* ``models_dir``: a WebUI-like ``models/`` folder from ``factory.write_sample_library`` (Stable-diffusion with a
  tiny SD1.5 and SDXL, VAE with a VAE and a byte-identical copy, empty Lora/ and ControlNet/).
* ``fixture_files``: mapping name -> Path, names in :data:`FIXTURE_SPECS` (read its comments).
* ``tiny_modules``: ``tiny_modules(arch, diffusers=False)`` -> dict of real modules (``unet``, ``vae``,
  ``text_encoder``, ``text_encoder_2``) holding exactly the weights the ``seed=0`` files of ``arch`` hold.
* ``mecha_layout``: ``mecha_layout("sd1-ldm")`` -> the key list sd-mecha ships for that model config.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite never reads or writes the user's hash cache (~/.cache/sd-toolkit): a cache left there by another
# checkout (another schema) or by earlier runs must not change what a test sees. Tests that need their own cache
# still set SDTOOLKIT_CACHE_DIR themselves.
if not os.environ.get("SDTOOLKIT_CACHE_DIR"):
    import tempfile

    os.environ["SDTOOLKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdt-test-cache-")

# Intra-op torch threads for the whole suite (and the CLI subprocesses it starts, which inherit the variable).
# Every model here is tiny. On a busy 2-core machine (CI neighbours, other workers) a second OpenMP thread spins
# at each barrier for a whole time slice: factory.write_checkpoint("SD1") took 5.4 s with two threads and 0.7 s
# with one there. On an idle one the second core pays: the whole suite took 629 s with two threads and 748 s with
# one (same commit, idle 2-core machine, 2026-12-01). So: one thread when the machine is already busy at start
# (other processes keep >= cores - 0.5 cores busy at start, :func:`_others_busy_cores`; the 1-minute load average
# where /proc/stat is not there), torch's default otherwise.
# No assertion depends on it: a thread count can at most change the order of a float reduction, and a test that
# compares a subprocess's result with its own compares two computations made with the same setting (the
# subprocesses inherit OMP_NUM_THREADS, or the same default when it is unset).
# Set before anything imports torch; a value the caller exported wins.
def _busy_machine() -> bool:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = _others_busy_cores()
    if busy is not None:
        return busy >= cores - 0.5
    try:
        return os.getloadavg()[0] >= cores - 0.5
    except OSError:
        return False


def _others_busy_cores():
    """Cores busy with other processes right now: /proc/stat sampled over 0.3 s while this one sleeps. The 1-minute
    load average also counts what ran just before (CI's `setup.sh --test`, pip's checks), which made an idle
    machine look busy (load 1.85 at the start of a fresh-clone run here, right after other work: one thread)."""
    import time

    def sample():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)   # idle + iowait, all

    try:
        i0, t0 = sample()
        time.sleep(0.3)
        i1, t1 = sample()
        cores = os.cpu_count() or 1
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * cores


if "OMP_NUM_THREADS" not in os.environ and _busy_machine():
    os.environ["OMP_NUM_THREADS"] = "1"
if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS"):  # a plugin imported torch before this file
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Python's cyclic garbage collector, for this test process only (the product never sets it). The suite imports
# torch, transformers, diffusers, gradio and fastapi into one process; each full collection walks all of their
# objects, and with the default thresholds (700, 10, 10) those came 30 times over four test files, up to 1.2 s each
# (12.8 s of 105 s, measured with gc.callbacks). With these, 9 full collections over the whole suite (2.3 s), and
# the suite took 574 s against 620 s (same commit, idle 2-core machine, 2026-12-01). Cycles are still collected;
# tests that measure memory call gc.collect() themselves.
import gc  # noqa: E402

gc.set_threshold(10_000, 20, 100)

#: fixture name -> write_checkpoint arguments (arch first). Every file uses seed 0 unless said otherwise.
FIXTURE_SPECS: Dict[str, Dict[str, Any]] = {
    "sd1": dict(arch="SD1", suffix=".safetensors"),                      # SD1.5, fp32, 1131 keys
    "sd1_fp16": dict(arch="SD1", suffix=".safetensors", dtype="float16"),
    "sd1_bf16": dict(arch="SD1", suffix=".safetensors", dtype="bfloat16"),
    # SD1 .ckpt as released: {"state_dict", "epoch", "global_step"}, model_ema.* copies, DDPM buffers, logvar,
    # loss.* keys, and float position_ids with values like 75.9975
    "sd1_ema_junk_ckpt": dict(arch="SD1", suffix=".ckpt", ema=True, junk=True, broken_position_ids=True),
    "sd1_inpainting": dict(arch="SD1", suffix=".safetensors", variant="inpainting", dtype="float16"),
    "sd1_ip2p": dict(arch="SD1", suffix=".safetensors", variant="instruct-pix2pix", dtype="float16"),
    "sd2": dict(arch="SD2", suffix=".safetensors", dtype="float16"),     # SD2.1, OpenCLIP ViT-H text encoder
    "sdxl": dict(arch="SDXL", suffix=".safetensors", dtype="float16"),   # SDXL base 1.0, 2515 keys
    "sdxl_refiner": dict(arch="SDXL-refiner", suffix=".safetensors", dtype="float16"),
    "vae": dict(arch="VAE", suffix=".safetensors"),                      # bare keys (encoder., decoder., ...)
    "vae_prefixed_pt": dict(arch="VAE", suffix=".pt", vae_prefix=True),  # first_stage_model.* in a pickle
}


class LazyFiles(Mapping):
    """name -> Path; writes each file on first access."""

    def __init__(self, root: Path, specs: Dict[str, Dict[str, Any]]):
        self.root = root
        self.specs = specs
        self._done: Dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._done:
            import torch

            from lib_sdtoolkit.samples import factory

            kw = dict(self.specs[name])  # KeyError for unknown names
            arch, suffix = kw.pop("arch"), kw.pop("suffix")
            if "dtype" in kw:
                kw["dtype"] = getattr(torch, kw["dtype"])
            path = self.root / f"{name}{suffix}"
            factory.write_checkpoint(path, arch, **kw)
            os.chmod(path, 0o444)  # fixtures are inputs: a test that writes over one fails loudly
            self._done[name] = path
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory) -> Mapping:
    return LazyFiles(tmp_path_factory.mktemp("fixture_models"), FIXTURE_SPECS)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from lib_sdtoolkit.samples import factory

    root = tmp_path_factory.mktemp("webui") / "models"
    factory.write_sample_library(root)
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tests on tiny models: on a shared 2-core machine, handing tiny matmuls to
    worker threads costs far more than the maths. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_modules() -> Callable[..., Dict[str, Any]]:
    from lib_sdtoolkit.samples import factory

    cache: Dict[tuple, Dict[str, Any]] = {}

    def get(arch: str, diffusers: bool = False, variant: str | None = None) -> Dict[str, Any]:
        key = (arch, diffusers, variant)
        if key not in cache:
            cache[key] = factory.build_modules(arch, "tiny", seed=0, variant=variant, diffusers=diffusers)
        return cache[key]

    return get


def mecha_config_path(name: str) -> Path:
    """Path of sd-mecha's shipped key list ``<name>.yaml`` (found without importing sd_mecha)."""
    spec = importlib.util.find_spec("sd_mecha")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("sd-mecha is a test dependency (its model_configs/*.yaml are the reference key lists); "
                    "pip install --no-deps sd-mecha==1.1.8")
    return Path(list(spec.submodule_search_locations)[0]) / "extensions" / "builtin" / "model_configs" / f"{name}.yaml"


@pytest.fixture(scope="session")
def mecha_layout() -> Callable[[str], Dict[str, Dict[str, Dict[str, Any]]]]:
    """``mecha_layout("sd1-ldm")`` -> {component: {key: {"shape": [...], "dtype": ..., "optional": ...}}}."""
    import yaml

    cache: Dict[str, Any] = {}

    def get(name: str):
        if name not in cache:
            with open(mecha_config_path(name), encoding="utf-8") as f:
                cache[name] = yaml.safe_load(f)["components"]
        return cache[name]

    return get
