"""Read a network file (any supported format) into per-target layers for one architecture.

``load_network(path, arch)`` groups the file's keys by module, classifies each module's type
(:mod:`lib_sdtoolkit.lora.formats`), maps its name to a checkpoint target (:mod:`lib_sdtoolkit.lora.names`) and
checks the factors (NaN/inf, rank consistency). Keys that match no module of ``arch`` are counted in
``Network.unmatched`` (and reported), never silently dropped; a file none of whose modules match raises an
``ArchitectureError`` naming the file and an example layer (e.g. an SDXL LoRA on an SD1 model).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union


from ..arch.blocks import LBW, convention
from ..arch.families import base_arch
from ..arch.keymaps import LoraTarget
from ..errors import ArchitectureError
from ..files import open_model
from . import formats
from .formats import FormatError, LayerWeights
from . import fluxnames
from .names import is_flux, resolve_name, split_key

PathLike = Union[str, "os.PathLike[str]"]

#: why a module of a file is not applied: ``lora inspect --model`` and the WebUI's warning use the same words
UNKNOWN_TARGET = "unknown target name"
SHAPE_MISMATCH = "shape mismatch"
WRONG_ARCH = "wrong architecture"
UNSUPPORTED_TYPE = "unsupported type"
REASONS = (UNKNOWN_TARGET, SHAPE_MISMATCH, WRONG_ARCH, UNSUPPORTED_TYPE)


def partly_text(name: str, total: int, skipped: List[Tuple[str, str]]) -> str:
    """``NAME applies partly: K of N modules not applied: 2 unknown target name (e.g. m1), ...``"""
    by: Dict[str, List[str]] = {}
    for mod, reason in skipped:
        by.setdefault(reason, []).append(mod)
    what = "; ".join(f"{len(v)} {r} (e.g. {v[0]})" for r, v in by.items())
    return f"{name} applies partly: {len(skipped)} of {total} modules not applied: {what}"


@dataclass
class BoundLayer:
    """One module of a network, where it lands and its lora-block-weight block (``LBW`` convention of the
    network's architecture)."""

    weights: LayerWeights
    target: LoraTarget
    block: str

    @property
    def weight_key(self) -> str:
        return self.target.weight_key

    @property
    def bias_key(self) -> str:
        return self.target.module + ("_bias" if self.target.qkv_index is not None else ".bias")

    @property
    def component(self) -> str:
        return self.target.component


@dataclass
class Network:
    """A parsed network file, mapped onto one architecture."""

    path: Path
    name: str
    arch: str
    layers: List[BoundLayer]
    metadata: Dict[str, str] = field(default_factory=dict)
    unmatched: List[str] = field(default_factory=list)       # module names that match no target
    unknown_type: List[str] = field(default_factory=list)    # modules of no supported type
    bundled_embeddings: List[str] = field(default_factory=list)
    mtime: float = 0.0

    @property
    def kinds(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for layer in self.layers:
            out[layer.weights.kind] = out.get(layer.weights.kind, 0) + 1
        return out

    def nbytes(self) -> int:
        return sum(layer.weights.nbytes() for layer in self.layers)

    def not_applied(self) -> List[Tuple[str, str]]:
        """(module, reason) of every module of the file that is not applied to a model of ``arch``."""
        return [(m, UNKNOWN_TARGET) for m in self.unmatched] + [(m, UNSUPPORTED_TYPE) for m in self.unknown_type]

    def report(self) -> str:
        parts = [f"{self.name}: {len(self.layers)} layers ({', '.join(f'{k} {v}' for k, v in self.kinds.items())})"]
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} modules match nothing in a {self.arch} model "
                         f"(e.g. {self.unmatched[0]})")
        if self.unknown_type:
            parts.append(f"{len(self.unknown_type)} modules of unsupported type (e.g. {self.unknown_type[0]})")
        return "; ".join(parts)


def group_modules(keys: List[str], arch: str) -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """{module name: {part: file key}} and the bundled-embedding keys."""
    groups: Dict[str, Dict[str, str]] = {}
    bundled: List[str] = []
    for k in keys:
        if k.startswith("bundle_emb."):
            bundled.append(k)
            continue
        s = split_key(k, arch)
        if s is None:
            groups.setdefault(k, {})
            continue
        mod, part, _ = s
        groups.setdefault(mod, {})[part] = k
    return groups, bundled


def guess_lora_arch(keys: List[str], metadata: Dict[str, str]) -> Optional[str]:
    """SD1 / SD2 / SDXL / Flux.1 from key names and ss_* metadata, or None."""
    if fluxnames.looks_like_flux(keys, metadata):
        return fluxnames.ARCH
    ver = metadata.get("ss_base_model_version", "")
    if ver.startswith("sdxl"):
        return "SDXL"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    if metadata.get("ss_v2") == "True" or ver.startswith("sd_v2"):
        return "SD2"
    if any(k.startswith("lora_unet_input_blocks_7_1_") or k.startswith("lora_unet_input_blocks_8_1_")
           for k in keys):
        return "SDXL"
    if keys:
        return "SD1"
    return None


