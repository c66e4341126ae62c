"""A control task scored on rows of several splits (``search.control_splits``): loading, scoring, refusals.

The bound a λ search puts on a control's drop shrinks with its rows; a control
whose train split no vector of the edit learned from is held-out data too, so
``search.control_splits: [validation, train]`` scores it there.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from taskvec.config import SearchSpec, control_splits_conflict, parse_params
from taskvec.data import load_rows, load_split
from taskvec.errors import TaskvecError
from taskvec.evaluate import predict
from taskvec.search_run import CONTROL_SET, SuiteMetrics, control_sets
from taskvec.suite import Suite
from tests.conftest_tasks import LABELS, assert_bound_rule, data_dir, negation_search, tiny_model, write_mirror  # noqa: F401 - fixtures

CLS = {"labels": LABELS, "descriptions": ["bad", "good"]}


def _csv_rows(path):
    with path.open(newline="", encoding="utf-8") as handle:
        return [(r["text"], LABELS.index(r["label"])) for r in csv.DictReader(handle)]


@pytest.fixture
def two_tasks(data_dir, tiny_model):
    write_mirror(data_dir / "ctrl", sizes=(40, 12, 8), seed=50)
    return parse_params({
        "base": str(tiny_model), "data_dir": str(data_dir),
        "tasks": {"senti": {"source": "senti", **CLS}, "ctrl": {"source": "ctrl", **CLS}},
        "eval": {"batch_size": 8, "max_length": 16, "max_rows": {"validation": 8}},
    })


def test_rows_of_two_splits_are_their_union_and_a_cap_a_seeded_subset(two_tasks, data_dir):
    spec = two_tasks.task("ctrl")
    files = {s: _csv_rows(data_dir / "ctrl" / f"{s}.csv") for s in ("validation", "train")}
    whole = load_rows(spec, data_dir, ["validation", "train"])
    got = list(zip(whole.dataset["text"], whole.dataset["label"], strict=True))
    assert got == files["validation"] + files["train"]  # in the order given, every row once
    assert whole.name == "validation+train" and whole.rows_total == 52
    parts = [load_split(spec, data_dir, s) for s in ("validation", "train")]
    assert whole.lineage()["sha256"] not in {p.digest for p in parts} and whole.lineage()["rows_used"] == 52
    assert whole.lineage()["origin"] == [p.origin for p in parts]  # each file named, so a project-relative rewrite can reach it
    capped = load_rows(spec, data_dir, ["validation", "train"], max_rows=20, seed=3)
    rows = list(zip(capped.dataset["text"], capped.dataset["label"], strict=True))
    assert len(rows) == 20 and len(set(rows)) == 20 and set(rows) <= set(got)
    again = load_rows(spec, data_dir, ["validation", "train"], max_rows=20, seed=3)
    assert list(again.dataset["text"]) == list(capped.dataset["text"])  # deterministic
    assert list(load_rows(spec, data_dir, ["validation"]).dataset["text"]) == [t for t, _ in files["validation"]]  # one split: load_split
    with pytest.raises(TaskvecError, match="no split given"):
        load_rows(spec, data_dir, [])


def test_the_suite_scores_the_control_on_its_own_eval_set(two_tasks, data_dir):
    spec = two_tasks.search.model_copy(update={"control_splits": ["validation", "train"], "control_rows": None})
    where, sets = control_sets(spec, ["ctrl"])
    assert where == CONTROL_SET
    suite = Suite.load(two_tasks.base, ["senti", "ctrl"], two_tasks, splits=("validation",), **sets)
    assert len(suite.sets["control"]["ctrl"].labels) == 52 and set(suite.sets["control"]) == {"ctrl"}  # only the control
    assert len(suite.sets["validation"]["ctrl"].labels) == 8 and len(suite.sets["validation"]["senti"].labels) == 8  # targets keep theirs
    measure = SuiteMetrics(suite, "validation", ["senti"], ["ctrl"], control_split=where)
    evalset = suite.sets["control"]["ctrl"]
    by_hand = float(np.mean(predict(suite.models["ctrl"], evalset) == evalset.labels))
    assert measure.base["ctrl"] == by_hand
    assert measure.base["senti"] == suite.accuracies("validation", ["senti"])["senti"]
    # without control_splits: the search split, as before
    assert control_sets(two_tasks.search, ["ctrl"]) == ("validation", {"task_rows": {"validation": {"ctrl": 2000}}})
    assert control_sets(spec, [])[0] == "validation"


def test_search_command_bounds_the_control_on_validation_and_train_rows(two_tasks, tiny_model, data_dir, tmp_path, capsys):
    """`taskvec search -S 'search.control_splits=[validation, train]'`: 52 control rows, feasibility recomputed from search.json."""
    saved = negation_search(tiny_model, data_dir, tmp_path, capsys, "--max-control-drop", "5", "-S", "search.control_splits=[validation, train]", "-S", "search.control_rows=null")
    assert saved["data"]["ctrl"]["split"] == "validation+train" and saved["data"]["ctrl"]["rows_used"] == 52
    assert saved["data"]["senti"]["split"] == "validation" and saved["data"]["senti"]["rows_used"] == 8
    for e in saved["evaluations"]:
        assert round(e["metrics"]["ctrl"] * 52) == pytest.approx(e["metrics"]["ctrl"] * 52)  # a fraction of 52 rows
    assert_bound_rule(saved, "ctrl", 5.0)


@pytest.mark.parametrize("value, message", [
    ([], "control_splits must name validation and/or train"),
    (["train", "train"], "control_splits must name validation and/or train"),
    (["test"], "control_splits"),
])
def test_bad_control_splits_are_refused(value, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        SearchSpec(control_splits=value)


def test_a_control_whose_vector_the_edit_uses_is_not_scored_on_its_train_rows():
    spec = SearchSpec(control_splits=["validation", "train"])
    assert control_splits_conflict(spec, ["ctrl"], ["senti"]) is None
    assert control_splits_conflict(SearchSpec(control_splits=["validation"]), ["ctrl"], ["ctrl"]) is None
    assert "vector of control task 'ctrl'" in control_splits_conflict(spec, ["ctrl"], ["senti", "ctrl"])


def test_pipeline_and_benchmark_refuse_train_rows_of_a_learned_control(tiny_model, data_dir):
    from benchmarks.paper.spec import ExperimentParams
    from pipeline.params import PipelineParams

    write_mirror(data_dir / "ctrl", sizes=(40, 12, 8), seed=50)
    tasks = {"senti": {"source": "senti", **CLS}, "ctrl": {"source": "ctrl", **CLS}}
    common = {"base": str(tiny_model), "data_dir": str(data_dir), "tasks": tasks, "search": {"control_splits": ["validation", "train"]}}
    # analogy c = ctrl: the edit adds τ_ctrl, fine-tuned on ctrl's train rows
    plan = {"learn": ["senti"], "control": ["ctrl"], "analogies": [{"a": "senti", "b": "senti", "c": "ctrl"}]}
    with pytest.raises(TaskvecError, match="vector of control task 'ctrl'"):
        parse_params(common | {"finetune": {"tasks": ["senti", "ctrl"]}, "edit": plan}, model=PipelineParams)
    ok = parse_params(common | {"finetune": {"tasks": ["senti"]}, "edit": {"learn": ["senti"], "control": ["ctrl"]}}, model=PipelineParams)
    assert ok.search.control_splits == ["validation", "train"]
    with pytest.raises(TaskvecError, match="vector of control task 'ctrl'"):
        parse_params(common | {"bench": {"negation": {"targets": ["senti", "ctrl"], "control": "ctrl"}}}, model=ExperimentParams)
