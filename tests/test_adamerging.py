"""Layer-wise AdaMerging (taskvec.adamerging) on a tiny random BERT (2 layers, hidden 32) through the harness."""

from __future__ import annotations

import math

import pytest
import torch

from taskvec.adamerging import adamerge_suite, coefficient_tensor, delta_tensors, edit_delta, entropy, group_of, groups_of, merged_tensors
from taskvec.config import AdaMergingSpec
from taskvec.errors import HomologyError, TaskvecError
from taskvec.suite import Suite
from tests.conftest_tasks import LABELS, data_dir, task_params, tiny_model  # noqa: F401 - fixtures


@pytest.fixture
def suite(data_dir, tiny_model):
    tasks = {
        "senti": {"source": "senti", "labels": LABELS, "descriptions": ["bad", "good"]},
        "senti_b": {"source": "senti", "labels": LABELS, "descriptions": ["the movie was bad", "the movie was great"]},
    }
    params = task_params(data_dir, tiny_model, tasks=tasks)
    return Suite.load(tiny_model, ["senti", "senti_b"], params, splits=("validation",), dtype=torch.float32)


def random_taus(encoder, n: int, scale: float = 0.3):
    gen = torch.Generator().manual_seed(11)
    names = [name for name, _ in encoder.named_parameters()]
    return [{name: torch.randn(encoder.get_parameter(name).shape, generator=gen) * scale for name in names} for _ in range(n)]


def test_groups_follow_the_transformer_blocks():
    assert group_of("encoder.layer.1.attention.self.query.weight") == "layer.1"
    assert group_of("model.layers.12.mlp.up_proj.weight") == "layer.12"
    assert group_of("embeddings.word_embeddings.weight") == "other"
    assert group_of("pooler.dense.bias") == "other"
    assert group_of("encoder.layer.1.output.dense.bias", "task") == "all"
    assert groups_of(["encoder.layer.10.x", "encoder.layer.2.x", "embeddings.x"]) == ["other", "layer.2", "layer.10"]
    with pytest.raises(TaskvecError):
        group_of("x", "block")


def test_entropy_is_exact_on_known_distributions():
    assert float(entropy(torch.zeros(3, 4))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([[100.0, -100.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_delta_and_merge_are_the_coefficient_weighted_sum():
    taus = [{"layer.0.w": torch.tensor([1.0, 2.0]), "emb": torch.tensor([3.0])}, {"layer.0.w": torch.tensor([10.0, 20.0]), "emb": torch.tensor([30.0])}]
    groups = ["other", "layer.0"]
    lam = torch.tensor([[0.5, 0.25], [2.0, -1.0]])
    delta = delta_tensors(taus, lam, groups)
    assert torch.equal(delta["emb"], torch.tensor([0.5 * 3 + 0.25 * 30]))
    assert torch.equal(delta["layer.0.w"], torch.tensor([2.0 - 10.0, 4.0 - 20.0]))
    merged = merged_tensors({"layer.0.w": torch.ones(2), "emb": torch.zeros(1)}, taus, lam, groups)
    assert torch.equal(merged["layer.0.w"], torch.tensor([-7.0, -15.0]))
    with pytest.raises(TaskvecError):
        delta_tensors(taus, torch.zeros(1, 2), groups)
    with pytest.raises(HomologyError):
        delta_tensors([taus[0], {"emb": torch.zeros(1)}], lam, groups)


def test_adamerging_moves_the_coefficients_and_lowers_entropy_with_base_and_vectors_frozen(suite):
    encoder = suite.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    taus = random_taus(encoder, 2)
    taus_before = [{k: v.clone() for k, v in t.items()} for t in taus]
    spec = AdaMergingSpec(init=0.3, steps=15, lr=0.05, batch_size=8)
    res = adamerge_suite(suite, taus, ["senti", "senti_b"], spec)
    assert res.groups == ["other", "layer.0", "layer.1"]
    assert res.coefficients.shape == (3, 2)
    assert not torch.allclose(res.coefficients, torch.full((3, 2), 0.3))  # every row/column free to move; they did
    assert (res.coefficients != 0.3).all()
    assert res.final_entropy < res.initial_entropy
    assert len(res.history) == 15
    # base, vectors and gradients untouched
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(taus, taus_before) for k in a)
    assert all(p.grad is None and p.requires_grad for p in encoder.parameters())
    table = res.to_dict()["coefficients"]
    assert set(table) == {"senti", "senti_b"} and set(table["senti"]) == set(res.groups)
    assert torch.equal(coefficient_tensor(table, res.tasks, res.groups), res.coefficients)


def test_applied_weights_equal_base_plus_the_learned_sum_exactly(suite):
    encoder = suite.encoder
    base = {k: v.detach().clone() for k, v in encoder.named_parameters()}
    taus = random_taus(encoder, 2)
    res = adamerge_suite(suite, taus, ["senti", "senti_b"], AdaMergingSpec(steps=3, lr=0.1, batch_size=8))
    lam, index = res.coefficients, {g: i for i, g in enumerate(res.groups)}
    with suite.editor(edit_delta(taus, lam, res.groups)) as editor:
        editor.apply(1.0)
        for name, param in encoder.named_parameters():
            row = lam[index[group_of(name)]]
            expected = base[name] + (row[0] * taus[0][name] + row[1] * taus[1][name])
            assert torch.equal(param.detach(), expected), name
        merged = merged_tensors(base, taus, lam, res.groups)
        assert all(torch.equal(encoder.get_parameter(n).detach(), merged[n]) for n in merged)
        edited = suite.accuracies()
    assert all(torch.equal(encoder.get_parameter(n).detach(), base[n]) for n in base)  # restored exactly
    assert set(edited) == {"senti", "senti_b"}


def test_task_granularity_learns_one_coefficient_per_task(suite):
    taus = random_taus(suite.encoder, 2)
    res = adamerge_suite(suite, taus, ["senti", "senti_b"], AdaMergingSpec(steps=2, granularity="task", batch_size=8))
    assert res.groups == ["all"] and res.coefficients.shape == (1, 2)


def test_adamerging_refuses_mismatched_inputs(suite):
    taus = random_taus(suite.encoder, 2)
    with pytest.raises(TaskvecError):
        adamerge_suite(suite, taus[:1], ["senti", "senti_b"], AdaMergingSpec(steps=1))
    with pytest.raises(TaskvecError):
        adamerge_suite(suite, taus, ["senti", "senti_b"], AdaMergingSpec(steps=1), split="test")
    with pytest.raises(HomologyError):
        adamerge_suite(suite, [{"nope": torch.zeros(1)}] * 2, ["senti", "senti_b"], AdaMergingSpec(steps=1))
