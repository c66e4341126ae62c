"""Task arithmetic (Ilharco et al., 2023): ``merged = Σ_t λ_t τ_t``.

Negation is ``λ < 0``; an analogy ``τ_C + (τ_B − τ_A)`` is the sum with
λ = (1, 1, −1). Options: none.
"""

from __future__ import annotations

from collections.abc import Sequence

from taskvec.errors import TaskvecError
from taskvec.methods.base import Method, torch


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
        out.add_(t.to(torch.float32) * float(lam))  # the product rounded, then the sum (as the engine and its kernel)
    return out


def analogy(tau_c: torch.Tensor, tau_b: torch.Tensor, tau_a: torch.Tensor) -> torch.Tensor:
    """``τ_C + (τ_B − τ_A)``: "A is to B as C is to D"."""
    return tau_c.to(torch.float32) + (tau_b.to(torch.float32) - tau_a.to(torch.float32))


def merge(taus: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    return weighted_sum(taus, lambdas)


METHOD = Method(name="sum", options=(), merge=merge, help="task arithmetic: Σ λ_t τ_t")
