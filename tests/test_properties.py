"""Property-based tests (hypothesis) of the task-vector algebra and the apply round trip.

Exactly the properties of issue 6:

* negation is an involution;
* addition commutes;
* scaling distributes (over a sum of vectors, and over a sum of scalars);
* the analogy equals its definition ``τ_C + (τ_B − τ_A)``;
* TIES with k = 100 % (density 1) and no sign conflict equals the plain mean;
* DARE with p = 0 is the identity;
* apply(τ) then apply(−τ) is the identity within rounding (through the real
  engine, on tiny random safetensors folders).

"Within rounding" bounds are derived from the float32 (or storage dtype)
machine epsilon and the magnitudes involved, not picked by hand.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

from taskvec import algebra, engine
from taskvec.engine import MergeOptions
from taskvec.vector import TaskVector

EPS32 = float(torch.finfo(torch.float32).eps)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------
# Strategies

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)
values = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
lambdas = st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def tensors(shape, elements=values) -> st.SearchStrategy[torch.Tensor]:
    return hnp.arrays(np.float32, shape, elements=elements).map(lambda a: torch.from_numpy(a.copy()))


@st.composite
def same_shape(draw, n: int, elements=values) -> list[torch.Tensor]:
    shape = draw(shapes)
    return [draw(tensors(shape, elements)) for _ in range(n)]


def close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, ulps: float = 4.0) -> None:
    """|actual − expected| ≤ ulps · ε₃₂ · scale, elementwise (scale = magnitude of the operands)."""
    bound = ulps * EPS32 * scale + torch.finfo(torch.float32).tiny
    err = (actual - expected).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max())} vs bound {float(bound.max())}"


# ---------------------------------------------------------------------------
# Negation is an involution


@FAST
@given(same_shape(1))
def test_negation_is_an_involution(ts):
    (tau,) = ts
    assert torch.equal(algebra.negate(algebra.negate(tau)), tau)
    assert torch.equal(algebra.scale(algebra.scale(tau, -1.0), -1.0), tau)
    tv = TaskVector({"w": tau})
    assert torch.equal((-(-tv)).tensors["w"], tau)


# ---------------------------------------------------------------------------
# Addition commutes


@FAST
@given(same_shape(2))
def test_addition_commutes(ts):
    a, b = ts
    assert torch.equal(algebra.add(a, b), algebra.add(b, a))
    assert torch.equal(algebra.weighted_sum([a, b], [1.0, 1.0]), algebra.weighted_sum([b, a], [1.0, 1.0]))
    ta, tb = TaskVector({"w": a}), TaskVector({"w": b})
    assert torch.equal((ta + tb).tensors["w"], (tb + ta).tensors["w"])


# ---------------------------------------------------------------------------
# Scaling distributes


@FAST
@given(same_shape(2), lambdas)
def test_scaling_distributes_over_vector_sum(ts, lam):
    a, b = ts
    lhs = algebra.scale(algebra.add(a, b), lam)
    rhs = algebra.add(algebra.scale(a, lam), algebra.scale(b, lam))
    # two roundings on each side, each relative to |λ|(|a| + |b|)
    close(lhs, rhs, abs(lam) * (a.abs() + b.abs()))
    ta, tb = TaskVector({"w": a}), TaskVector({"w": b})
    close((lam * (ta + tb)).tensors["w"], (lam * ta + lam * tb).tensors["w"], abs(lam) * (a.abs() + b.abs()))


@FAST
@given(same_shape(1), lambdas, lambdas)
def test_scaling_distributes_over_scalar_sum(ts, lam, mu):
    (tau,) = ts
    lhs = algebra.scale(tau, lam + mu)
    rhs = algebra.add(algebra.scale(tau, lam), algebra.scale(tau, mu))
    close(lhs, rhs, (abs(lam) + abs(mu)) * tau.abs())
    close(algebra.weighted_sum([tau, tau], [lam, mu]), lhs, (abs(lam) + abs(mu)) * tau.abs())


# ---------------------------------------------------------------------------
# Analogy equals its definition


@FAST
@given(same_shape(3))
def test_analogy_equals_its_definition(ts):
    a, b, c = ts
    assert torch.equal(algebra.analogy(c, b, a), c + (b - a))
    # and as the CLI spells it: C:1 B:1 A:-1 (a weighted sum, summed in another order)
    close(algebra.weighted_sum([c, b, a], [1.0, 1.0, -1.0]), c + (b - a), a.abs() + b.abs() + c.abs())
    tc, tb, ta = TaskVector({"w": c}), TaskVector({"w": b}), TaskVector({"w": a})
    assert torch.equal((tc + (tb - ta)).tensors["w"], c + (b - a))


# ---------------------------------------------------------------------------
# TIES with k = 100 and no sign conflict is the plain mean


@st.composite
def agreeing_vectors(draw) -> list[torch.Tensor]:
    """2–4 vectors that agree in sign everywhere (one shared sign pattern, non-zero magnitudes)."""
    n = draw(st.integers(2, 4))
    shape = draw(shapes)
    sign = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([-1.0, 1.0])))
    mags = st.floats(2.0**-10, 1e3, width=32, allow_subnormal=False)
    return [torch.from_numpy(sign * draw(hnp.arrays(np.float32, shape, elements=mags))) for _ in range(n)]


@FAST
@given(agreeing_vectors(), st.floats(0.01, 10, allow_subnormal=False))
def test_ties_full_density_without_conflict_is_the_mean(taus, lam):
    n = len(taus)
    mean = algebra.add(*taus) / n
    mags = sum(t.abs() for t in taus) / n
    close(algebra.ties(taus, [1.0] * n, 1.0), mean, mags, ulps=2 * n)
    close(algebra.merge("ties", taus, [1.0] * n, density=1.0), mean, mags, ulps=2 * n)
    # an equal positive λ for every vector scales the mean (the paper's θ + λ·TIES(τ))
    close(algebra.ties(taus, [lam] * n, 1.0), lam * mean, lam * mags, ulps=4 * n)


# ---------------------------------------------------------------------------
# DARE with p = 0 is the identity


@FAST
@given(same_shape(2), st.integers(0, 2**62))
def test_dare_with_p0_is_the_identity(ts, seed):
    a, b = ts
    assert torch.equal(algebra.dare(a, 0.0, seed), a)
    assert torch.equal(algebra.dare_keep_mask(a.shape, 0.0, seed), torch.ones(a.shape, dtype=torch.bool))
    # so DARE-merge with p = 0 is task arithmetic, and DARE-TIES with p = 0 on one vector returns it
    assert torch.equal(algebra.merge("dare", [a, b], [0.5, -2.0], drop=0.0, seeds=[seed, seed + 1]), algebra.weighted_sum([a, b], [0.5, -2.0]))
    assert torch.equal(algebra.merge("dare_ties", [a], [1.0], drop=0.0, seeds=[seed]), a)
    opts = MergeOptions("dare", drop=0.0, seed=seed % 1000)
    assert torch.equal(opts.combine("w", [a, b], [1.0, 1.0]), algebra.weighted_sum([a, b], [1.0, 1.0]))


# ---------------------------------------------------------------------------
# apply(τ) then apply(−τ) is the identity within rounding (real engine, files on disk)


@st.composite
def model_pair(draw):
    """A tiny random 'model' (2–3 tensors, optionally float16/bfloat16) and a fine-tuned copy."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    n = draw(st.integers(1, 3))
    base, ft = {}, {}
    small = st.floats(-4, 4, width=32, allow_subnormal=False)
    for i in range(n):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5))
        b = draw(tensors(shape, small))
        d = draw(tensors(shape, st.floats(-1, 1, width=32, allow_subnormal=False)))
        base[f"layer.{i}.weight"] = b.to(dtype)
        ft[f"layer.{i}.weight"] = (b + d).to(dtype)
    # a non-float buffer that must be copied untouched
    base["position_ids"] = ft["position_ids"] = torch.arange(4, dtype=torch.int64)
    lam = draw(st.floats(-2, 2, allow_subnormal=False).filter(lambda x: abs(x) > 1e-3))
    return base, ft, lam


