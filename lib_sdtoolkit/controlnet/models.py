"""ControlNet model files: recognise, convert, build, cache.

Supported:
* ldm-format ControlNet (``control_model.`` prefix optional; ``.pth`` / ``.ckpt`` / ``.safetensors``) for SD1.x/SD2.x
  -> :class:`~lib_sdtoolkit.controlnet.cldm.ControlNet` (ldm key names, loaded strictly);
* diffusers ``ControlNetModel`` files (``controlnet_cond_embedding.*``) for SD1.x/SD2.x -> converted to ldm names;
* SDXL (ldm or diffusers format) -> diffusers ``ControlNetModel`` (the ``ldm`` package cannot build SDXL's UNet half);
  ldm names are converted with the UNet key map plus the ControlNet-only names below.

The config is guessed from key names and tensor shapes, offline, starting from the JSON configs shipped in
``controlnet/configs``. Recognised but refused with a clear message: Control-LoRA, T2I-Adapter, IP-Adapter,
ControlLLLite, "difference" ControlNets, ControlNet-Union, InstantID.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import ArchitectureError, MissingDependencyError, ModelFileError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LDM_PREFIX = "control_model."
DEFAULT_CACHE_SIZE = 2

# ------------------------------------------------------------------------------------------------ recognition


def load_shipped_config(name: str) -> Dict[str, Any]:
    with open(CONFIG_DIR / f"{name}.json", "r", encoding="utf-8") as f:
        return json.load(f)


def strip_prefix(keys: List[str]) -> Tuple[str, List[str]]:
    if any(k.startswith(LDM_PREFIX) for k in keys):
        return LDM_PREFIX, [k[len(LDM_PREFIX):] for k in keys if k.startswith(LDM_PREFIX)]
    return "", list(keys)


def recognise(keys: List[str], path: str = "") -> str:
    """"ldm" or "diffusers" for a usable ControlNet; raises ``ArchitectureError`` naming what the file is
    otherwise (refused kinds) or ``ModelFileError`` when it is no ControlNet at all."""
    ks = set(keys)
    name = os.path.basename(path).lower()
    if "lora_controlnet" in ks:
        raise ArchitectureError("Control-LoRA file recognised, but not supported: it stores low-rank deltas that must "
                                "be bound to the loaded SD UNet's weights; use a full ControlNet model instead",
                                path=path)
    if any(k.startswith(("ip_adapter.", "image_proj.")) for k in ks):
        raise ArchitectureError("IP-Adapter file recognised, but not supported (needs a CLIP vision encoder)", path=path)
    if any("lllite" in k for k in ks):
        raise ArchitectureError("ControlLLLite file recognised, but not supported", path=path)
    if any(k.startswith(("adapter.body.", "body.0.")) for k in ks) or \
            ("conv_in.weight" in ks and any(k.startswith("body.") for k in ks)):
        raise ArchitectureError("T2I-Adapter file recognised, but not supported by SD Toolkit's ControlNet units",
                                path=path)
    if "difference" in ks:
        raise ArchitectureError("'difference' ControlNet recognised (weights are deltas to a base UNet), but not "
                                "supported", path=path)
    if any(k.startswith("control_add_embedding.") or k.startswith("task_embedding") for k in ks):
        raise ArchitectureError("ControlNet-Union file recognised, but not supported", path=path)
    if "instant_id" in name or "instantid" in name:
        raise ArchitectureError("InstantID ControlNet recognised, but not supported", path=path)
    if "controlnet_cond_embedding.conv_in.weight" in ks:
        return "diffusers"
    _, bare = strip_prefix(keys)
    if "input_hint_block.0.weight" in bare:
        return "ldm"
    raise ModelFileError("not a ControlNet model: it has neither 'input_hint_block.0.weight' (ldm) nor "
                         "'controlnet_cond_embedding.conv_in.weight' (diffusers)", path=path)


# ------------------------------------------------------------------------------------------- key conversion

def _hint_ldm_to_diffusers(rest: str) -> str:
    m = re.match(r"^(\d+)\.(.*)$", rest)
    if not m:
        raise KeyError(rest)
    i, tail = int(m.group(1)), m.group(2)
    if i == 0:
        return f"controlnet_cond_embedding.conv_in.{tail}"
    if i == 14:
        return f"controlnet_cond_embedding.conv_out.{tail}"
    if i % 2 == 0 and 2 <= i <= 12:
        return f"controlnet_cond_embedding.blocks.{i // 2 - 1}.{tail}"
    raise KeyError(rest)


def controlnet_ldm_key_to_diffusers(key: str, arch: str) -> str:
    """One ldm ControlNet key (without ``control_model.``) -> diffusers ControlNetModel key."""
    from ..arch.keymaps import unet_ldm_key_to_diffusers

    if key.startswith("input_hint_block."):
        return _hint_ldm_to_diffusers(key[len("input_hint_block."):])
    m = re.match(r"^zero_convs\.(\d+)\.0\.(.*)$", key)
    if m:
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if key.startswith("middle_block_out.0."):
        return "controlnet_mid_block." + key[len("middle_block_out.0."):]
    return unet_ldm_key_to_diffusers(key, arch)


def controlnet_diffusers_key_to_ldm(key: str, arch: str) -> str:
    from ..arch.keymaps import unet_diffusers_key_to_ldm

    if key.startswith("controlnet_cond_embedding."):
        rest = key[len("controlnet_cond_embedding."):]
        if rest.startswith("conv_in."):
            return "input_hint_block.0." + rest[len("conv_in."):]
        if rest.startswith("conv_out."):
            return "input_hint_block.14." + rest[len("conv_out."):]
        m = re.match(r"^blocks\.(\d+)\.(.*)$", rest)
        if m:
            return f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"
        raise KeyError(key)
    m = re.match(r"^controlnet_down_blocks\.(\d+)\.(.*)$", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block."):]
    return unet_diffusers_key_to_ldm(key, arch)


def convert_controlnet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], arch: str) -> Dict[str, torch.Tensor]:
    prefix, _ = strip_prefix(list(sd.keys()))
    out = {}
    for k, v in sd.items():
        if prefix and not k.startswith(prefix):
            continue
        out[controlnet_ldm_key_to_diffusers(k[len(prefix):], arch)] = v
    return out


def convert_controlnet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], arch: str,
                                        prefix: str = "") -> Dict[str, torch.Tensor]:
    return {prefix + controlnet_diffusers_key_to_ldm(k, arch): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ config guessing

def _shape(s: Any) -> Tuple[int, ...]:
    return tuple(getattr(s, "shape", s))


def guess_family_ldm(shapes: Mapping[str, Any]) -> str:
    if "label_emb.0.0.weight" in shapes:
        return "SDXL"
    ctx = [_shape(v)[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
    if not ctx:
        raise ArchitectureError("cannot tell the base model: no cross-attention weights in the ControlNet")
    use_linear = any(len(_shape(v)) == 2 for k, v in shapes.items() if k.endswith(".proj_in.weight"))
    if ctx[0] >= 2048:
        return "SDXL"
    if ctx[0] == 1024 or use_linear:
        return "SD2"
    return "SD1"


def guess_ldm_config(shapes: Mapping[str, Any]) -> Dict[str, Any]:
    """ldm ControlNet kwargs for SD1/SD2 from the (prefix-stripped) key -> shape map."""
    family = guess_family_ldm(shapes)
    if family == "SDXL":
        raise ArchitectureError("SDXL ControlNets are built through diffusers (use guess_diffusers_config)")
    cfg = dict(load_shipped_config("sd15" if family == "SD1" else "sd21")["ldm"])
    w0 = _shape(shapes["input_blocks.0.0.weight"])
    mc, cfg["in_channels"] = w0[0], w0[1]
    cfg["model_channels"] = mc
    cfg["hint_channels"] = _shape(shapes["input_hint_block.0.weight"])[1]
    idx = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"^input_blocks\.(\d+)\.", k)] if m})
    downs = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"^input_blocks\.(\d+)\.0\.op\.", k)] if m})
    nrb = (downs[0] - 1) if downs else (idx[-1])
    levels = (idx[-1] + 1) // (nrb + 1)
    if levels * (nrb + 1) != idx[-1] + 1:
        raise ArchitectureError(f"unexpected ControlNet encoder layout ({idx[-1] + 1} input blocks)")
    mult, attn, depth = [], [], 1
    for level in range(levels):
        n = 1 + level * (nrb + 1)
        mult.append(_shape(shapes[f"input_blocks.{n}.0.out_layers.3.weight"])[0] // mc)
        if any(k.startswith(f"input_blocks.{n}.1.") for k in shapes):
            attn.append(2 ** level)
    for k in shapes:
        m = re.search(r"\.transformer_blocks\.(\d+)\.", k)
        if m and k.startswith("input_blocks."):
            depth = max(depth, int(m.group(1)) + 1)
    cfg.update(num_res_blocks=nrb, channel_mult=mult, attention_resolutions=attn, transformer_depth=depth)
    ctx = [_shape(v)[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
    cfg["context_dim"] = ctx[0]
    cfg["use_linear_in_transformer"] = any(len(_shape(v)) == 2 for k, v in shapes.items()
                                           if k.endswith(".proj_in.weight"))
    cfg["family"] = family
    return cfg


def guess_diffusers_config(shapes: Mapping[str, Any]) -> Dict[str, Any]:
    """diffusers ControlNetModel kwargs from a diffusers-named key -> shape map (any family)."""
    sdxl = "add_embedding.linear_1.weight" in shapes
    base = load_shipped_config("sdxl")
    cfg: Dict[str, Any] = dict(base["diffusers"]) if sdxl else {}
    levels = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"^down_blocks\.(\d+)\.", k)] if m})
    boc = [_shape(shapes[f"down_blocks.{i}.resnets.0.conv1.weight"])[0] for i in levels]
    lpb = len({int(m.group(1)) for k in shapes for m in [re.match(r"^down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    types, depths = [], []
    for i in levels:
        has_attn = any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes)
        types.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
        d = {int(m.group(1)) for k in shapes
             for m in [re.match(rf"^down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k)] if m}
        depths.append(max(d) + 1 if d else 1)
    ctx = [_shape(v)[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
    use_linear = any(len(_shape(v)) == 2 for k, v in shapes.items() if k.endswith(".proj_in.weight"))
    ce_in = _shape(shapes["controlnet_cond_embedding.conv_in.weight"])
    ce_out = [ce_in[0]] + [_shape(shapes[f"controlnet_cond_embedding.blocks.{j}.weight"])[0]
                           for j in range(1, 64, 2) if f"controlnet_cond_embedding.blocks.{j}.weight" in shapes]
    cfg.update(in_channels=_shape(shapes["conv_in.weight"])[1], conditioning_channels=ce_in[1],
               block_out_channels=tuple(boc), layers_per_block=lpb, down_block_types=tuple(types),
               transformer_layers_per_block=tuple(depths), cross_attention_dim=ctx[0] if ctx else 768,
               use_linear_projection=use_linear, conditioning_embedding_out_channels=tuple(ce_out))
    if not any(k.startswith("mid_block.attentions.") for k in shapes):
        cfg["mid_block_type"] = "UNetMidBlock2D"
    if sdxl:
        cfg["projection_class_embeddings_input_dim"] = _shape(shapes["add_embedding.linear_1.weight"])[1]
        cfg["attention_head_dim"] = tuple(max(1, c // base["head_dim"]) for c in boc)
        family = "SDXL"
    else:
        family = "SD2" if (use_linear or (ctx and ctx[0] == 1024)) else "SD1"
        cfg["attention_head_dim"] = 8 if family == "SD1" else tuple(c // 64 for c in boc)
    cfg["family"] = family
    return cfg


# ------------------------------------------------------------------------------------------------- model

@dataclass
class ControlModel:
    """A loaded ControlNet: ``model(x, hint, timesteps, context, y=None) -> list`` of residuals (13 for SD1/SD2,
    10 for SDXL) in the order the UNet's skip connections are pushed, middle block last."""

    net: nn.Module
    family: str
    source_format: str  # "ldm" | "diffusers"
    path: str = ""
    context_dim: int = 0
    model_channels: int = 0
    global_average_pooling: bool = False

    @property
    def num_outputs(self) -> int:
        if hasattr(self.net, "zero_convs"):
            return len(self.net.zero_convs) + 1
        return len(self.net.controlnet_down_blocks) + 1

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or self.family

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "ControlModel":
        self.net.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        if hasattr(self.net, "zero_convs"):
            outs = self.net(x, hint, timesteps, context, y)
        else:
            outs = _diffusers_controlnet_residuals(self.net, x, hint, timesteps, context, y)
        if self.global_average_pooling:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return outs


