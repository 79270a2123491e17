"""WebUI hook: installs the few packages SD Toolkit needs that the WebUI might lack.

The WebUI runs this file as a subprocess on every start (with its own folder on PYTHONPATH so ``import launch``
works). It must be fast and idempotent: each package is checked with ``launch.is_installed`` and only missing ones
are installed with ``launch.run_pip``. Never installs or upgrades what the WebUI pins itself (torch, gradio,
transformers, ...): those come from the WebUI.
"""
import launch

#: (name checked with launch.is_installed, pip requirement). Every third-party package our code imports at run
#: time is either pinned by the WebUI (A1111 1.10.1 requirements_versions.txt or a dependency of a pin) or listed
#: here; tests/test_install.py walks the imports and checks it. blake3 is not pinned by the WebUI: without it the
#: BLAKE3 file hash is left out with a message (the dedup content hash uses hashlib only).
REQUIREMENTS = (
    ("safetensors", "safetensors>=0.4.2"),
    ("einops", "einops"),
    ("tqdm", "tqdm"),
    ("blake3", "blake3>=0.3"),
)
#: the WebUI owns these; installing them from an extension breaks installs
NEVER_INSTALL = frozenset({"torch", "torchvision", "xformers", "gradio", "transformers", "fastapi", "pydantic",
                           "accelerate", "numpy", "diffusers", "open_clip_torch", "open-clip-torch", "httpx"})


def missing_requirements():
    return [req for name, req in REQUIREMENTS if name not in NEVER_INSTALL and not launch.is_installed(name)]


def main() -> None:
    for req in missing_requirements():
        launch.run_pip(f"install {req}", f"SD Toolkit requirement: {req}")


main()