@SLOW
@given(model_pair())
def test_apply_then_apply_negated_is_the_identity(pair):
    base, ft, lam = pair
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name, sd in (("base", base), ("ft", ft)):
            (root / name).mkdir()
            save_file(sd, root / name / "model.safetensors")
        vec = engine.extract(root / "base", root / "ft", root / "tau.safetensors").path
        engine.apply(root / "base", [(vec, lam)], root / "edited")
        ledger = engine.apply(root / "edited", [(vec, -lam)], root / "back")
        assert [e["lambda"] for e in ledger["edits"]] == [lam, -lam]
        back, edited = load_file(root / "back" / "model.safetensors"), load_file(root / "edited" / "model.safetensors")
        tau = TaskVector.load(vec).tensors
        assert torch.equal(back["position_ids"], base["position_ids"])
        for name, b in base.items():
            if not b.is_floating_point():
                continue
            assert back[name].dtype == b.dtype
            # each apply rounds once to the storage dtype: |error| ≤ ε · (|θ| + |λτ| + |θ'|)
            eps = float(torch.finfo(b.dtype).eps)
            scale = b.float().abs() + abs(lam) * tau[name].abs() + edited[name].float().abs()
            err = (back[name].float() - b.float()).abs()
            assert bool((err <= 2 * eps * scale + 1e-30).all()), (name, b.dtype, float(err.max()))


@pytest.mark.parametrize("lam", [1.0, 0.5, -3.0])
def test_apply_round_trip_float32_small_lambda_exactness(tmp_path, lam):
    """A deterministic anchor for the property above: float32, well-scaled values."""
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=gen)}
    ft = {"w": base["w"] + 0.01 * torch.randn(8, 8, generator=gen)}
    for name, sd in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    vec = engine.extract(tmp_path / "base", tmp_path / "ft", tmp_path / "tau.safetensors").path
    engine.apply(tmp_path / "base", [(vec, lam)], tmp_path / "e")
    engine.apply(tmp_path / "e", [(vec, -lam)], tmp_path / "r")
    back = load_file(tmp_path / "r" / "model.safetensors")["w"]
    assert torch.allclose(back, base["w"], atol=4 * EPS32 * (1 + abs(lam)), rtol=0)
