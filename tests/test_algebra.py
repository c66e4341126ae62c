"""The algebra against hand-computed tensors and small worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from taskvec import algebra
from taskvec.errors import TaskvecError


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_scale_negate_add_weighted_sum_exact():
    a, b = t(1.0, -2.0, 0.5), t(0.25, 4.0, -1.0)
    assert torch.equal(algebra.scale(a, 2.0), t(2.0, -4.0, 1.0))
    assert torch.equal(algebra.negate(a), t(-1.0, 2.0, -0.5))
    assert torch.equal(algebra.add(a, b), t(1.25, 2.0, -0.5))
    assert torch.equal(algebra.weighted_sum([a, b], [0.5, -1.0]), t(0.25, -5.0, 1.25))


def test_analogy_is_c_plus_b_minus_a():
    a, b, c = t(1.0, 1.0), t(3.0, -1.0), t(0.5, 2.0)
    assert torch.equal(algebra.analogy(c, b, a), t(2.5, 0.0))


def test_topk_mask_keeps_exactly_k_with_ties_by_index():
    x = t(1.0, -3.0, 2.0, -2.0, 0.5)
    # density 0.6 -> k = ceil(3.0) = 3: |-3|, then the tie 2 / -2 both kept
    assert algebra.topk_mask(x, 0.6).tolist() == [False, True, True, True, False]
    # density 0.4 -> k = 2: -3 and the FIRST of the tied pair (index 2)
    assert algebra.topk_mask(x, 0.4).tolist() == [False, True, True, False, False]
    assert algebra.topk_mask(x, 1.0).all()
    assert int(algebra.topk_mask(x, 0.01).sum()) == 1  # ceil keeps at least one


def test_magnitude_prune():
    x = t(1.0, -3.0, 2.0, -0.5)
    assert torch.equal(algebra.magnitude_prune(x, 0.5), t(0.0, -3.0, 2.0, 0.0))


def test_ties_worked_example():
    # Worked by hand (density 0.5 -> keep 2 of 4 per vector):
    #   trim:  τ1 [3,-1,.5,-2] -> [3,0,0,-2];  τ2 [-1,2,1,-3] -> [0,2,0,-3];  τ3 [2,-4,0,1] -> [2,-4,0,0]
    #   elect: sum [5,-2,0,-5] -> sign [+,-,0,-]
    #   disjoint mean: [(3+2)/2, -4/1, 0, (-2-3)/2] = [2.5, -4, 0, -2.5]
    taus = [t(3.0, -1.0, 0.5, -2.0), t(-1.0, 2.0, 1.0, -3.0), t(2.0, -4.0, 0.0, 1.0)]
    assert torch.equal(algebra.ties(taus, [1, 1, 1], 0.5), t(2.5, -4.0, 0.0, -2.5))
    # equal λ scales the result (the paper's θ + λ·TIES(τ))
    assert torch.equal(algebra.ties(taus, [0.5, 0.5, 0.5], 0.5), t(1.25, -2.0, 0.0, -1.25))
    # a negative λ flips that vector's vote: τ3 negated -> trimmed [-2,4,0,0]
    #   sum [1,6,0,-5] -> [+,+,0,-]; means [3, (2+4)/2, 0, -2.5]
    assert torch.equal(algebra.ties(taus, [1, 1, -1], 0.5), t(3.0, 3.0, 0.0, -2.5))


def test_elect_sign_weighs_mass_not_count():
    # two small positives lose to one large negative
    taus = [t(1.0), t(1.0), t(-5.0)]
    assert algebra.elect_sign(taus).item() == -1.0
    assert algebra.disjoint_mean(taus, algebra.elect_sign(taus)).item() == -5.0


def test_ties_full_density_no_conflict_is_plain_mean():
    taus = [t(1.0, 2.0, -3.0), t(3.0, 4.0, -1.0)]
    assert torch.equal(algebra.ties(taus, [1, 1], 1.0), t(2.0, 3.0, -2.0))


def test_dare_definition_and_rescale():
    x = torch.arange(1, 1001, dtype=torch.float32)
    p, seed = 0.3, 1234
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) >= p
    expected = torch.where(keep, x / (1 - p), torch.zeros(()))
    out = algebra.dare(x, p, seed)
    assert torch.equal(out, expected)
    kept = out != 0
    assert torch.allclose(out[kept] * (1 - p), x[kept])
    assert abs(1 - kept.float().mean().item() - p) < 0.05  # ≈ p dropped


def test_dare_is_seeded_and_identity_at_p0():
    x = torch.randn(200)
    assert torch.equal(algebra.dare(x, 0.5, 7), algebra.dare(x, 0.5, 7))
    assert not torch.equal(algebra.dare(x, 0.5, 7), algebra.dare(x, 0.5, 8))
    assert torch.equal(algebra.dare(x, 0.0, 7), x)


def test_dare_preserves_expectation():
    x = torch.full((200_000,), 2.0)
    assert abs(algebra.dare(x, 0.9, 3).mean().item() - 2.0) < 0.05


def test_dare_ties_worked_example():
    # p = 0 makes DARE the identity, so dare_ties reduces to sign election + disjoint mean
    taus = [t(1.0, -2.0, 3.0), t(-3.0, -1.0, 1.0)]
    #  sum [-2,-3,4] -> [-,-,+]; means [-3, (-2-1)/2, (3+1)/2]
    assert torch.equal(algebra.dare_ties(taus, [1, 1], 0.0, [0, 1]), t(-3.0, -1.5, 2.0))


def test_merge_dispatch_and_tensor_seed():
    taus = [t(1.0, -2.0), t(3.0, 4.0)]
    assert torch.equal(algebra.merge("sum", taus, [1, 2]), t(7.0, 6.0))
    assert torch.equal(algebra.merge("magnitude", taus, [1, 1], density=0.5), t(0.0, 2.0))
    assert algebra.tensor_seed(0, 0, "a") != algebra.tensor_seed(0, 1, "a")
    assert algebra.tensor_seed(0, 0, "a") == algebra.tensor_seed(0, 0, "a")


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda: algebra.check_lambda(math.nan), "finite"),
        (lambda: algebra.check_lambda(math.inf), "finite"),
        (lambda: algebra.check_density(0.0), "(0, 1]"),
        (lambda: algebra.check_density(1.5), "(0, 1]"),
        (lambda: algebra.check_drop(1.0), "[0, 1)"),
        (lambda: algebra.check_drop(-0.1), "[0, 1)"),
        (lambda: algebra.check_method("average"), "unknown merge method"),
    ],
)
def test_parameter_refusals(call, msg):
    with pytest.raises(TaskvecError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        call()
