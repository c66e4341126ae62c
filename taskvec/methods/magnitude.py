"""Magnitude pruning then task arithmetic: ``Σ_t λ_t prune_k(τ_t)``.

Each vector keeps its top-k fraction of entries by magnitude (TIES' trim step,
:func:`taskvec.methods.ties.magnitude_prune`, no rescale) before the sum.
Option ``density``: the kept fraction in (0, 1], as for TIES.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from taskvec.methods.base import Method
from taskvec.methods.sum import weighted_sum
from taskvec.methods.ties import DENSITY, magnitude_prune

if TYPE_CHECKING:
    import torch


def merge(taus: Sequence[torch.Tensor], lambdas: Sequence[float], *, density: float) -> torch.Tensor:
    return weighted_sum([magnitude_prune(t, density) for t in taus], lambdas)


METHOD = Method("magnitude", (DENSITY,), merge, "magnitude pruning of each vector to its top-k fraction, then the sum")
