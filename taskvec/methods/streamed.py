"""Every merge method over flat chunks of a tensor, with the whole-tensor method's bits.

The engine never holds a whole tensor of each vector: it asks for the merged
result chunk by chunk (:meth:`ChunkedMerge.chunk`, in flat order). The
element-wise steps (λ scaling, DARE's drop, sign election, disjoint mean, the
sum) are the very functions of :mod:`taskvec.methods.sum`, ``ties`` and
``dare`` applied to chunks, which gives the same bits as applying them to
the whole tensor. Two steps look at the whole tensor, and are made exact here:

* TIES' and magnitude's top-k trim needs each vector's k-th largest magnitude.
  :class:`TopK` finds it by radix selection over the float32 bit patterns
  (non-negative floats order like their bits): one pass histograms the high
  16 bits, a second the low 16 bits within the chosen bin — two streamed
  passes, 2 × 65,536 counters, instead of ``kthvalue`` on a copy of the whole
  tensor (plus its int64 indices). Entries tied at the threshold are kept in
  flat-index order, as in :func:`taskvec.methods.ties.topk_mask`.
* DARE's mask comes from one generator per vector and tensor; CPU
  ``torch.rand`` draws element by element, so drawing it chunk after chunk
  from the same generator gives the same mask (checked in tests/test_methods.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from taskvec.methods.base import torch
from taskvec.methods.dare import check_drop
from taskvec.methods.sum import scale, weighted_sum
from taskvec.methods.ties import disjoint_mean, elect_sign, topk_count

#: read(t, start, stop) -> float32 elements [start, stop) of vector t's τ (flat); not modified here
ChunkReader = Callable[[int, int, int], "torch.Tensor"]


class TopK:
    """The top-k mask of one tensor, given chunk by chunk (see the module docstring)."""

    def __init__(self, numel: int, density: float):
        self.k = topk_count(numel, density) if numel else 0
        self.keep_all = self.k >= numel
        self.threshold = None
        self.need = 0

    def fit(self, chunks: Callable[[], Iterable[torch.Tensor]]) -> None:
        """Find the k-th largest magnitude; ``chunks()`` yields the values in flat order (called twice)."""
        if self.keep_all:
            return
        high = torch.zeros(65536, dtype=torch.int64)
        for c in chunks():
            high += torch.bincount(c.abs().view(torch.int32) >> 16, minlength=65536)
        h, above = _select(high, self.k)
        low = torch.zeros(65536, dtype=torch.int64)
        for c in chunks():
            bits = c.abs().view(torch.int32)
            low += torch.bincount(bits[(bits >> 16) == h] & 0xFFFF, minlength=65536)
        lo, above_low = _select(low, self.k - above)
        self.threshold = torch.tensor([(h << 16) | lo], dtype=torch.int32).view(torch.float32)[0]
        self.need = self.k - above - above_low  # entries equal to the threshold still to keep, lowest index first

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask of the next chunk (None: keep everything); chunks must come in flat order."""
        if self.keep_all:
            return None
        mag = x.abs()
        mask = mag > self.threshold
        if self.need > 0:
            tied = torch.nonzero(mag == self.threshold).reshape(-1)[: self.need]
            mask[tied] = True
            self.need -= tied.numel()
        return mask


def _select(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest entry, number of entries in higher bins)."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([k], dtype=torch.int64))[0])
    b = hist.numel() - 1 - i
    return b, int(from_top[i]) - int(hist[b])


def _trim(x: torch.Tensor, topk: TopK) -> torch.Tensor:
    mask = topk.mask(x)
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=torch.float32))


class ChunkedMerge:
    """``method`` over one tensor of ``numel`` entries, merged chunk by chunk in flat order."""

    def __init__(self, method: str, lambdas: Sequence[float], read: ChunkReader, numel: int, chunks: Sequence[tuple[int, int]], *, density: float = 1.0, drop: float = 0.0, seeds: Sequence[int] = ()):
        self.method, self.lambdas, self.read = method, [float(lam) for lam in lambdas], read
        self.drop = check_drop(drop) if method.startswith("dare") else 0.0
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if method.startswith("dare") else []
        self.topk: list[TopK] = []
        if method in ("ties", "magnitude"):
            for t, lam in enumerate(self.lambdas):
                topk = TopK(numel, density)
                pre = (lambda c, lam=lam: scale(c, lam)) if method == "ties" else (lambda c: c)
                topk.fit(lambda t=t, pre=pre: (pre(read(t, s, e)) for s, e in chunks))
                self.topk.append(topk)

    def _dare(self, t: int, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.to(torch.float32)
        if self.drop == 0:
            return tau.clone()
        keep = torch.rand((tau.numel(),), generator=self.gens[t]) >= self.drop
        return torch.where(keep, tau / (1.0 - self.drop), torch.zeros((), dtype=torch.float32))

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        taus = [self.read(t, start, stop) for t in range(len(self.lambdas))]
        if self.method == "sum":
            return weighted_sum(taus, self.lambdas)
        if self.method == "magnitude":
            return weighted_sum([_trim(tau.to(torch.float32), k) for tau, k in zip(taus, self.topk)], self.lambdas)
        if self.method == "ties":
            trimmed = [_trim(scale(tau, lam), k) for tau, lam, k in zip(taus, self.lambdas, self.topk)]
            return disjoint_mean(trimmed, elect_sign(trimmed))
        dropped = [self._dare(t, tau) for t, tau in enumerate(taus)]
        if self.method == "dare":
            return weighted_sum(dropped, self.lambdas)
        dropped = [scale(d, lam) for d, lam in zip(dropped, self.lambdas)]  # dare_ties
        return disjoint_mean(dropped, elect_sign(dropped))
