"""``MergeRecipe``: what to merge and how (pure data, JSON-able; every face builds one)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import InvalidInputError
from . import methods as _methods
from . import presets as _presets

#: output dtypes by name (the job's choices are the same names: ``jobs.merge.MERGE_DTYPES``). The fp8 ones are how
#: Flux is shared; the float32 result is cast once by torch's own cast (e4m3fn saturates at +-448 in torch >= 2.x's
#: CPU cast, e5m2 overflows to inf; a weighted sum of fp8 inputs stays in range)
DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                  "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
BlockSpec = Union[str, Sequence[float], None]


@dataclass
class MergeRecipe:
    """A merge, as data.

    ``alpha`` (M) is the share of B. ``beta`` is the method's second parameter (:mod:`lib_sdtoolkit.merge.methods`
    declares its meaning, default and range): sum_twice / triple_sum: the share of C; ties: the density (fraction
    of each task vector kept, default 0.2); dare: the drop rate p (default 0.9).
    ``blocks`` / ``blocks_beta``: per-block ratios (SD1/SD2: 25 values IN00..IN11, M00, OUT00..OUT11 or 26 with
    BASE first; SDXL: 19 or 20; Flux.1: 57 values D00..D18, S00..S37 or 58 with BASE first) as a list or a
    comma-separated string; ``preset``: a named preset instead (stretched over Flux's blocks, see
    :func:`lib_sdtoolkit.arch.blocks.from_sd1_unet`).
    The BASE ratio (keys outside the UNet) is ``base_alpha`` if given, else BASE of the list / preset, else ``alpha``.
    """

    model_a: str
    model_b: Optional[str] = None
    model_c: Optional[str] = None
    method: str = "weighted_sum"
    alpha: float = 0.5
    beta: Optional[float] = None
    blocks: BlockSpec = None
    blocks_beta: BlockSpec = None
    base_alpha: Optional[float] = None
    preset: Optional[str] = None
    dtype: str = "fp16"
    keep_ema: bool = False
    fix_position_ids: bool = False
    bake_vae: Optional[str] = None
    discard: Optional[str] = None
    seed: int = 0
    allow_extrapolation: bool = False
    device: str = "cpu"
    save_metadata: bool = True

    # ---------------------------------------------------------------------------------------------------------
    @property
    def models(self) -> List[str]:
        return [m for m in (self.model_a, self.model_b, self.model_c) if m]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def effective_beta(self) -> float:
        if self.beta is not None:
            return float(self.beta)
        spec = _methods.REGISTRY.get(self.method)
        d = spec.beta.default if spec is not None and spec.beta is not None else None
        return 0.0 if d is None else d

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("blocks", "blocks_beta"):
            if d[k] is not None and not isinstance(d[k], str):
                d[k] = [float(v) for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergeRecipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInputError(f"unknown recipe field(s): {', '.join(unknown)}")
        if not data.get("model_a"):
            raise InvalidInputError("the recipe needs model_a")
        return cls(**dict(data))

    def with_models(self, a: str, b: Optional[str], c: Optional[str], vae: Optional[str] = None) -> "MergeRecipe":
        return dataclasses.replace(self, model_a=a, model_b=b, model_c=c,
                                   bake_vae=vae if vae is not None else self.bake_vae)

    # ---------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check everything that can be checked without opening the models (raises ``InvalidInputError``).

        Model counts, the required ``beta`` and every range come from the method's declaration
        (:mod:`lib_sdtoolkit.merge.methods`)."""
        spec = _methods.get(self.method)
        lo, hi = spec.models
        n = len(self.models)
        if self.model_b is None or (self.model_c is not None and self.model_b is None):
            raise InvalidInputError(f"{self.method} needs models A and B")
        if not lo <= n <= hi:
            need = f"{lo}" if lo == hi else f"{lo} or {hi}"
            raise InvalidInputError(f"{self.method} takes {need} models (A, B{', C' if hi == 3 else ''}), got {n}")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unknown output dtype {self.dtype!r}; use {', '.join(DTYPES)}")
        if self.blocks is not None and self.preset:
            raise InvalidInputError("give either block ratios or a preset, not both")
        if (spec.beta is not None and spec.beta.default is None and self.beta is None
                and self.blocks_beta is None):
            raise InvalidInputError(f"{self.method} needs beta (the {spec.beta.meaning})")
        for name in ("alpha", "beta", "base_alpha"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(float(v))):
                raise InvalidInputError(f"{name} must be a finite number, got {v!r}")
        if self.preset:
            _presets.get_preset(self.preset)  # unknown preset -> error now
        if self.discard:
            try:
                re.compile(self.discard)
            except re.error as e:
                raise InvalidInputError(f"discard: not a valid regular expression ({e})") from None
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InvalidInputError(f"unknown device {self.device!r}; use cpu or cuda")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise InvalidInputError("--device cuda asked but CUDA is not available here")
        ex = self.allow_extrapolation
        if spec.beta is not None and (self.beta is not None or spec.beta.default is not None):
            spec.beta.check(self.effective_beta, self.method, ex)
        spec.alpha.check(self.alpha, self.method, ex)
        if self.base_alpha is not None:
            spec.alpha.check(self.base_alpha, self.method, ex, "base_alpha")

    # ---------------------------------------------------------------------------------------------------------
    def block_ratios(self, family: str) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(alpha per block, beta per block)`` for ``family``, keyed by its merge (MBW) block ids: BASE, IN00..,
        M00, OUT.. (:mod:`lib_sdtoolkit.arch.blocks`; SD1/SD2/SDXL-refiner 26, SDXL 20)."""
        from ..arch.blocks import MBW, convention

        names = list(convention(MBW, family).blocks)
        alpha = self._ratios(family, names, self.blocks, self.preset, self.alpha, self.base_alpha)
        beta = self._ratios(family, names, self.blocks_beta, None, self.effective_beta, None)
        spec = _methods.get(self.method)
        ex = self.allow_extrapolation
        for v in alpha.values():
            spec.alpha.check(v, self.method, ex, "block ratio")
        if spec.beta is not None:
            for v in beta.values():
                spec.beta.check(v, self.method, ex, "beta block ratio")
        if spec.shares_of_a and not ex:
            over = [k for k in names if alpha[k] + beta[k] > 1.0 + 1e-9]
            if over:
                raise InvalidInputError(
                    f"{self.method}: alpha + beta > 1 in block {over[0]} (A would get a negative share); pass "
                    f"--allow-extrapolation to allow it")
        return alpha, beta

    @staticmethod
    def _ratios(family: str, names: List[str], blocks: BlockSpec, preset: Optional[str], scalar: float,
                base_override: Optional[float]) -> Dict[str, float]:
        base: Optional[float] = None
        unet: Optional[List[float]] = None
        if preset:
            base, unet = _presets.get_preset(preset, family)
        elif blocks is not None and not (isinstance(blocks, str) and not blocks.strip()):
            base, unet = _presets.parse_block_values(blocks, family)
        if base_override is not None:
            base = float(base_override)
        if base is None:
            base = float(scalar)
        out = {"BASE": float(base)}
        for name, v in zip(names[1:], unet if unet is not None else [float(scalar)] * (len(names) - 1)):
            out[name] = float(v)
        return out

    @property
    def block_weighted(self) -> bool:
        return bool(self.preset) or (self.blocks is not None and not (isinstance(self.blocks, str)
                                                                      and not self.blocks.strip()))


__all__ = ["MergeRecipe", "DTYPES"]
