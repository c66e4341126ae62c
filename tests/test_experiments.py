"""Smoke test of the paper-experiment logic (benchmarks.paper.experiments) on a tiny random BERT.

Three tiny sentiment-like classification tasks plus two mlm tasks are written
as CSV mirrors in tmp_path; the whole negation / addition / analogy run (with
fine-tunes, gradient ascent, four merge methods and every λ search) finishes
in well under a minute and must write the table, the JSON and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from taskvec.config import parse_params
from benchmarks.paper.experiments import run_benchmark
from benchmarks.paper.spec import ExperimentParams, MethodSpec
from benchmarks.paper.vectors import merge_vectors, random_like
from pipeline.cli import main as cli_main
from taskvec.search import ControlConstraint
from tests.conftest_tasks import LABELS, sentiment_rows, tiny_model, write_csv, write_mirror  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]


def bench_data(tmp_path, tiny_model) -> dict:
    root = tmp_path / "data"
    for i, name in enumerate(("senti", "other", "ctrl", "dom", "src")):
        write_mirror(root / name, sizes=(48, 16, 16), seed=10 * i)
    for i, name in enumerate(("dom_lm", "src_lm")):
        write_csv(root / name / "train.csv", [(t, "") for t, _ in sentiment_rows(32, seed=100 + i)])
    cls = {"labels": LABELS, "descriptions": ["bad", "good"]}
    return {
        "base": str(tiny_model),
        "data_dir": str(root),
        "tasks": {
            **{n: {"source": n, **cls} for n in ("senti", "other", "ctrl", "dom", "src")},
            "dom_lm": {"source": "dom_lm", "kind": "mlm"},
            "src_lm": {"source": "src_lm", "kind": "mlm"},
        },
        "train": {"steps": 3, "batch_size": 8, "max_length": 16, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"batch_size": 16, "max_length": 16},
        "search": {"grid_points": 5, "max_evals": 4, "lambda_max": 2.0, "max_control_drop": 1.0},
        "bench": {
            "seeds": [0, 1, 2],
            "negation": {"targets": ["senti"], "control": "ctrl", "gradient_ascent": {"lrs": [1e-3], "steps": 2, "checkpoints": [1, 2], "batch_size": 8}},
            "addition": {"tasks": ["senti", "other"]},
            "analogy": {"target": "dom", "source": "src", "target_lm": "dom_lm", "source_lm": "src_lm"},
        },
    }


@pytest.fixture
def bench_params(tmp_path, tiny_model):
    return parse_params(bench_data(tmp_path, tiny_model), model=ExperimentParams)


def test_benchmark_command_writes_a_paper_json_that_validates_against_the_schema(tmp_path, tiny_model, capsys):
    """A tiny-budget `taskvec benchmark` (3 seeds): paper.json validates, holds means over seeds with 95% t-intervals."""
    config = tmp_path / "experiments.yaml"
    config.write_text(yaml.safe_dump(bench_data(tmp_path, tiny_model)))
    out, committed = tmp_path / "out", tmp_path / "results" / "paper.json"
    with pytest.raises(SystemExit) as exc:
        cli_main(["benchmark", "--config", str(config), "--out", str(out), "--paper-json", str(committed), "-S", "eval.max_rows.test=12"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    paper = json.loads(committed.read_text())
    assert committed.read_text() == (out / "paper.json").read_text()
    schema = json.loads((REPO / "benchmarks" / "results" / "paper.schema.json").read_text())
    jsonschema.validate(paper, schema)
    assert paper["seeds"] == [0, 1, 2] and paper["split"] == "test" and "Student-t" in paper["interval"]
    assert paper["complete"] is True and "note" not in paper
    assert paper["budget"]["rows"]["test"] == 12 and paper["budget"]["overrides"] == ["eval.max_rows.test=12"]
    # every number is the mean of the three seed runs, and its _ci95 is the t-interval half-width over them
    seeds = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1, 2)]
    per_seed = [r["negation"]["senti"]["rows"]["negated task vector (−λτ)"]["test"]["senti"] for r in seeds]
    neg = paper["negation"][0]
    assert neg["target"] == "senti" and neg["chance"] == 0.5
    assert neg["negated"]["target"] == pytest.approx(np.mean(per_seed))
    assert neg["negated"]["target_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3))
    assert set(paper["addition"]["methods"]) == {"sum", "ties", "dare", "dare_ties"}
    assert paper["analogy"]["base"] == pytest.approx(np.mean([r["analogy"]["rows"]["base (zero-shot)"]["test"]["dom"] for r in seeds]))
    assert {"negation/senti", "addition/sum", "addition/best_variant"} <= set(paper["goals"])
    # the analogy's recovered fraction is judged only where every seed defines it (a supervised gain ≠ 0)
    assert ("analogy" in paper["goals"]) == isinstance(paper["analogy"]["recovered_fraction"], float)
    md = (out / "results.md").read_text()
    assert " ± " in md and "## Goals" in md and "(control: ≤ 2000 rows of validation)" in md
    assert "Wall time per seed 0: " in md and ", 2: " in md  # each seed's run, not the summary's own seconds
    # the summary can be rebuilt from the seed runs without running anything
    (out / "paper.json").unlink()
    with pytest.raises(SystemExit):
        cli_main(["benchmark", "--config", str(config), "--out", str(out), "--aggregate", "-S", "eval.max_rows.test=12"])
    again = json.loads((out / "paper.json").read_text())
    assert again["negation"] == paper["negation"] and again["addition"] == paper["addition"]
    # --update: re-run negation alone (its control on validation + train rows); addition and analogy are kept, with their run's budget
    partial = ["-S", "bench.addition=null", "-S", "bench.analogy=null", "-S", "eval.max_rows.test=12", "-S", "search.control_splits=[validation, train]"]
    with pytest.raises(SystemExit) as exc:
        cli_main(["benchmark", "--config", str(config), "--out", str(tmp_path / "neg"), "--paper-json", str(committed), "--update", *partial])
    assert exc.value.code in (0, None), capsys.readouterr().err
    merged, rerun = json.loads(committed.read_text()), json.loads((tmp_path / "neg" / "paper.json").read_text())
    jsonschema.validate(merged, schema)
    assert merged["negation"] == rerun["negation"] != paper["negation"]
    assert merged["addition"] == paper["addition"] and merged["analogy"] == paper["analogy"]
    assert merged["kept"] == {name: {"budget": paper["budget"], "seconds_per_seed": paper["seconds_per_seed"], "device": paper["device"]} for name in ("addition", "analogy")}
    assert merged["budget"]["search"]["control_splits"] == ["validation", "train"] and merged["complete"] is True
    control = json.loads((tmp_path / "neg" / "seed-0" / "results.json").read_text())["meta"]["data"]["control"]["ctrl"]
    assert control["split"] == "validation+train" and control["rows_used"] == 64
    assert "(control: ≤ 2000 rows of validation + train)" in (tmp_path / "neg" / "results.md").read_text()
    assert {"negation/senti", "addition/sum", "analogy"} & set(merged["goals"]) >= {"negation/senti", "addition/sum"}
    # refused in one line, the committed file untouched: no --paper-json, other seeds, nothing to keep
    before = committed.read_text()
    for args, message in (
        ([], "give --paper-json"),
        (["--paper-json", str(committed), "-S", "bench.seeds=[0, 1]"], "run the same seeds"),
        (["--paper-json", str(tmp_path / "nothing.json")], "no summary to update"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(["benchmark", "--config", str(config), "--out", str(tmp_path / "neg"), "--aggregate", "--update", *partial, *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert committed.read_text() == before


def test_benchmark_writes_table_json_and_plots(bench_params, tmp_path):
    bench_params.bench.seeds = [0]
    out = tmp_path / "out"
    lines = []
    results = run_benchmark("inline", out, params=bench_params, log=lines.append)["seeds"][0]
    for name in ("results.md", "results.json", "paper.json", "negation.png", "addition.png", "analogy.png"):
        assert (out / name).is_file(), name
    assert (out / "seed-0" / "curves" / "addition-ties" / "curve.png").is_file()
    saved = json.loads((out / "seed-0" / "results.json").read_text())
    assert set(saved) == {"negation", "addition", "analogy", "meta"}
    neg = results["negation"]["senti"]["rows"]
    assert set(neg) == {"base", "fine-tuned (+τ)", "negated task vector (−λτ)", "random vector, same norm (−λr)", "gradient ascent"}
    # the chosen edits keep the control within max_control_drop (1 point) on validation, uncertainty included
    constraint = ControlConstraint({"ctrl": neg["base"]["validation"]["ctrl"]}, 1.0)
    search = results["negation"]["senti"]["searches"]["task_vector"]
    assert constraint.ok(search["best_metrics"]) and "feasible_found" in search["constraint"]
    assert constraint.ok(neg["gradient ascent"]["validation"])
    add = results["addition"]["rows"]
    assert {"sum", "ties", "dare", "dare_ties"} <= set(add)
    assert all(0.0 <= row["lambda"] <= 2.0 for name, row in add.items() if name in ("ties", "dare"))
    assert add["individual fine-tunes"]["mean_normalized_test"] == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert "## 1. Negation" in md and "## 2. Addition" in md and "## 3. Analogy" in md
    # a re-run reuses the cached fine-tunes and vectors and gives the same table
    lines.clear()
    again = run_benchmark("inline", out, params=bench_params, log=lines.append)["seeds"][0]
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


def test_committed_paper_json_is_a_complete_multi_seed_run_that_validates():
    """benchmarks/results/paper.json (`make paper`) holds ≥ 3 seeds, whole test sets up to 2,000 rows, and matches the schema."""
    paper = json.loads((REPO / "benchmarks" / "results" / "paper.json").read_text())
    jsonschema.validate(paper, json.loads((REPO / "benchmarks" / "results" / "paper.schema.json").read_text()))
    assert paper["complete"] is True and len(paper["seeds"]) >= 3 and not paper["budget"]["quick"]
    assert paper["budget"]["rows"]["test"] == 2000
    add = paper["addition"]["methods"]
    assert set(add) >= {"sum", "ties", "dare", "dare_ties"} and all(0 < m["mean_normalized"] <= 1.2 and "mean_normalized_ci95" in m for m in add.values())


def test_the_report_names_per_task_step_budgets():
    from benchmarks.paper.report import _steps_override

    assert _steps_override({"train_steps_override": {"yelp_lm": 600, "amazon_lm": 600, "sst2": 30}}) == " (sst2: 30 steps) (yelp_lm, amazon_lm: 600 steps)"
    assert _steps_override({"train_steps_override": {}}) == "" and _steps_override({}) == ""