def _diffusers_controlnet_residuals(m: nn.Module, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor,
                                    context: torch.Tensor, y: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Run a diffusers ControlNetModel's modules with the ldm calling convention (``y`` is the ldm ADM vector,
    i.e. diffusers' already-concatenated ``add_embeds``)."""
    if not torch.is_tensor(t):
        t = torch.tensor([t], device=x.device)
    if t.ndim == 0:
        t = t[None]
    t = t.expand(x.shape[0])
    emb = m.time_embedding(m.time_proj(t).to(dtype=x.dtype))
    if getattr(m, "add_embedding", None) is not None:
        if y is None:
            raise ArchitectureError("this SDXL ControlNet needs the ADM vector y (pooled text + size conditioning)")
        emb = emb + m.add_embedding(y.to(emb.dtype))
    h = m.conv_in(x) + m.controlnet_cond_embedding(hint)
    res = [h]
    for blk in m.down_blocks:
        if getattr(blk, "has_cross_attention", False):
            h, r = blk(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, r = blk(hidden_states=h, temb=emb)
        res.extend(r)
    if m.mid_block is not None:
        if getattr(m.mid_block, "has_cross_attention", False):
            h = m.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = m.mid_block(h, emb)
    outs = [blk(r) for blk, r in zip(m.controlnet_down_blocks, res)]
    outs.append(m.controlnet_mid_block(h))
    return outs


def _build_ldm(sd: Dict[str, torch.Tensor], path: str, overrides: Optional[Mapping[str, Any]],
               gap: bool) -> ControlModel:
    from .cldm import ControlNet

    cfg = guess_ldm_config({k: v.shape for k, v in sd.items()})
    family = cfg.pop("family")
    cfg.update(overrides or {})
    with torch.device("meta"):
        net = ControlNet(global_average_pooling=False, **cfg)
    _load_strict(net, sd, path)
    return ControlModel(net.eval(), family, "ldm", path, cfg["context_dim"], cfg["model_channels"], gap)


def _build_diffusers(sd: Dict[str, torch.Tensor], path: str, overrides: Optional[Mapping[str, Any]],
                     gap: bool) -> ControlModel:
    try:
        from diffusers import ControlNetModel
    except ImportError:
        raise MissingDependencyError("this ControlNet (SDXL, or a diffusers layout without an ldm equivalent) needs "
                                     "the Python package 'diffusers', which is not installed here; the A1111 WebUI "
                                     "does not ship it: pip install diffusers into the WebUI's venv",
                                     path=path) from None

    cfg = guess_diffusers_config({k: v.shape for k, v in sd.items()})
    family = cfg.pop("family")
    cfg.update(overrides or {})
    with torch.device("meta"):
        net = ControlNetModel(**cfg)
    _load_strict(net, sd, path)
    return ControlModel(net.eval(), family, "diffusers", path, cfg["cross_attention_dim"],
                        cfg["block_out_channels"][0], gap)


def _load_strict(net: nn.Module, sd: Mapping[str, torch.Tensor], path: str) -> None:
    expected = dict(net.state_dict())
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ArchitectureError(f"ControlNet layout not understood: {len(missing)} missing keys (e.g. "
                                f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})",
                                path=path)
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ArchitectureError(f"shape {tuple(sd[k].shape)} does not fit the guessed config "
                                    f"{tuple(t.shape)}", path=path, key=k)
    net.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)


