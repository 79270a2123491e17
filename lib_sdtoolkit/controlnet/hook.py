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

Tile colour fix (sd-webui-controlnet's ``tile_colorfix`` / ``tile_colorfix+sharp``): a unit with
``colorfix_variation`` k also post-processes the UNet's noise prediction at every call (upstream does this whatever
the guidance window): with the DDPM schedule at the rounded timestep t,
``x0 = sqrt(1/a_t) * x_t - sqrt(1/a_t - 1) * eps``; ``x0' = x0 - blur(x0, k) + blur(z_hint, k)`` where ``z_hint`` is
the hint image encoded by the VAE (``encode_latent``) and ``blur`` a (2k+1)^2 box filter with replicated borders
(k doubled in the hires pass); ``+sharp`` mixes ``s * blur(x0', k) + (1 - s) * x0'`` into the unconditional rows
(s = sharpness / 100); then ``eps' = (sqrt(1/a_t) * x_t - x0') / sqrt(1/a_t - 1)`` and the output is
``w * eps' + (1 - w) * eps`` with w = weight clipped to [0, 1]. It needs the host's VAE encoder and an
eps-predicting model: without an encoder, or for a v-prediction model, the unit runs without the colour fix and a
warning says so.

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
    #: tile colour fix: the "Variation" k (None = no colour fix) and, for ``+sharp``, the "Sharpness" slider value
    colorfix_variation: Optional[int] = None
    colorfix_sharpness: Optional[float] = None
    _hint_cache: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _latent_cache: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

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


def sd_alphas_cumprod(num_timesteps: int = 1000, linear_start: float = 0.00085,
                      linear_end: float = 0.012) -> torch.Tensor:
    """The cumulative alphas of the SD1/SD2/SDXL training schedule (ldm's "linear" = scaled linear betas)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a (2k+1) x (2k+1) window, borders replicated."""
    y = torch.nn.functional.pad(x, (k, k, k, k), mode="replicate")
    return torch.nn.functional.avg_pool2d(y, (2 * k + 1, 2 * k + 1), stride=1)