def _module_of(key: str, arch: str) -> str:
    """The module a file key belongs to, as the file spells it (``diffusion_model.double_blocks.0.img_attn.qkv``, not
    just ``diffusion_model``), for an error that names one layer."""
    s = split_key(key, arch)
    return s[0] if s else key.split(".")[0]


def load_network(path: PathLike, arch: str, name: Optional[str] = None) -> Network:
    """Parse ``path`` for a model of ``arch`` (SD1, SD2, SDXL...). Raises ModelFileError/FormatError/
    ArchitectureError with the file and the layer named."""
    p = Path(path)
    flux = is_flux(arch)
    base = fluxnames.ARCH if flux else base_arch(arch)
    with open_model(p) as r:
        keys = r.keys()
        metadata = dict(r.metadata)
        guessed = guess_lora_arch(keys, metadata)
        if (guessed == fluxnames.ARCH) != flux:
            example = keys[0] if keys else "-"
            raise ArchitectureError(f"this is a{' Flux.1' if guessed == fluxnames.ARCH else ' ' + str(guessed)} "
                                    f"network and the model is {base}; not applied", p,
                                    _module_of(example, guessed or base))
        if guessed == "SDXL" and not base.startswith("SDXL"):
            example = next((k for k in keys if k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))), keys[0])
            raise ArchitectureError(f"this is an SDXL network (te1/te2 text encoders or sdxl base model in its "
                                    f"metadata) and the model is {base}; not applied", p, example.split(".")[0])
        groups, bundled = group_modules(keys, base)
        block_of = fluxnames.block_of if flux else (lambda t, c=convention(LBW, base): c.block_of(t.module))
        layers: List[BoundLayer] = []
        unmatched: List[str] = []
        unknown: List[str] = []
        for mod, parts in groups.items():
            if not parts:
                unknown.append(mod)
                continue
            target = resolve_name(mod, base)
            if target is None:
                unmatched.append(mod)
                continue
            tensors = {part: r.get(key) for part, key in parts.items()}
            kind = formats.classify(set(tensors))
            if kind is None:
                unknown.append(mod)
                continue
            layer = formats.make_layer(mod, tensors, str(p))
            bad = formats.nonfinite_parts(layer)
            if bad:
                raise FormatError(f"NaN or inf in {', '.join(bad)}; the network is not applied", p, mod)
            layers.append(BoundLayer(layer, target, block_of(target)))
    if not layers:
        guessed = guess_lora_arch(keys, metadata)
        example = (unmatched or unknown or keys)[0]
        if guessed and guessed != base and unmatched:
            raise ArchitectureError(f"this looks like a {guessed} network and matches no layer of the {base} model "
                                    f"(e.g. {example}); not applied", p, example)
        raise ArchitectureError(f"no layer of this file matches a {base} model (e.g. {example}); not applied", p,
                                example)
    try:
        mtime = p.stat().st_mtime
    except OSError:
        mtime = 0.0
    return Network(p, name or p.stem, base, layers, metadata, unmatched, unknown, bundled, mtime)


def check_shapes(net: Network, shapes: Dict[str, Tuple[int, ...]], dyn: Optional[int] = None) -> None:
    """Every layer's ΔW fits its target (``shapes``: weight key -> shape; qkv targets use one third of the rows).
    Raises FormatError naming the file and the layer; a target missing from ``shapes`` raises ArchitectureError."""
    for layer in net.layers:
        shape = shapes.get(layer.weight_key)
        if shape is None:
            raise ArchitectureError(f"the model has no layer {layer.weight_key}; not applied", net.path,
                                    layer.weights.name)
        shape = tuple(shape)
        rows = layer.target.row_slice(shape)
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        try:
            formats.check_layer(layer.weights, shape, dyn)
            if layer.weights.dora_scale is not None:
                formats.dora_on_out(layer.weights.dora_scale, shape)
        except ValueError as e:
            raise FormatError(f"{e}; the network is not applied", net.path, layer.weights.name) from None


class NetworkCache:
    """The last ``size`` networks parsed, keyed by (file, mtime, architecture): the same ``<lora:...>`` in the
    next generation costs no file read, and a file changed on disk is parsed again. Used by both WebUI faces."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._nets: dict = {}

    def get(self, path: PathLike, arch: str, name: Optional[str] = None, on_load=None) -> Network:
        p = Path(path)
        key = (str(p), p.stat().st_mtime, arch)
        net = self._nets.pop(key, None)
        if net is None:
            net = load_network(p, arch, name)
            if on_load is not None:
                on_load(net)
        self._nets[key] = net   # most recent last
        while len(self._nets) > self.size:
            self._nets.pop(next(iter(self._nets)))
        return net

    def clear(self) -> None:
        self._nets.clear()


__all__ = ["Network", "BoundLayer", "load_network", "NetworkCache", "check_shapes", "guess_lora_arch", "group_modules"]