def build_control_model(sd: Mapping[str, torch.Tensor], path: str = "", dtype: torch.dtype = torch.float32,
                        device: Any = "cpu", overrides: Optional[Mapping[str, Any]] = None) -> ControlModel:
    """A :class:`ControlModel` from a state dict (ldm or diffusers names; ``control_model.`` prefix optional)."""
    keys = list(sd.keys())
    kind = recognise(keys, path)
    gap = "shuffle" in os.path.basename(path).lower()
    if kind == "ldm":
        prefix, _ = strip_prefix(keys)
        bare = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        bare = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in bare.items()}
        family = guess_family_ldm({k: v.shape for k, v in bare.items()})
        if family == "SDXL":
            dsd = convert_controlnet_ldm_to_diffusers(bare, "SDXL")
            model = _build_diffusers(dsd, path, overrides, gap)
            model.source_format = "ldm"
        else:
            model = _build_ldm(bare, path, overrides, gap)
    else:
        dsd = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in sd.items()}
        cfg = guess_diffusers_config({k: v.shape for k, v in dsd.items()})
        if cfg["family"] == "SDXL":
            model = _build_diffusers(dsd, path, overrides, gap)
        else:
            try:
                lsd = convert_controlnet_diffusers_to_ldm(dsd, cfg["family"])
            except KeyError as e:
                raise ArchitectureError(f"diffusers ControlNet key {e} has no ldm equivalent", path=path) from None
            model = _build_ldm(lsd, path, overrides, gap)
            model.source_format = "diffusers"
    return model.to(device=device)