class UnetHook:
    """Hook ControlNet units into one UNet for one generation (see module doc).

    ``encode_latent(pixels)`` (pixels in [-1, 1], N x 3 x H x W) -> scaled latents, and ``alphas_cumprod`` (default:
    the SD schedule) are needed only by tile colour-fix units; ``prediction`` is the model's parameterization."""

    def __init__(self, units: Iterable[HookUnit], warn: Optional[Callable[[str], None]] = None,
                 encode_latent: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 alphas_cumprod: Optional[torch.Tensor] = None, prediction: str = "eps") -> None:
        self.units: List[HookUnit] = list(units)
        self.encode_latent = encode_latent
        self.alphas_cumprod = alphas_cumprod
        self.prediction = prediction
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

    @property
    def has_colorfix(self) -> bool:
        return any(u.colorfix_variation is not None for u in self.units)

    def _hint_latent(self, u: HookUnit, batch: int, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), str(x.device))
        lat = u._latent_cache.get(key)
        if lat is None:
            hint = u.hint_for(1, x.shape[-2] * 8, x.shape[-1] * 8, torch.float32, x.device)
            lat = self.encode_latent(hint * 2.0 - 1.0).to(device=x.device, dtype=torch.float32)
            if tuple(lat.shape[-2:]) != tuple(x.shape[-2:]):
                raise SdToolkitError(f"ControlNet unit '{u.name}': the VAE gave a {tuple(lat.shape[-2:])} latent "
                                     f"for a {tuple(x.shape[-2:])} generation")
            u._latent_cache.clear()
            u._latent_cache[key] = lat
        if lat.shape[0] != batch:
            lat = lat[:1].expand(batch, -1, -1, -1)
        return lat

    @torch.no_grad()
    def apply_colorfix(self, eps: torch.Tensor, x: torch.Tensor, timesteps: Any, context: Any) -> torch.Tensor:
        """The tile colour fix of every colour-fix unit on the UNet output ``eps`` (module doc)."""
        units = [u for u in self.units if u.colorfix_variation is not None]
        if not units:
            return eps
        batch = x.shape[0]
        ac = self.alphas_cumprod if self.alphas_cumprod is not None else sd_alphas_cumprod()
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([float(timesteps)])
        t = torch.round(timesteps.float().reshape(-1)).long().to(ac.device)
        if t.numel() == 1:
            t = t.expand(batch)
        a = ac.to(torch.float64)[t].to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        sr, srm1 = torch.sqrt(1.0 / a), torch.sqrt(1.0 / a - 1.0)
        xt = x[:, :4].float()
        out = eps.float()
        mark = None
        for u in units:
            k = int(u.colorfix_variation)
            if self.is_hr_pass and not self._hr_disabled(u):
                k *= 2
            x0 = sr * xt - srm1 * out
            x0 = x0 - box_blur(x0, k) + box_blur(self._hint_latent(u, batch, x), k)
            if u.colorfix_sharpness is not None:
                if mark is None:
                    mark = self._cond_mark(context if torch.is_tensor(context) else None, batch, x.device)
                s = float(u.colorfix_sharpness) * 0.01
                neg = s * box_blur(x0, k) + (1.0 - s) * x0
                m = mark.view(-1, 1, 1, 1)
                x0 = m * x0 + (1.0 - m) * neg
            fixed = (sr * xt - x0) / srm1
            w = max(0.0, min(1.0, float(u.weight)))
            out = fixed * w + out * (1.0 - w)
        return out.to(eps.dtype)

    def _hr_disabled(self, u: HookUnit) -> bool:
        if u.hr_option == HiResFixOption.LOW_RES_ONLY:
            return self.is_hr_pass
        if u.hr_option == HiResFixOption.HIGH_RES_ONLY:
            return not self.is_hr_pass
        return False

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
        for u in self.units:
            if u.colorfix_variation is None:
                continue
            why = None
            if self.encode_latent is None:
                why = "the host gave no VAE encoder"
            elif str(self.prediction).lower() not in ("eps", "epsilon"):
                why = f"it needs an eps-prediction model, this one predicts {self.prediction!r}"
            if why:
                self.warn(f"ControlNet unit '{u.name or u.model.name}': tile colour fix off ({why}); the unit runs "
                          "as a plain tile ControlNet")
                u.colorfix_variation = None
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
            u._latent_cache.clear()

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
                out = original(x, timesteps, context, y, **kwargs)
                return hook.apply_colorfix(out, x, timesteps, context) if hook.has_colorfix else out
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
            out = unet.out(h)
            return hook.apply_colorfix(out, x, timesteps, context) if hook.has_colorfix else out

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
                return fix(original(sample, timestep, encoder_hidden_states, *args, **kwargs), sample, timestep,
                       encoder_hidden_states)
            downs, mid = control[:-1], control[-1]
            prev_d = kwargs.get("down_block_additional_residuals")
            prev_m = kwargs.get("mid_block_additional_residual")
            if prev_d is not None:
                downs = [a + b for a, b in zip(prev_d, downs)]
            if prev_m is not None:
                mid = prev_m + mid
            kwargs["down_block_additional_residuals"] = tuple(downs)
            kwargs["mid_block_additional_residual"] = mid
            return fix(original(sample, timestep, encoder_hidden_states, *args, **kwargs), sample, timestep,
                       encoder_hidden_states)

        def fix(result: Any, sample: torch.Tensor, timestep: Any, context: Any) -> Any:
            if not hook.has_colorfix:
                return result
            if isinstance(result, tuple):
                return (hook.apply_colorfix(result[0], sample, timestep, context),) + tuple(result[1:])
            result.sample = hook.apply_colorfix(result.sample, sample, timestep, context)
            return result

        return forward


__all__ = ["UnetHook", "HookUnit", "control_scales", "SOFT_INJECTION_BASE", "box_blur", "sd_alphas_cumprod"]
