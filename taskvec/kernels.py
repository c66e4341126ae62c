"""The fused task-arithmetic kernel (``taskvec/_kernels.c``), when it was built.

The engine's sum (``merge`` and ``apply`` without TIES/DARE) reads each block's
inputs in their stored dtypes and hands them to :func:`combine`, which widens,
subtracts, scales, accumulates, checks and rounds in one pass, with the same
float32 operations in the same order as the torch path it replaces (bit-identical
results; ``tests/test_kernels.py``). ``pip install`` compiles it where a C compiler
is present; without it, or with ``TASKVEC_KERNELS=0``, the torch path runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:
    from taskvec import _kernels
except ImportError:  # not built (no C compiler at install time): the torch path runs
    _kernels = None

#: ``out = (x_0 − b)·λ_0 + (x_1 − b)·λ_1 + … + b`` (merge fine-tuned models)
MERGE = 0
#: ``out = b + x_0·λ_0 + x_1·λ_1 + …`` (apply task vectors)
APPLY = 1

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def built() -> bool:
    return _kernels is not None


def enabled() -> bool:
    """Built, and not switched off with ``TASKVEC_KERNELS=0``."""
    return _kernels is not None and os.environ.get("TASKVEC_KERNELS", "1") != "0"


def supports(*dtypes: torch.dtype) -> bool:
    return enabled() and all(d in CODES for d in dtypes)


def combine(mode: int, out: torch.Tensor, base: torch.Tensor, xs: Sequence[torch.Tensor], lambdas: Sequence[float]) -> bool:
    """Write the sum into ``out`` (``base`` may be ``out`` itself); False when a result is NaN/Inf or beyond ``out``'s dtype.

    Every tensor is flat, contiguous, of the same length and of a dtype in
    :data:`CODES`. On False, ``out`` holds garbage: the caller recomputes on
    the torch path to say which input or value is at fault.
    """
    n = out.numel()
    tensors = (out, base, *xs)
    if len(xs) != len(lambdas) or not xs or any(t.numel() != n or not t.is_contiguous() or t.dtype not in CODES or t.device.type != "cpu" for t in tensors):
        raise ValueError("combine: every tensor must be a contiguous CPU float32/bfloat16/float16 tensor of the same length")
    if n == 0:
        return True
    return _kernels.combine(
        n, mode, out.data_ptr(), CODES[out.dtype], base.data_ptr(), CODES[base.dtype],
        tuple(x.data_ptr() for x in xs), tuple(CODES[x.dtype] for x in xs), tuple(float(lam) for lam in lambdas),
    )
