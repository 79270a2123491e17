"""The UNet hook: adds ControlNet residuals to an ldm (or diffusers) UNet for one generation, then restores it.

``UnetHook(units).hook(unet)`` replaces ``unet.forward`` on the instance (the class is never touched) with a forward
that computes each active unit's control residuals, scales them by weight and control mode, sums the units and adds
them at the middle block and the skip connections. ``restore()`` (also run by ``with``-exit, on errors and
interrupts) puts the original back exactly.

Control modes (sd-webui-controlnet):
* Balanced: every residual times ``weight``;
* "My prompt is more important": soft injection, residual i times ``weight * 0.825 ** (12 - i)`` (i = 0..12, the
  middle block last; SDXL's 10 residuals take the first 10 of those 13 factors);
* "ControlNet is more important": the same soft injection and no control on unconditional (CFG) rows.

Guidance start/end are fractions of the sampling steps: a unit runs while ``start <= step/total <= end``
(``set_step`` is called by the face, e.g. from the WebUI's ``on_cfg_denoiser``).

Unconditional rows are recognised by comparing each row's text context with the unconditional context given to
:meth:`UnetHook.set_uncond` (or an explicit ``cond_mark``); without either, every row counts as conditional (the
fallback upstream uses too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ArchitectureError, SdToolkitError
from .models import ControlModel, check_compatible
from .unit import ControlMode, HiResFixOption

log = logging.getLogger(__name__)

SOFT_INJECTION_BASE = 0.825


def control_scales(mode: ControlMode, weight: float, n: int,
                   advanced_weighting: Optional[Sequence[float]] = None) -> List[float]:
    """The per-residual scales of one unit (index n-1 is the middle block)."""
    if advanced_weighting is not None:
        if len(advanced_weighting) != n:
            raise SdToolkitError(f"advanced_weighting has {len(advanced_weighting)} values, the model has {n} "
                                 "outputs")
        return [float(w) * weight for w in advanced_weighting]
    if ControlMode(mode) == ControlMode.BALANCED:
        return [float(weight)] * n
    return [float(weight) * SOFT_INJECTION_BASE ** float(12 - i) for i in range(13)][:n]


@dataclass
class HookUnit:
    """One unit ready to run: a loaded model and its hint image (1 or B, C, H, W) in [0, 1]."""

    model: ControlModel
    hint: torch.Tensor
    weight: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    hr_option: HiResFixOption = HiResFixOption.BOTH
    advanced_weighting: Optional[Sequence[float]] = None
    name: str = ""
    _hint_cache: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def hint_for(self, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (batch, height, width, dtype, str(device))
        h = self._hint_cache.get(key)
        if h is None:
            h = self.hint.to(device=device, dtype=torch.float32)
            if h.ndim == 3:
                h = h[None]
            if tuple(h.shape[-2:]) != (height, width):
                h = torch.nn.functional.interpolate(h, size=(height, width), mode="bilinear", align_corners=False,
                                                    antialias=h.shape[-2] > height or h.shape[-1] > width)
            if h.shape[0] != batch:
                if batch % h.shape[0]:
                    raise SdToolkitError(f"ControlNet unit '{self.name}': {h.shape[0]} hint images for a batch "
                                         f"of {batch}")
                h = h.repeat(batch // h.shape[0], 1, 1, 1)
            h = h.to(dtype).contiguous()
            self._hint_cache.clear()
            self._hint_cache[key] = h
        return h


class UnetHook:
    """Hook ControlNet units into one UNet for one generation (see module doc)."""

    def __init__(self, units: Iterable[HookUnit], warn: Optional[Callable[[str], None]] = None) -> None:
        self.units: List[HookUnit] = list(units)
        self.step: Optional[int] = None
        self.total_steps: Optional[int] = None
        self.is_hr_pass = False
        self.cond_mark: Optional[torch.Tensor] = None
        self.uncond_context: Optional[torch.Tensor] = None
        self.warnings: List[str] = []
        self._warn = warn or log.warning
        self._unet: Optional[nn.Module] = None
        self._saved: Optional[Tuple[bool, Any]] = None
        self._kind = ""

    # ---------------------------------------------------------------------------------------------- state
    def set_step(self, step: int, total: int) -> None:
        self.step, self.total_steps = int(step), int(total)

    def set_uncond(self, uncond_context: Optional[torch.Tensor]) -> None:
        self.uncond_context = uncond_context

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self._warn(msg)

    def _unit_active(self, u: HookUnit) -> bool:
        if u.hr_option == HiResFixOption.LOW_RES_ONLY and self.is_hr_pass:
            return False
        if u.hr_option == HiResFixOption.HIGH_RES_ONLY and not self.is_hr_pass:
            return False
        if self.step is None or not self.total_steps:
            return True
        pct = self.step / self.total_steps
        return not (pct < u.guidance_start or pct > u.guidance_end)

    def _cond_mark(self, context: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        if self.cond_mark is not None and self.cond_mark.numel() == batch:
            return self.cond_mark.reshape(batch).to(device=device, dtype=torch.float32)
        mark = torch.ones(batch, device=device)
        uc = self.uncond_context
        if uc is None or context is None or not torch.is_tensor(context):
            return mark
        if uc.ndim == 2:
            uc = uc[None]
        n = min(uc.shape[1], context.shape[1])
        if uc.shape[-1] != context.shape[-1] or n == 0:
            return mark
        a = context[:, :n].to(torch.float32)
        b = uc[:, :n].to(device=a.device, dtype=torch.float32)
        for i in range(batch):
            if any(torch.equal(a[i], b[j]) for j in range(b.shape[0])):
                mark[i] = 0.0
        return mark

    # ---------------------------------------------------------------------------------------------- control
    @torch.no_grad()
    def compute_control(self, x: torch.Tensor, timesteps: Any, context: Any,
                        y: Optional[torch.Tensor] = None) -> Optional[List[torch.Tensor]]:
        """Summed, scaled residuals of the active units for this call, or None when no unit is active."""
        active = [u for u in self.units if self._unit_active(u)]
        if not active:
            return None
        batch = x.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([float(timesteps)], device=x.device)
        if timesteps.ndim == 0 or timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(batch)
        mark = None
        total: Optional[List[torch.Tensor]] = None
        for u in active:
            m = u.model
            dt = m.dtype
            hint = u.hint_for(batch, x.shape[-2] * 8, x.shape[-1] * 8, dt, m.device)
            outs = m(x.to(device=m.device, dtype=dt), hint, timesteps.to(m.device),
                     context.to(device=m.device, dtype=dt) if torch.is_tensor(context) else context,
                     y.to(device=m.device, dtype=dt) if torch.is_tensor(y) else y)
            scales = control_scales(u.control_mode, u.weight, len(outs), u.advanced_weighting)
            cfg_injection = ControlMode(u.control_mode) == ControlMode.CONTROL
            if cfg_injection and mark is None:
                mark = self._cond_mark(context if torch.is_tensor(context) else None, batch, x.device)
            scaled = []
            for o, s in zip(outs, scales):
                o = o.to(device=x.device, dtype=x.dtype) * s
                if cfg_injection:
                    o = o * mark.to(o.dtype).view(-1, 1, 1, 1)
                scaled.append(o)
            total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
        return total

    # ---------------------------------------------------------------------------------------------- install
    def hook(self, unet: nn.Module) -> "UnetHook":
        """Install on ``unet`` (ldm/sgm ``UNetModel`` or diffusers ``UNet2DConditionModel``). Units whose model
        does not fit the UNet are dropped with a warning; the generation goes on without them."""
        if self._unet is not None:
            raise SdToolkitError("this ControlNet hook is already installed")
        kept = []
        for u in self.units:
            try:
                check_compatible(u.model, unet)
                kept.append(u)
            except ArchitectureError as e:
                self.warn(f"ControlNet unit '{u.name or u.model.name}' skipped: {e}")
        self.units = kept
        had_own = "forward" in unet.__dict__
        self._saved = (had_own, unet.__dict__.get("forward"))
        self._unet = unet
        self._kind = "ldm" if hasattr(unet, "input_blocks") else "diffusers"
        original = unet.forward
        if self._kind == "ldm":
            unet.forward = self._make_ldm_forward(unet, original)
        else:
            unet.forward = self._make_diffusers_forward(unet, original)
        return self

    def restore(self) -> None:
        """Put the UNet's original forward back (idempotent)."""
        unet, saved = self._unet, self._saved
        if unet is None or saved is None:
            return
        had_own, fwd = saved
        if had_own:
            unet.forward = fwd
        else:
            unet.__dict__.pop("forward", None)
        self._unet = None
        self._saved = None
        for u in self.units:
            u._hint_cache.clear()

    @property
    def installed(self) -> bool:
        return self._unet is not None

    def __enter__(self) -> "UnetHook":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # ---------------------------------------------------------------------------------------------- forwards
    def _make_ldm_forward(self, unet: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        hook = self

        def forward(x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None, **kwargs: Any):
            control = hook.compute_control(x, timesteps, context, y)
            if control is None:
                return original(x, timesteps, context, y, **kwargs)
            if len(control) != len(unet.input_blocks) + 1:
                raise ArchitectureError(f"ControlNet gave {len(control)} residuals, the UNet has "
                                        f"{len(unet.input_blocks) + 1} injection points")
            t_emb = timestep_embedding(timesteps, unet.model_channels, repeat_only=False)
            emb = unet.time_embed(t_emb.to(unet.time_embed[0].weight.dtype))
            if getattr(unet, "num_classes", None) is not None:
                emb = emb + unet.label_emb(y)
            hs = []
            h = x.type(getattr(unet, "dtype", x.dtype))
            for module in unet.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = unet.middle_block(h, emb, context)
            h = h + control.pop().to(h.dtype)
            for module in unet.output_blocks:
                h = torch.cat([h, hs.pop() + control.pop().to(h.dtype)], dim=1)
                h = module(h, emb, context)
            h = h.type(x.dtype)
            if getattr(unet, "predict_codebook_ids", False):
                return unet.id_predictor(h)
            return unet.out(h)

        return forward

    def _make_diffusers_forward(self, unet: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        hook = self

        def forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: Any = None, *args: Any,
                    **kwargs: Any):
            y = None
            added = kwargs.get("added_cond_kwargs")
            if added and getattr(unet, "add_time_proj", None) is not None:
                tid = unet.add_time_proj(added["time_ids"].flatten()).reshape(sample.shape[0], -1)
                y = torch.cat([added["text_embeds"], tid.to(added["text_embeds"].dtype)], dim=-1)
            control = hook.compute_control(sample, timestep, encoder_hidden_states, y)
            if control is None:
                return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
            downs, mid = control[:-1], control[-1]
            prev_d = kwargs.get("down_block_additional_residuals")
            prev_m = kwargs.get("mid_block_additional_residual")
            if prev_d is not None:
                downs = [a + b for a, b in zip(prev_d, downs)]
            if prev_m is not None:
                mid = prev_m + mid
            kwargs["down_block_additional_residuals"] = tuple(downs)
            kwargs["mid_block_additional_residual"] = mid
            return original(sample, timestep, encoder_hidden_states, *args, **kwargs)

        return forward


__all__ = ["UnetHook", "HookUnit", "control_scales", "SOFT_INJECTION_BASE"]
