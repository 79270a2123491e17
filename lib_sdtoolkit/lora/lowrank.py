"""Truncated SVD of one layer's ΔW and the rule that picks its rank: shared by extract, resize and merge.

``truncated(mat, max_rank, rule)`` returns the factors of the best approximation of ``mat`` (2-D, fp32) whose rank
the rule picks, with the energy it keeps. The SVD is exact (``torch.linalg.svd``) for small matrices and
randomised (:func:`randomized_svd`: the Halko-Martinsson-Tropp range finder of ``torch.svd_lowrank``, with
oversampling, power iterations and a seeded test matrix) for large ones, where ``q = rank + oversampling`` is much
smaller than the matrix. Randomised SVD is exact for a matrix whose rank is at most ``q`` (the range finder
captures the whole range); for a full-rank difference its error is within a fraction of a percent of the optimal
one with 4 power iterations (``bench/lora_svd_bench.py`` measures it against the full SVD on SD1.5 shapes).

Rank rules (``rank`` is always the upper bound):

* ``fixed``: ``rank``;
* ``energy``: the smallest k whose kept energy Σ_{i<=k} s_i² / ‖ΔW‖²_F is at least ``param`` (0.95 keeps 95 %);
* kohya's dynamic rules (sd-scripts ``resize_lora.py``): ``sv_ratio`` keeps the singular values above s_max / param;
  ``sv_fro`` the smallest k with sqrt(Σ_{i<=k} s_i² / Σ s_i²) >= param; ``sv_cumulative`` the smallest k with
  Σ_{i<=k} s_i / Σ s_i >= param.

A zero matrix gets rank 1 (kohya does the same) with zero factors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

RULES = ("fixed", "energy", "sv_ratio", "sv_fro", "sv_cumulative")
SVD_MODES = ("auto", "full", "randomized")
#: oversampling of the randomised range finder (extra columns beyond the rank) and power iterations
OVERSAMPLE = 10
NITER = 4
#: the randomised SVD is used when the smaller side is at least this many times rank + oversampling
RANDOMIZED_FACTOR = 4


@dataclass
class Truncation:
    """``up @ down`` approximates the matrix: up (out, k) = U_k·S_k, down (k, in) = V_kᵀ; ``energy`` is the kept
    fraction of ‖ΔW‖²_F (1.0 for a zero matrix) and ``method`` which SVD ran."""

    up: torch.Tensor
    down: torch.Tensor
    s: torch.Tensor
    energy: float
    method: str

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])


def pick_rank(s: torch.Tensor, total_sq: float, max_rank: int, rule: str = "fixed",
              param: Optional[float] = None) -> int:
    """The rank ``rule`` keeps for singular values ``s`` (descending) of a matrix with ‖·‖²_F = ``total_sq``."""
    n = int(s.numel())
    cap = max(1, min(max_rank, n))
    if n == 0 or float(s[0]) <= 0.0 or total_sq <= 0.0:
        return 1
    s64 = s.double()
    if rule == "fixed":
        return cap
    if param is None:
        raise ValueError(f"rank rule {rule} needs a parameter")
    if rule == "energy":
        cum = torch.cumsum(s64 ** 2, 0) / total_sq
        k = int(torch.searchsorted(cum, torch.tensor(float(param), dtype=torch.float64))) + 1
    elif rule == "sv_ratio":
        k = int((s64 > s64[0] / float(param)).sum())
    elif rule == "sv_fro":
        cum = torch.cumsum(s64 ** 2, 0) / total_sq
        k = int(torch.searchsorted(cum, torch.tensor(float(param) ** 2, dtype=torch.float64))) + 1
    elif rule == "sv_cumulative":
        cum = torch.cumsum(s64, 0) / float(s64.sum())
        k = int(torch.searchsorted(cum, torch.tensor(float(param), dtype=torch.float64))) + 1
    else:
        raise ValueError(f"unknown rank rule {rule!r} (known: {', '.join(RULES)})")
    return max(1, min(k, cap))


def use_randomized(shape: Tuple[int, int], q: int, svd: str = "auto") -> bool:
    if svd == "full":
        return False
    small = min(shape)
    if svd == "randomized":
        return q < small
    return small >= RANDOMIZED_FACTOR * q


def svd(mat: torch.Tensor, max_rank: int, rule: str = "fixed", mode: str = "auto"
        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U, S, Vh, method) of ``mat`` (fp32, 2-D): all singular triplets (full) or the top ``q`` (randomised).
    Rules other than ``fixed`` need the spectrum beyond ``max_rank``: randomised only when the cap is well below
    the matrix size (its q = cap + oversampling singular values decide the rank within the cap; ``energy`` and
    ``sv_fro`` divide by the exact ‖mat‖²_F); ``sv_cumulative`` divides by Σ s_i over the whole spectrum, so it
    always takes the full SVD."""
    q = min(min(mat.shape), max_rank + max(OVERSAMPLE, max_rank // 2))
    if rule != "sv_cumulative" and use_randomized(tuple(mat.shape), q, mode):
        u, s, vh = randomized_svd(mat, q)
        return u, s, vh, "randomized"
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return u, s, vh, "full"


def randomized_svd(mat: torch.Tensor, q: int, niter: int = NITER, seed: int = 0
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``q`` singular triplets of ``mat`` by a randomised range finder (Halko, Martinsson & Tropp 2011,
    algorithms 4.4 + 5.1, as ``torch.svd_lowrank``) with ``niter`` QR-orthonormalised power iterations. The test
    matrix comes from a generator seeded with ``seed``, so the same input gives the same factors (the three faces
    write byte-identical files)."""
    m, n = mat.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=mat.dtype).to(mat.device)
    basis = torch.linalg.qr(mat @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(mat.T @ basis).Q
        basis = torch.linalg.qr(mat @ basis).Q
    ub, s, vh = torch.linalg.svd(basis.T @ mat, full_matrices=False)
    return basis @ ub, s, vh


def _sq_norm(x: torch.Tensor) -> float:
    """‖x‖²_F accumulated in float64 without a float64 copy of ``x`` (half the time of ``x.double().pow(2).sum()``
    on a 10240×1280 layer, same value to 1e-12)."""
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64)) ** 2


def truncated(mat: torch.Tensor, max_rank: int, rule: str = "fixed", param: Optional[float] = None,
              mode: str = "auto") -> Truncation:
    """The best approximation of ``mat`` at the rank ``rule`` picks (at most ``max_rank``)."""
    mat = mat.float()
    total_sq = _sq_norm(mat)
    if total_sq == 0.0:
        z = mat.new_zeros
        return Truncation(z(mat.shape[0], 1), z(1, mat.shape[1]), mat.new_zeros(1), 1.0, "zero")
    u, s, vh, method = svd(mat, max_rank, rule, mode)
    k = pick_rank(s, total_sq, max_rank, rule, param)
    up = u[:, :k] * s[:k]
    down = vh[:k]
    return Truncation(up.contiguous(), down.contiguous(), s[:k].clone(), kept_energy(mat, up, down, total_sq), method)


def factored(up: torch.Tensor, down: torch.Tensor, max_rank: int, rule: str = "fixed",
             param: Optional[float] = None) -> Truncation:
    """The exact truncated SVD of ``up @ down`` (up (out, r), down (r, in), r small) without forming the product's
    SVD: QR of both factors, then the SVD of the r×r core. This is how resize and merge re-factor LoRAs."""
    # in float64: the QRs are of thin (n, r) matrices, so this costs little and the result is exact to fp32
    up, down = up.double(), down.double()
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    total_sq = float(s.double().pow(2).sum())
    if total_sq == 0.0:
        dev = up.device
        return Truncation(torch.zeros(up.shape[0], 1, device=dev), torch.zeros(1, down.shape[1], device=dev),
                          torch.zeros(1, device=dev), 1.0, "zero")
    k = pick_rank(s, total_sq, max_rank, rule, param)
    new_up = (q1 @ u[:, :k]) * s[:k]
    new_down = vh[:k] @ q2.T
    energy = float(s[:k].double().pow(2).sum()) / total_sq
    return Truncation(new_up.float().contiguous(), new_down.float().contiguous(), s[:k].float(), min(1.0, energy),
                      "factored")


def kept_energy(mat: torch.Tensor, up: torch.Tensor, down: torch.Tensor, total_sq: Optional[float] = None) -> float:
    """1 - ‖mat - up@down‖²_F / ‖mat‖²_F, computed from the residual itself (no cancellation)."""
    mat = mat.float()
    if total_sq is None:
        total_sq = _sq_norm(mat)
    if total_sq == 0.0:
        return 1.0
    res = _sq_norm(torch.addmm(mat, up.float(), down.float(), alpha=-1.0))  # mat - up @ down, one temporary
    return max(0.0, 1.0 - res / total_sq)


__all__ = ["RULES", "SVD_MODES", "Truncation", "pick_rank", "truncated", "factored", "kept_energy", "svd"]
