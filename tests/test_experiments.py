"""Smoke test of the paper-experiment logic (benchmarks.paper.experiments) on a tiny random BERT.

Three tiny sentiment-like classification tasks plus two mlm tasks are written
as CSV mirrors in tmp_path; the whole negation / addition / analogy run (with
fine-tunes, gradient ascent, four merge methods and every λ search) finishes
in well under a minute and must write the table, the JSON and the plots.
"""

from __future__ import annotations

import json

import pytest
import torch

from taskvec.config import parse_params
from benchmarks.paper.experiments import run_benchmark
from benchmarks.paper.spec import ExperimentParams, MethodSpec
from benchmarks.paper.vectors import merge_vectors, random_like
from tests.conftest_tasks import LABELS, sentiment_rows, tiny_model, write_csv, write_mirror  # noqa: F401 - fixtures


@pytest.fixture
def bench_params(tmp_path, tiny_model):
    root = tmp_path / "data"
    for i, name in enumerate(("senti", "other", "ctrl", "dom", "src")):
        write_mirror(root / name, sizes=(48, 16, 16), seed=10 * i)
    for i, name in enumerate(("dom_lm", "src_lm")):
        write_csv(root / name / "train.csv", [(t, "") for t, _ in sentiment_rows(32, seed=100 + i)])
    cls = {"labels": LABELS, "descriptions": ["bad", "good"]}
    data = {
        "base": str(tiny_model),
        "data_dir": str(root),
        "tasks": {
            **{n: {"source": n, **cls} for n in ("senti", "other", "ctrl", "dom", "src")},
            "dom_lm": {"source": "dom_lm", "kind": "mlm"},
            "src_lm": {"source": "src_lm", "kind": "mlm"},
        },
        "train": {"steps": 3, "batch_size": 8, "max_length": 16, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"batch_size": 16, "max_length": 16},
        "search": {"grid_points": 5, "max_evals": 4, "lambda_max": 2.0},
        "bench": {
            "negation": {"targets": ["senti"], "control": "ctrl", "gradient_ascent": {"lrs": [1e-3], "steps": 2, "checkpoints": [1, 2], "batch_size": 8}},
            "addition": {"tasks": ["senti", "other"]},
            "analogy": {"target": "dom", "source": "src", "target_lm": "dom_lm", "source_lm": "src_lm"},
        },
    }
    return parse_params(data, model=ExperimentParams)


def test_benchmark_writes_table_json_and_plots(bench_params, tmp_path):
    out = tmp_path / "out"
    lines = []
    results = run_benchmark("inline", out, params=bench_params, log=lines.append)
    for name in ("results.md", "results.json", "negation.png", "addition.png", "analogy.png"):
        assert (out / name).is_file(), name
    assert (out / "curves" / "addition-ties" / "curve.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"negation", "addition", "analogy", "meta"}
    neg = results["negation"]["senti"]["rows"]
    assert set(neg) == {"base", "fine-tuned (+τ)", "negated task vector (−λτ)", "random vector, same norm (−λr)", "gradient ascent"}
    # the chosen edits respect the control constraint on validation
    floor = results["negation"]["senti"]["control_floor_validation"]
    assert neg["negated task vector (−λτ)"]["validation"]["ctrl"] >= floor
    assert neg["gradient ascent"]["validation"]["ctrl"] >= floor
    add = results["addition"]["rows"]
    assert {"task_arithmetic", "ties", "dare", "dare_ties"} <= set(add)
    assert all(0.0 <= row["lambda"] <= 2.0 for name, row in add.items() if name in ("ties", "dare"))
    assert add["individual fine-tunes"]["mean_normalized_test"] == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert "## 1. Negation" in md and "## 2. Addition" in md and "## 3. Analogy" in md
    # a re-run reuses the cached fine-tunes and vectors and gives the same table
    lines.clear()
    again = run_benchmark("inline", out, params=bench_params, log=lines.append)
    assert not any(line.startswith("[finetune]") for line in lines)
    assert again["addition"]["rows"]["ties"]["test"] == add["ties"]["test"]


def test_random_vector_matches_norms():
    gen = torch.Generator().manual_seed(0)
    tau = {"a": torch.randn(4, 5, generator=gen), "b": torch.randn(7, generator=gen) * 3}
    per = random_like(tau, seed=1)
    assert all(torch.linalg.norm(per[k]).item() == pytest.approx(torch.linalg.norm(tau[k]).item(), rel=1e-5) for k in tau)
    glob = random_like(tau, seed=1, norm="global")
    total = lambda d: sum(float(v.pow(2).sum()) for v in d.values()) ** 0.5  # noqa: E731
    assert total(glob) == pytest.approx(total(tau), rel=1e-5)
    assert torch.equal(random_like(tau, seed=1)["a"], per["a"])  # seeded


def test_merge_with_unit_weights_sum_equals_plain_sum():
    taus = [{"w": torch.tensor([1.0, -2.0, 0.5])}, {"w": torch.tensor([0.5, 1.0, -0.5])}]
    merged = merge_vectors(taus, MethodSpec(name="s", method="sum"), seed=0)
    assert torch.allclose(merged["w"], torch.tensor([1.5, -1.0, 0.0]))
    ties = merge_vectors(taus, MethodSpec(name="t", method="ties", density=1.0), seed=0)
    assert torch.allclose(ties["w"], torch.tensor([0.75, -2.0, 0.0]))
