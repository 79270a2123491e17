"""Regenerate the shipped full-width layouts (``lib_sdtoolkit/arch/layouts/*.json.gz``) from the real modules.

    python -m lib_sdtoolkit.samples.gen_layouts [--check]

Each layout is built on the ``meta`` device (no memory) by :func:`lib_sdtoolkit.samples.factory.key_specs`:
ldm UNetModel / ldm VAE / transformers CLIP for SD1 and SD2, diffusers UNet2DConditionModel renamed to sgm names for
SDXL. The bytes are deterministic (sorted JSON, gzip mtime 0), so ``--check`` can compare them with the shipped files.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path
from typing import Dict, Optional


from lib_sdtoolkit.arch.layouts import LAYOUT_FILES
from lib_sdtoolkit.samples import factory

LAYOUT_DIR = Path(__file__).resolve().parent.parent / "arch" / "layouts"


def layout_bytes(arch: str) -> bytes:
    """The gzip-compressed JSON layout of ``arch`` (a key of ``LAYOUT_FILES``)."""
    base, _, variant = arch.partition("-") if arch.startswith("SD1-") else (arch, "", "")
    specs = factory.key_specs(base, "full", variant or None)
    data = {
        "architecture": arch,
        "generated_by": "python -m lib_sdtoolkit.samples.gen_layouts",
        "keys": {s.name: list(s.shape) for s in specs},
        "dtypes": {s.name: str(s.dtype).replace("torch.", "") for s in specs if not s.dtype.is_floating_point},
    }
    raw = json.dumps(data, indent=0).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9, filename="") as gz:
        gz.write(raw)
    return buf.getvalue()


def generate(out_dir: Path = LAYOUT_DIR, check: bool = False) -> Dict[str, bool]:
    """Write (or with ``check`` compare) every layout; returns ``{arch: up_to_date}``."""
    result = {}
    for arch, stem in LAYOUT_FILES.items():
        data = layout_bytes(arch)
        path = out_dir / f"{stem}.json.gz"
        same = path.exists() and path.read_bytes() == data
        result[arch] = same
        if not check and not same:
            from lib_sdtoolkit.files import atomic_path

            with atomic_path(path, overwrite=True) as tmp:
                Path(tmp).write_bytes(data)
    return result


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the shipped files; exit 1 if stale")
    args = ap.parse_args(argv)
    res = generate(check=args.check)
    for arch, same in res.items():
        print(f"{arch:24s} {'up to date' if same else ('STALE' if args.check else 'written')}")
    return 1 if args.check and not all(res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
