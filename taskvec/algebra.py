"""Task-vector algebra as plain functions over tensors (re-exported from :mod:`taskvec.methods`).

The math lives next to each merge method's option declarations in
:mod:`taskvec.methods` (``sum``, ``ties``, ``dare``, ``magnitude``); this module
keeps the historical flat names importable.

Nothing here reads or writes files: every function takes and returns
``torch.Tensor`` values for ONE parameter tensor (the engine streams a model
through them tensor by tensor). All arithmetic is done in float32.

Definitions: each method module's docstring (task arithmetic in
:mod:`taskvec.methods.sum`, TIES-Merging in :mod:`taskvec.methods.ties`, DARE
in :mod:`taskvec.methods.dare`, magnitude pruning in
:mod:`taskvec.methods.magnitude`).

Choices the papers leave open (documented here and in the README)
    * Trimming is per tensor, not over the whole flattened model: the engine
      streams tensor by tensor and never holds a whole model (mergekit makes
      the same choice). ``k = max(1, floor(density × numel))``; ties at the threshold
      are broken by lower flat index, so the result is exactly k entries.
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

from taskvec.methods import METHOD_NAMES, check_lambda, check_method, merge
from taskvec.methods.base import F32_MAX as _F32_MAX
from taskvec.methods.dare import check_drop, dare, dare_keep_mask, dare_sum, dare_ties, tensor_seed
from taskvec.methods.sum import add, analogy, negate, scale, weighted_sum
from taskvec.methods.ties import check_density, disjoint_mean, elect_sign, magnitude_prune, ties, topk_count, topk_mask

METHODS = METHOD_NAMES

__all__ = [
    "METHODS", "add", "analogy", "check_density", "check_drop", "check_lambda", "check_method", "dare",
    "dare_keep_mask", "dare_sum", "dare_ties", "disjoint_mean", "elect_sign", "magnitude_prune", "merge",
    "negate", "scale", "tensor_seed", "ties", "topk_count", "topk_mask", "weighted_sum",
]
