"""The fused C kernel gives the torch path's bits: every dtype, both sums, rounding ties, special values."""

from __future__ import annotations

import pytest
import torch

from taskvec import engine, kernels, streaming
from taskvec.io import TensorSource

from .conftest import make_tiny_bert, perturb

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]


def reference(mode, base, xs, lambdas):
    """The documented float32 operations, one torch op each: the product rounded, then the sum."""
    b = base.to(F32)
    if mode == kernels.MERGE:
        acc = (xs[0].to(F32) - b) * lambdas[0]
        for x, lam in zip(xs[1:], lambdas[1:]):
            acc = acc + (x.to(F32) - b) * lam
        return acc + b
    acc = b.clone()
    for x, lam in zip(xs, lambdas):
        acc = acc + x.to(F32) * lam
    return acc


def run(mode, out_dtype, base, xs, lambdas):
    out = torch.full((base.numel(),), 7, dtype=out_dtype)
    ok = kernels.combine(mode, out, base, xs, lambdas)
    return out, ok


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_the_kernel_is_built():
    """pip install compiled it (the CI machine has a C compiler): the fast path is the tested path."""
    assert kernels.built(), "taskvec._kernels was not built: pip install -e . needs a C compiler"


@pytest.mark.parametrize("mode", [kernels.MERGE, kernels.APPLY], ids=["merge", "apply"])
@pytest.mark.parametrize("base_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 3001])
def test_random_sums_have_the_torch_bits(mode, base_dtype, k, n):
    g = torch.Generator().manual_seed(n * 31 + k)
    scale = 10.0 ** torch.randint(-6, 4, (1,), generator=g).item()
    base = (torch.randn(n, generator=g) * scale).to(base_dtype)
    # inputs of every dtype (a vector's dtype need not be the model's), near the base as fine-tunes are
    xs = [(base.to(F32) * (mode == kernels.MERGE) + torch.randn(n, generator=g) * scale * 0.01).to(DTYPES[(t + n) % 3]) for t in range(k)]
    lambdas = [0.6, -0.9, 0.3333][:k]
    want = reference(mode, base, xs, lambdas)
    for out_dtype in DTYPES:
        out, ok = run(mode, out_dtype, base, xs, lambdas)
        assert ok
        assert same_bits(out, want.to(out_dtype)), (out_dtype, (out.to(F32) - want.to(out_dtype).to(F32)).abs().max())


def test_the_output_may_be_the_base_itself():
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        base = torch.randn(1000, generator=g).to(dtype)
        x = (base.to(F32) + torch.randn(1000, generator=g) * 0.01).to(dtype)
        want = reference(kernels.MERGE, base, [x], [1.5]).to(dtype)
        assert kernels.combine(kernels.MERGE, base, base, [x], [1.5])
        assert same_bits(base, want)


def test_every_float16_value_widens_exactly():
    """All 65,536 float16 bit patterns (zeros, subnormals, normals, Inf; NaN flagged) through the load."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(F16)
    minus_zero = torch.full((every.numel(),), -0.0)  # b + (-0)·1 = b for every b, -0 included
    out, ok = run(kernels.APPLY, F32, every, [minus_zero], [1.0])
    assert not ok  # the NaN patterns
    real = ~torch.isnan(every)
    assert same_bits(out[real], every[real].to(F32))
    assert torch.isnan(out[~real]).all()


def _ties(keep_bits: int, lo: int, hi: int) -> torch.Tensor:
    """float32 values with every high part in [lo, hi) and the low ``keep_bits`` bits at rounding ties and their neighbours."""
    half = 1 << (keep_bits - 1)
    lows = torch.tensor([0, 1, half - 1, half, half + 1, (1 << keep_bits) - 1], dtype=torch.int64)
    highs = torch.arange(lo, hi, dtype=torch.int64) << keep_bits
    bits = (highs[:, None] + lows[None, :]).reshape(-1)
    return _from_bits(torch.cat([bits, bits | (1 << 31)]))  # both signs


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values from their bit patterns (int64 in [0, 2^32))."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(F32)


def _rounding_cases(dtype):
    if dtype == BF16:  # ties at bit 15, every exponent and mantissa
        vals = _ties(16, 0, 1 << 15)
    else:  # float16: ties at bit 12 over its normal range, its subnormal ties k·2^-25, overflow edges
        normal = _ties(13, 0x38800000 >> 13, 0x47800000 >> 13)
        k = torch.arange(0, 2049, dtype=F32)
        sub = torch.cat([k * 2.0**-25, (k * 2.0**-25).nextafter(torch.tensor(1.0)), (k * 2.0**-25).nextafter(torch.tensor(0.0))])
        edges = torch.tensor([65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 1e6, 2.0**-24, 2.0**-25, 2.0**-26, 5.9e-8, 6.1e-5])
        vals = torch.cat([normal, sub, -sub, edges, -edges])
    stride = _from_bits(torch.arange(0x00800000, 0x7F800000, 40_009, dtype=torch.int64))  # a sweep of all exponents
    return torch.cat([vals, stride, -stride, torch.tensor([0.0, -0.0, float("inf"), float("-inf")])]).contiguous()


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_rounding_to_half_precision_is_torchs_round_to_nearest_even(dtype):
    vals = _rounding_cases(dtype)
    minus_zero = torch.full((vals.numel(),), -0.0)
    out, ok = run(kernels.APPLY, dtype, vals, [minus_zero], [1.0])
    real = ~torch.isnan(vals)  # a NaN result is refused, never stored: its payload need not match
    assert real.sum() > 400_000
    assert same_bits(out[real], vals[real].to(dtype))
    assert torch.isnan(out[~real].to(F32)).all()
    assert ok == streaming.fits(vals, dtype) and not ok  # the sweep reaches NaN, Inf and beyond the dtype


@pytest.mark.parametrize(
    ("dtype", "fits", "overflows"),
    [(F16, 65519.0, 65520.0), (BF16, 3.3961e38, 3.3962e38), (F32, 3.4028e38, float("inf"))],
    ids=str,
)
def test_the_flag_is_exactly_whether_the_result_fits_the_output_dtype(dtype, fits, overflows):
    for sign in (1.0, -1.0):
        base = torch.tensor([0.5, 0.0, 2.0])  # the middle result is exactly the value
        for value, expect in ((fits, True), (overflows, False), (float("nan"), False)):
            x = torch.tensor([0.0, sign * value, 0.0])
            _, ok = run(kernels.APPLY, dtype, base, [x], [1.0])
            assert ok is expect, (dtype, sign, value)
            assert ok is streaming.fits(reference(kernels.APPLY, base, [x], [1.0]), dtype)


def test_float32_overflow_in_the_sum_is_flagged():
    big = torch.tensor([3e38, 1.0])
    _, ok = run(kernels.MERGE, F32, torch.tensor([-3e38, 0.0]), [big], [1.0])  # (3e38 − (−3e38))·1 = Inf
    assert not ok


def test_bad_arguments_are_refused_before_any_memory_is_touched():
    a, b = torch.zeros(10), torch.zeros(11)
    with pytest.raises(ValueError):
        kernels.combine(kernels.MERGE, a, a, [b], [1.0])  # lengths differ
    with pytest.raises(ValueError):
        kernels.combine(kernels.MERGE, a, a, [torch.zeros(20)[::2]], [1.0])  # not contiguous
    with pytest.raises(ValueError):
        kernels.combine(kernels.MERGE, a, a, [torch.zeros(10, dtype=torch.float64)], [1.0])
    with pytest.raises(ValueError):
        kernels.combine(kernels.MERGE, a, a, [a], [1.0, 2.0])
    assert kernels.combine(kernels.MERGE, torch.zeros(0), torch.zeros(0), [torch.zeros(0)], [1.0])


@pytest.fixture(scope="module", params=DTYPES, ids=str)
def typed_models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"k-{request.param}")
    base = make_tiny_bert(root / "base", dtype=request.param)
    return base, perturb(base, root / "ft1", 1), perturb(base, root / "ft2", 2)


def _engine_outputs(models, root):
    base, ft1, ft2 = models
    v1 = engine.extract(base, ft1, root / "v1.safetensors")
    v2 = engine.extract(base, ft2, root / "v2.safetensors", dtype=BF16)
    merged = engine.merge(base, [(ft1, 0.6), (ft2, -0.9)], root / "m")["output_hash"]
    applied = engine.apply(base, [(root / "v1.safetensors", 0.6), (root / "v2.safetensors", -0.9)], root / "a")["output_hash"]
    return {"v1": v1.sha256, "v2": v2.sha256, "merge": merged, "apply": applied}


def test_merge_and_apply_write_the_same_bits_with_and_without_the_kernel(typed_models, tmp_path, monkeypatch):
    calls = []
    real = kernels.combine
    monkeypatch.setattr(kernels, "combine", lambda *a: calls.append(a[0]) or real(*a))
    (tmp_path / "fused").mkdir(), (tmp_path / "torch").mkdir()
    fused = _engine_outputs(typed_models, tmp_path / "fused")
    assert set(calls) == {kernels.MERGE, kernels.APPLY}  # both sums really ran on the kernel
    monkeypatch.setenv("TASKVEC_KERNELS", "0")
    calls.clear()
    assert _engine_outputs(typed_models, tmp_path / "torch") == fused
    assert calls == []
    # and the result is the formula's: θ + 0.6 (θ_1 − θ) − 0.9 (θ_2 − θ), each product rounded, in float32
    base, ft1, ft2 = (TensorSource(p) for p in typed_models)
    got = TensorSource(tmp_path / "fused" / "m")
    for name in ("encoder.layer.0.attention.self.query.weight", "embeddings.LayerNorm.bias"):
        b, x1, x2 = (s.read(name).reshape(-1) for s in (base, ft1, ft2))
        assert same_bits(got.read(name).reshape(-1), reference(kernels.MERGE, b, [x1, x2], [0.6, -0.9]).to(b.dtype))