def load_control_model(path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32, device: Any = "cpu",
                       overrides: Optional[Mapping[str, Any]] = None) -> ControlModel:
    """Load a ControlNet file (safetensors or a weights-only pickle) into a :class:`ControlModel`."""
    from ..files import open_model

    path = os.fspath(path)
    with open_model(path) as r:
        keys = r.keys()
        recognise(keys, path)  # refuse early, before reading tensors
        sd = {k: r.get(k) for k in keys}
    if "state_dict" in sd and not torch.is_tensor(sd["state_dict"]):  # pragma: no cover - open_model unwraps
        sd = sd["state_dict"]
    return build_control_model(sd, path, dtype, device, overrides)


def unet_signature(unet: nn.Module) -> Tuple[str, int, int, int]:
    """(kind, number of skip outputs + middle, model_channels, context_dim) of an ldm or diffusers UNet."""
    if hasattr(unet, "input_blocks"):
        n = len(unet.input_blocks) + 1
        mc = int(getattr(unet, "model_channels", 0))
        kind = "ldm"
    else:
        n = 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in unet.down_blocks) + 1
        mc = int(unet.config.block_out_channels[0])
        kind = "diffusers"
    ctx = 0
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_k"):
            ctx = int(mod.in_features)
            break
    return kind, n, mc, ctx


