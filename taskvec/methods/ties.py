"""TIES-Merging (Yadav et al., 2023, arXiv:2306.01708).

1. *Trim*: keep the top-k fraction of each task vector's entries by
   magnitude, zero the rest (:func:`topk_mask`).
2. *Elect sign*: ``γ = sgn(Σ_t τ̂_t)`` — the sign with the larger total
   mass (sum of trimmed values) wins (:func:`elect_sign`).
3. *Disjoint mean*: average, per entry, only the trimmed values whose sign
   agrees with ``γ`` (zeros do not count) (:func:`disjoint_mean`).

Option ``density``: the kept fraction k in (0, 1] (mergekit's ``density``;
k% / 100), default 1.0 (no trimming). Trimming is per tensor; ``k =
max(1, floor(density × numel))`` (mergekit's and the TIES code's count), ties at the threshold broken by lower flat index.
Per-vector weights λ_t are applied before trimming and sign election.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from taskvec.methods.base import Method, option, torch
from taskvec.methods.sum import scale

DENSITY = option(
    "density", float, 1.0, within="(0, 1]", help="TIES/magnitude: kept fraction in (0, 1] (mergekit's density).", message="density must be the kept fraction in (0, 1] (k% / 100), got {value!r}"
)


def check_density(density: float) -> float:
    return float(DENSITY.check(density))


def topk_count(numel: int, density: float) -> int:
    return min(numel, max(1, math.floor(check_density(density) * numel)))  # mergekit's / TIES' count


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``max(1, floor(density × numel))`` entries of largest magnitude.

    Entries tied at the threshold magnitude are kept in order of flat index.
    """
    n = tau.numel()
    k = topk_count(n, density)
    if k >= n:
        return torch.ones(tau.shape, dtype=torch.bool)
    mag = tau.detach().abs().reshape(-1).to(torch.float32)
    # kthvalue gives the k-th smallest; the threshold is the (n-k+1)-th smallest.
    threshold = torch.kthvalue(mag, n - k + 1).values
    mask = mag > threshold
    need = k - int(mask.sum())
    if need > 0:
        tied = torch.nonzero(mag == threshold).reshape(-1)[:need]
        mask[tied] = True
    return mask.reshape(tau.shape)


def magnitude_prune(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-k fraction of entries by magnitude, zero the rest (no rescale)."""
    tau = tau.to(torch.float32)
    return torch.where(topk_mask(tau, density), tau, torch.zeros((), dtype=torch.float32))


def elect_sign(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """``γ = sgn(Σ_t τ_t)`` — the sign carrying the larger total mass (−1, 0 or +1)."""
    total = torch.zeros(taus[0].shape, dtype=torch.float32)
    for t in taus:
        total.add_(t.to(torch.float32))
    return torch.sign(total)


def disjoint_mean(taus: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Mean, per entry, of the non-zero values whose sign agrees with ``sign``."""
    total = torch.zeros(sign.shape, dtype=torch.float32)
    count = torch.zeros(sign.shape, dtype=torch.float32)
    for t in taus:
        t = t.to(torch.float32)
        agree = (torch.sign(t) == sign) & (t != 0)
        total.add_(torch.where(agree, t, torch.zeros((), dtype=torch.float32)))
        count.add_(agree.to(torch.float32))
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros((), dtype=torch.float32))


def ties(taus: Sequence[torch.Tensor], lambdas: Sequence[float], density: float) -> torch.Tensor:
    """TIES-Merging of ``λ_t τ_t``: trim to top-k, elect sign by mass, disjoint mean."""
    trimmed = [magnitude_prune(scale(t, lam), density) for t, lam in zip(taus, lambdas)]
    return disjoint_mean(trimmed, elect_sign(trimmed))


def merge(taus: Sequence[torch.Tensor], lambdas: Sequence[float], *, density: float) -> torch.Tensor:
    return ties(taus, lambdas, density)


METHOD = Method("ties", (DENSITY,), merge, "TIES: trim to the top-k fraction, elect sign by mass, disjoint mean")
