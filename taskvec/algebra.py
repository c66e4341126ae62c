"""Task-vector algebra as plain functions over tensors.

Nothing here reads or writes files: every function takes and returns
``torch.Tensor`` values for ONE parameter tensor (the engine streams a model
through them tensor by tensor). All arithmetic is done in float32.

Definitions
-----------
Task arithmetic (Ilharco et al., 2023)
    ``merged = Σ_t λ_t τ_t``; negation is ``λ < 0``; an analogy
    ``τ_C + (τ_B − τ_A)`` is the sum with λ = (1, 1, −1).

TIES-Merging (Yadav et al., 2023, arXiv:2306.01708)
    1. *Trim*: keep the top-k fraction of each task vector's entries by
       magnitude, zero the rest (:func:`topk_mask`).
    2. *Elect sign*: ``γ = sgn(Σ_t τ̂_t)`` — the sign with the larger total
       mass (sum of trimmed values) wins (:func:`elect_sign`).
    3. *Disjoint mean*: average, per entry, only the trimmed values whose sign
       agrees with ``γ`` (zeros do not count) (:func:`disjoint_mean`).

DARE (Yu et al., 2023, arXiv:2311.03099)
    Drop each entry independently with probability ``p`` and rescale the
    survivors by ``1 / (1 − p)`` (:func:`dare`), then merge by task arithmetic
    (``dare``) or by TIES' sign election and disjoint mean in place of the
    trim step (``dare_ties``).

Choices the papers leave open (documented here and in the README)
    * Trimming is per tensor, not over the whole flattened model: the engine
      streams tensor by tensor and never holds a whole model (mergekit makes
      the same choice). ``k = max(1, floor(density × numel))`` — the count
      mergekit (``int(density * numel)``, at least one) and the official TIES
      code keep, so ``--density`` means the same thing everywhere; ties at the
      threshold are broken by lower flat index, so the result is exactly k entries.
    * Per-vector weights λ_t are applied *before* trimming and sign election
      (``τ'_t = λ_t τ_t``): a negative λ flips the vector's vote. With equal
      λ for every vector this is exactly the paper's ``θ + λ·TIES(τ)``.
    * The sign election weighs each entry by its trimmed value (its mass),
      as in the paper's ``sgn(Σ τ̂)``; an entry whose mass sums to exactly 0
      elects sign 0 and gets 0.
    * DARE's drop mask for a tensor comes from a generator seeded by
      ``(seed, vector position, tensor name)`` (:func:`tensor_seed`), so the
      result does not depend on streaming order or sharding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from taskvec.errors import TaskvecError

METHODS = ("sum", "ties", "dare", "dare_ties", "magnitude")


# ---------------------------------------------------------------------------
# Parameter validation (shared by the engine and the CLI)


_F32_MAX = float(torch.finfo(torch.float32).max)


def check_lambda(lam: float) -> float:
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam):
        raise TaskvecError(f"lambda must be a finite number, got {lam!r}")
    if abs(lam) > _F32_MAX:
        raise TaskvecError(f"lambda {lam!r} is beyond the float32 range")
    return float(lam)


def check_density(density: float) -> float:
    if not isinstance(density, (int, float)) or not (0.0 < density <= 1.0):
        raise TaskvecError(f"density must be the kept fraction in (0, 1] (k% / 100), got {density!r}")
    return float(density)


def check_drop(p: float) -> float:
    if not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise TaskvecError(f"DARE drop probability p must be in [0, 1), got {p!r}")
    return float(p)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise TaskvecError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    return method


# ---------------------------------------------------------------------------
# Elementary operations


def scale(tau: torch.Tensor, lam: float) -> torch.Tensor:
    return tau.to(torch.float32) * float(lam)


def negate(tau: torch.Tensor) -> torch.Tensor:
    return -tau.to(torch.float32)


def add(*taus: torch.Tensor) -> torch.Tensor:
    if not taus:
        raise TaskvecError("nothing to add")
    out = taus[0].to(torch.float32).clone()
    for t in taus[1:]:
        out.add_(t.to(torch.float32))
    return out


def weighted_sum(taus: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """``Σ λ_t τ_t`` (task arithmetic)."""
    if len(taus) != len(lambdas) or not taus:
        raise TaskvecError("need one lambda per vector and at least one vector")
    out = torch.zeros(taus[0].shape, dtype=torch.float32)
    for t, lam in zip(taus, lambdas):
        out.add_(t.to(torch.float32), alpha=float(lam))
    return out


def analogy(tau_c: torch.Tensor, tau_b: torch.Tensor, tau_a: torch.Tensor) -> torch.Tensor:
    """``τ_C + (τ_B − τ_A)``: "A is to B as C is to D"."""
    return tau_c.to(torch.float32) + (tau_b.to(torch.float32) - tau_a.to(torch.float32))


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


def tensor_seed(seed: int, position: int, name: str) -> int:
    """A 63-bit seed for one tensor of one vector, independent of processing order."""
    digest = hashlib.sha256(f"{int(seed)}\0{int(position)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_keep_mask(shape: Sequence[int], p: float, seed: int) -> torch.Tensor:
    """Bernoulli keep-mask: each entry kept with probability ``1 − p``."""
    check_drop(p)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=gen) >= p


def dare(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Drop entries with probability ``p``; rescale survivors by ``1/(1 − p)``."""
    tau = tau.to(torch.float32)
    if p == 0:
        return tau.clone()
    keep = dare_keep_mask(tau.shape, p, seed)
    return torch.where(keep, tau / (1.0 - p), torch.zeros((), dtype=torch.float32))


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


def dare_sum(taus: Sequence[torch.Tensor], lambdas: Sequence[float], p: float, seeds: Sequence[int]) -> torch.Tensor:
    """DARE then task arithmetic: ``Σ_t λ_t DARE(τ_t)``."""
    return weighted_sum([dare(t, p, s) for t, s in zip(taus, seeds)], lambdas)


def dare_ties(taus: Sequence[torch.Tensor], lambdas: Sequence[float], p: float, seeds: Sequence[int]) -> torch.Tensor:
    """DARE in place of TIES' trim, then sign election and disjoint mean of ``λ_t DARE(τ_t)``."""
    dropped = [scale(dare(t, p, s), lam) for t, lam, s in zip(taus, lambdas, seeds)]
    return disjoint_mean(dropped, elect_sign(dropped))


def merge(
    method: str,
    taus: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    *,
    density: float = 1.0,
    drop: float = 0.0,
    seeds: Sequence[int] = (),
) -> torch.Tensor:
    """One merged tensor by ``method``: sum | ties | dare | dare_ties | magnitude.

    ``magnitude`` is magnitude pruning of each ``λ_t τ_t`` followed by the sum.
    ``seeds`` (one per vector, for this tensor) are needed by the DARE methods.
    """
    check_method(method)
    if method == "sum":
        return weighted_sum(taus, lambdas)
    if method == "ties":
        return ties(taus, lambdas, density)
    if method == "magnitude":
        return weighted_sum([magnitude_prune(t, density) for t in taus], lambdas)
    if len(seeds) != len(taus):
        raise ValueError("DARE needs one seed per vector")
    if method == "dare":
        return dare_sum(taus, lambdas, drop, seeds)
    return dare_ties(taus, lambdas, drop, seeds)
