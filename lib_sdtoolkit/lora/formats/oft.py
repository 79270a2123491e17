"""OFT / BOFT: the weight's output rows rotated block by block, W' = R·W; ΔW = W' − W depends on W.

Part names and formulas, as the WebUI's built-in Lora extension (A1111 1.10 ``network_oft.py``) reads them:

* kohya OFT: ``oft_blocks`` (k, n, n) and ``alpha``. Q_b = B_b − B_bᵀ (skew-symmetric); the whole Q is scaled
  down so that ‖Q‖_F <= alpha · out_dim (factor (min(‖Q‖, c) + 1e-8)/(‖Q‖ + 1e-8)); R_b = (I + Q_b)(I − Q_b)⁻¹
  (Cayley). The k blocks cover the output rows in order (n = out_dim / k).
* LyCORIS OFT: ``oft_diag`` (k, n, n) holds the blocks R_b themselves (alpha unused).

Both apply W'[b·n + m, ...] = Σ_j R_b[j, m] · W[b·n + j, ...], i.e. each row block becomes R_bᵀ · W_b.

* BOFT (LyCORIS butterfly OFT, which the built-in extension does not read; ComfyUI and LyCORIS do):
  ``oft_blocks`` (m, k, b, b), optional ``rescale`` (out, 1[, 1, 1]) and ``alpha``. R = Cayley of Q = B − Bᵀ, the
  whole Q scaled to ‖Q‖_F <= alpha when alpha > 0. For each stage i = 0..m−1, the rows are permuted by the
  butterfly of stride 2^i·b/2 (rows grouped as (−1, 2, 2^i·b/2), the two middle axes swapped), each group of b
  consecutive rows becomes R_{i,g} · rows, and the permutation is undone; finally the rows are multiplied by
  ``rescale``.

The multiplier scales ΔW like every type (the WebUI's ``finalize_updown``); alpha is a constraint, not a scale.
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

KIND = "oft"


def accepts(parts: Set[str]) -> bool:
    own = set(parts) - {"rescale"}
    return own in ({"oft_blocks"}, {"oft_diag"})


def rank(t: Dict[str, torch.Tensor]) -> Optional[int]:
    return None


def scaled(t: Dict[str, torch.Tensor]) -> bool:
    return False


def _cayley(blocks: torch.Tensor, limit: Optional[torch.Tensor], strict: bool) -> torch.Tensor:
    """(I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ scaled to ‖Q‖ <= limit. ``strict`` (kohya OFT): the A1111 factor
    (min(‖Q‖, c) + 1e-8)/(‖Q‖ + 1e-8), applied always; else (BOFT) Q·limit/(‖Q‖+1e-8) only when above it."""
    q = blocks - blocks.transpose(-1, -2)
    if limit is not None:
        norm = torch.linalg.vector_norm(q)
        if strict:
            q = q * ((torch.minimum(norm, limit) + 1e-8) / (norm + 1e-8))
        else:  # alpha <= 0: no constraint
            qn = norm + 1e-8
            q = torch.where((limit > 0) & (qn > limit), q * (limit / qn), q)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _boft(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    stages, _, b, _ = r.shape
    half = b // 2
    x = w
    for i in range(stages):
        stride = (2 ** i) * half
        rest = x.shape[1:]
        x = x.reshape(-1, 2, stride, *rest).transpose(1, 2).reshape(-1, b, *rest)
        x = torch.einsum("gij,gj...->gi...", r[i], x)
        x = x.reshape(-1, stride, 2, *rest).transpose(1, 2).reshape(w.shape)
    return x


def delta(t: Dict[str, torch.Tensor], weight: torch.Tensor, dyn: Optional[int] = None):
    out_dim = weight.shape[0]
    if "oft_diag" in t:
        r = t["oft_diag"]
    else:
        blocks = t["oft_blocks"]
        alpha = t.get("alpha")
        if blocks.dim() == 4:  # BOFT
            limit = alpha.reshape(()) if alpha is not None else None
            r = _cayley(blocks, limit, strict=False)
            stages, groups, b, _ = r.shape
            if groups * b != out_dim:
                raise ValueError(f"BOFT has {groups} blocks of {b} rows, the weight {out_dim} rows")
            new = _boft(weight, r)
            if "rescale" in t:
                new = new * t["rescale"].reshape(out_dim, *[1] * (weight.dim() - 1))
            return new - weight, None
        if alpha is None:
            raise ValueError("kohya OFT needs alpha (its constraint)")
        r = _cayley(blocks, alpha.reshape(()) * out_dim, strict=True)
    k, n, _ = r.shape
    if k * n != out_dim:
        raise ValueError(f"OFT has {k} blocks of {n} rows, the weight {out_dim} rows")
    wb = weight.reshape(k, n, *weight.shape[1:])
    new = torch.einsum("bjm,bj...->bm...", r, wb).reshape(weight.shape)
    if "rescale" in t:
        new = new * t["rescale"].reshape(out_dim, *[1] * (weight.dim() - 1))
    return new - weight, None