def check_compatible(model: ControlModel, unet: nn.Module) -> None:
    """Raise ``ArchitectureError`` when ``model`` does not fit ``unet`` (SD1 model on SDXL, SD2 on SD1, ...)."""
    _, n, mc, ctx = unet_signature(unet)
    problems = []
    if model.num_outputs != n:
        problems.append(f"{model.num_outputs} control outputs vs {n} UNet skip connections")
    if model.model_channels and mc and model.model_channels != mc:
        problems.append(f"{model.model_channels} vs {mc} base channels")
    if model.context_dim and ctx and model.context_dim != ctx:
        problems.append(f"text context {model.context_dim} vs {ctx}")
    if problems:
        raise ArchitectureError(f"ControlNet '{model.name}' ({model.family}) does not fit the loaded model: "
                                + "; ".join(problems))


# ------------------------------------------------------------------------------------------------- cache

class ControlModelCache:
    """An LRU of loaded ControlNets keyed by (path, mtime, size, dtype, device). ``size`` is the setting
    ``control_net_model_cache_size`` (0 disables caching)."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE,
                 loader: Callable[..., ControlModel] = load_control_model) -> None:
        self.size = max(0, int(size))
        self._loader = loader
        self._items: "OrderedDict[tuple, ControlModel]" = OrderedDict()
        self._lock = threading.Lock()

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = max(0, int(size))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32,
            device: Any = "cpu") -> ControlModel:
        p = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(p)
        except OSError:
            raise ModelFileError("no such ControlNet model file", path=p) from None
        key = (p, st.st_mtime_ns, st.st_size, str(dtype), str(torch.device(device)))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        model = self._loader(p, dtype=dtype, device=device)
        with self._lock:
            if self.size > 0:
                self._items[key] = model
                self._items.move_to_end(key)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return model


__all__ = ["ControlModel", "ControlModelCache", "load_control_model", "build_control_model", "recognise",
           "guess_ldm_config", "guess_diffusers_config", "convert_controlnet_ldm_to_diffusers",
           "convert_controlnet_diffusers_to_ldm", "controlnet_ldm_key_to_diffusers",
           "controlnet_diffusers_key_to_ldm", "check_compatible", "unet_signature", "load_shipped_config"]
