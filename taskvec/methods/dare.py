"""DARE (Yu et al., 2023, arXiv:2311.03099): ``dare`` and ``dare_ties``.

Drop each entry independently with probability ``p`` and rescale the
survivors by ``1 / (1 − p)`` (:func:`dare`), then merge by task arithmetic
(``dare``) or by TIES' sign election and disjoint mean in place of the trim
step (``dare_ties``).

Options ``drop``: p in [0, 1) (mergekit's convention), default 0.0;
``seed``: integer, default 0. A tensor's drop mask comes from a generator
seeded by ``(seed, vector position, tensor name)`` (:func:`tensor_seed`), so
the result does not depend on streaming order or sharding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from taskvec.methods.base import Method, option, torch
from taskvec.methods.sum import scale, weighted_sum
from taskvec.methods.ties import disjoint_mean, elect_sign

DROP = option("drop", float, 0.0, within="[0, 1)", help="DARE: drop probability p in [0, 1).", message="DARE drop probability p must be in [0, 1), got {value!r}")
SEED = option("seed", int, 0, help="DARE random seed.", message="DARE seed must be an integer, got {value!r}")


def check_drop(p: float) -> float:
    return float(DROP.check(p))


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


def dare_sum(taus: Sequence[torch.Tensor], lambdas: Sequence[float], p: float, seeds: Sequence[int]) -> torch.Tensor:
    """DARE then task arithmetic: ``Σ_t λ_t DARE(τ_t)``."""
    return weighted_sum([dare(t, p, s) for t, s in zip(taus, seeds)], lambdas)


def dare_ties(taus: Sequence[torch.Tensor], lambdas: Sequence[float], p: float, seeds: Sequence[int]) -> torch.Tensor:
    """DARE in place of TIES' trim, then sign election and disjoint mean of ``λ_t DARE(τ_t)``."""
    dropped = [scale(dare(t, p, s), lam) for t, lam, s in zip(taus, lambdas, seeds)]
    return disjoint_mean(dropped, elect_sign(dropped))


def merge_dare(taus: Sequence[torch.Tensor], lambdas: Sequence[float], *, drop: float, seeds: Sequence[int]) -> torch.Tensor:
    return dare_sum(taus, lambdas, drop, seeds)


def merge_dare_ties(taus: Sequence[torch.Tensor], lambdas: Sequence[float], *, drop: float, seeds: Sequence[int]) -> torch.Tensor:
    return dare_ties(taus, lambdas, drop, seeds)


METHOD = Method("dare", (DROP, SEED), merge_dare, "DARE: drop with probability p, rescale by 1/(1-p), then the sum")
TIES_METHOD = Method("dare_ties", (DROP, SEED), merge_dare_ties, "DARE's drop in place of TIES' trim, then sign election and disjoint mean")
