"""Pipeline params, redaction, step CLIs' error contract and small helpers (fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import params as P
from pipeline.ops import tracking
from taskvec.errors import TaskvecError
from tests.conftest_pipeline import REPO, pipeline_env, tiny_project, write_project  # noqa: F401


def test_default_params_file_is_valid():
    p = P.load(REPO / "params.yaml")
    assert p.edit.signed_tasks() == [(t, 1.0) for t in p.edit.learn] + [(t, -1.0) for t in p.edit.forget]
    assert set(p.edit.vector_tasks()) <= set(p.finetune.tasks)
    assert p.mlflow.tracking_uri.startswith("sqlite:///")


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path):
    write_project(tmp_path / "proj")
    return yaml.safe_load((tmp_path / "proj" / "params.yaml").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["edit"].update(colour="red"), "edit.colour: Extra inputs are not permitted"),
        (lambda d: d["edit"].update(learn=["nope"]), "task 'nope' is used by the edit plan"),
        (lambda d: d["finetune"].update(tasks=["senti"]), "add it to finetune.tasks"),
        (lambda d: d["edit"].update(method="ties", drop=0.5), "drop applies to dare"),
        (lambda d: d["mlflow"].update(tracking="x"), "mlflow.tracking: Extra inputs"),
        (lambda d: d["edit"].update(learn=[], forget=[]), "the edit plan is empty"),
    ],
)
def test_bad_params_are_one_line_errors(tmp_path, change, message):
    data = _base(tmp_path)
    change(data)
    with pytest.raises(TaskvecError) as exc:
        P.load(_write(tmp_path, data))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_analogy_and_negation_compose_signs(tmp_path):
    data = _base(tmp_path)
    data["edit"] = {"learn": ["senti"], "forget": ["topic"], "analogies": [{"a": "topic", "b": "senti", "c": "senti", "target": "spam"}], "control": []}
    p = P.load(_write(tmp_path, data))
    assert p.edit.signed_tasks() == [("senti", 1.0), ("topic", -1.0), ("senti", 1.0), ("senti", 1.0), ("topic", -1.0)]
    assert p.edit.target_tasks() == ["senti", "spam"]
    assert p.edit.vector_tasks() == ["senti", "topic"]


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("postgresql://root:s3cret@127.0.0.1:5432/test", "postgresql://root:***@127.0.0.1:5432/test"),
        ("https://user:tok@mlflow.example.com/api", "https://user:***@mlflow.example.com/api"),
        ("http://h/x?token=abc&b=1", "http://h/x?token=***&b=1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redact(raw, shown):
    assert tracking.redact(raw) == shown
    assert "s3cret" not in tracking.redact(f"store {raw} failed")


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_project(tmp_path / "proj")
    p = P.load(tmp_path / "proj" / "params.yaml")
    assert tracking.resolve_tracking_uri(p) == f"sqlite:///{(tmp_path / 'proj' / 'mlflow.db').resolve()}"
    assert tracking.artifact_location(p, "sqlite:///x.db") == (tmp_path / "proj" / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@localhost:5000")
    assert tracking.resolve_tracking_uri(p) == "http://u:pw@localhost:5000"
    assert tracking.artifact_location(p, "http://localhost:5000") is None


@pytest.mark.parametrize("step, extra", [("extract", ["--task", "nope"]), ("extract", ["--task", "senti"]), ("compose", []), ("search", []), ("evaluate", []), ("register", [])])
def test_step_bad_input_is_one_line_and_writes_nothing(tiny_project, step, extra):
    proc = subprocess.run([sys.executable, "-m", f"pipeline.steps.{step}", "--params", str(tiny_project / "params.yaml"), *extra], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tiny_project / "outputs").exists() or not any((tiny_project / "outputs").rglob("*.safetensors"))
    assert not (tiny_project / "mlflow.db").exists()


def test_missing_params_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.steps.compose", "--params", str(tmp_path / "nope.yaml")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: params file not found")


def test_edit_objective_mixes_learn_forget_and_control(tmp_path):
    from pipeline.steps.search import edit_objective

    data = _base(tmp_path)
    data["edit"] = {"learn": ["senti"], "forget": ["topic"], "control": ["spam"]}
    data["search"]["max_control_drop"] = 2.0
    p = P.load(_write(tmp_path, data))
    obj = edit_objective(p, base={"senti": 0.5, "topic": 0.8, "spam": 0.8}, ft={"senti": 0.9})
    acc = {"senti": 0.72, "topic": 0.6, "spam": 0.78}
    assert obj.value(acc) == pytest.approx(0.72 / 0.9 - 0.6 / 0.8)
    assert obj.feasible(acc)  # exactly 2 points lost, no uncertainty reported
    assert not obj.feasible(acc | {"spam/drop_se": 0.001})  # 2 + 1.645 × 0.1 points > 2
    assert obj.feasible({"senti": 0.9, "topic": 0.6, "spam": 0.79, "spam/drop_se": 0.005})  # 1 + 0.82 ≤ 2
    assert obj.key({"senti": 0.9, "topic": 0.6, "spam": 0.775}) == float("-inf")
    assert obj.fallback == 0.0 and obj.constraint.max_drop == 2.0


def test_dvc_lock_hashes(tmp_path):
    from pipeline.ops.registry import dvc_lock_hashes

    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "evaluate": {"cmd": "x", "deps": [{"path": "pipeline/steps/evaluate.py", "md5": "c0"}, {"path": "outputs/edit", "md5": "e1.dir"}], "outs": [{"path": "outputs/model", "md5": "m1.dir"}]},
        "finetune@a": {"cmd": "y", "deps": [{"path": "../shared/data/a", "md5": "d1.dir"}], "outs": [{"path": "outputs/finetuned/a", "md5": "f1.dir"}]},
        "register": {"cmd": "z", "outs": [{"path": "outputs/registry/registered.json", "md5": "r"}]},
    }}))
    hashes, sha = dvc_lock_hashes(tmp_path)
    assert hashes == {"../shared/data/a": "d1.dir", "outputs/edit": "e1.dir", "outputs/finetuned/a": "f1.dir", "outputs/model": "m1.dir"}
    assert len(sha) == 64
    assert dvc_lock_hashes(tmp_path / "none") == ({}, None)


# ---------------------------------------------------------------------------
# One schema for every command: the shipped params.yaml through the full `taskvec`


def test_shipped_params_need_the_pipeline_schema():
    from taskvec.config import Params, load_params

    p = load_params(REPO / "params.yaml", model=P.PipelineParams)
    assert p.finetune.tasks == ["sst2", "agnews"] and p.promotion.max_control_drop == 1.0 and p.runner.kind == "default"
    with pytest.raises(TaskvecError, match=r"params.yaml: finetune: Extra inputs are not permitted$"):
        load_params(REPO / "params.yaml", model=Params)


def test_taskvec_evaluate_accepts_the_shipped_params(capsys, monkeypatch):
    """README's `taskvec evaluate …` for real (MiniLM, 8 rows of the sst2 mirror) with the repo's params.yaml."""
    from pipeline.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "sentence-transformers/all-MiniLM-L6-v2", "--task", "sst2", "--max-rows", "8"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert out.startswith("sst2 validation: accuracy ") and out.rstrip().endswith("n 8"), out


def test_taskvec_finetune_and_search_accept_the_shipped_params(tmp_path, capsys, monkeypatch):
    """Argument parsing and params validation of `taskvec finetune` / `taskvec search` (the heavy work stubbed)."""
    from types import SimpleNamespace

    import taskvec.search_run
    import taskvec.train
    import taskvec.vector
    from pipeline.cli import main

    seen = []

    def fake_finetune(task, params, out, *, base=None, steps=None, progress=True, **kw):
        seen.append(("finetune", task, type(params), steps))
        return SimpleNamespace(out_dir=out, manifest={"train": {"steps": steps}}, seconds=0.0, losses=[])

    def fake_search(base, vectors, objective, tasks, params, **kw):
        seen.append(("search", tuple(tasks), type(params), params.search.strategy))
        return SimpleNamespace(best_lambda=0.5, best_score=0.9, evaluations=[1], seconds=0.0, note=None)

    monkeypatch.setattr(taskvec.train, "finetune", fake_finetune)
    monkeypatch.setattr(taskvec.search_run, "run_search", fake_search)
    monkeypatch.setattr(taskvec.search_run, "write_outputs", lambda result, out: None)
    monkeypatch.setattr(taskvec.vector.TaskVector, "load", classmethod(lambda cls, path: SimpleNamespace(tensors={})))
    monkeypatch.chdir(REPO)
    for argv in (
        ["finetune", "sst2", "-o", str(tmp_path / "ft"), "--steps", "20"],
        ["search", "base", "--vector", "v.safetensors", "--objective", "addition", "--task", "sst2", "-o", str(tmp_path / "s")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, capsys.readouterr().err
    assert seen == [("finetune", "sst2", P.PipelineParams, 20), ("search", ("sst2",), P.PipelineParams, "golden")]


def test_default_promotion_evaluator_reads_a_pipeline_params_file(tiny_project):
    """The evaluator behind `taskvec promote` validates the project's params.yaml (pipeline sections and all)."""
    from pipeline.ops.promotion import default_evaluator

    scores = default_evaluator(tiny_project / "tiny-base", params_file=tiny_project / "params.yaml")
    assert set(scores) == {"senti", "topic", "spam"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())


# ---------------------------------------------------------------------------
# Contradictory edit plans (issue 11)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"learn": ["senti"], "control": ["senti"]}, "task 'senti' is listed in both edit.learn and edit.control"),
        ({"learn": ["senti"], "forget": ["senti"]}, "task 'senti' is listed in both edit.learn and edit.forget"),
        ({"forget": ["topic"], "control": ["topic"]}, "task 'topic' is listed in both edit.forget and edit.control"),
        ({"learn": ["senti", "topic", "senti"]}, "task 'senti' is listed twice in edit.learn"),
        ({"forget": ["topic", "topic"]}, "task 'topic' is listed twice in edit.forget"),
        ({"learn": ["senti"], "control": ["spam", "spam"]}, "task 'spam' is listed twice in edit.control"),
        ({"analogies": [{"a": "topic", "b": "senti", "c": "senti", "target": "spam"}], "control": ["spam"]}, "task 'spam' is listed in both edit.control and edit.analogies[0].target"),
    ],
)
def test_contradictory_plans_are_refused_at_load(tmp_path, edit, message):
    data = _base(tmp_path)
    data["edit"] = edit
    path = _write(tmp_path, data)
    with pytest.raises(TaskvecError) as exc:
        P.load(path)
    assert str(exc.value) == f"{path}: edit: {message}: give each task one role, once"


def test_learned_task_may_also_be_an_analogy_target(tmp_path):
    data = _base(tmp_path)
    data["edit"] = {"learn": ["senti"], "analogies": [{"a": "topic", "b": "senti", "c": "senti", "target": "senti"}, {"a": "senti", "b": "topic", "c": "topic", "target": "senti"}]}
    assert P.load(_write(tmp_path, data)).edit.target_tasks() == ["senti"]


# ---------------------------------------------------------------------------
# Each step parses params.yaml once per process


def test_each_step_parses_params_once(tiny_project, monkeypatch):
    from collections import OrderedDict

    from pipeline.steps import compose, evaluate, extract, finetune, search
    from taskvec import config

    parses, loads = [], []
    real_parse, real_load = config._parse_yaml, config.load_params
    monkeypatch.setattr(config, "_parse_yaml", lambda path, text: parses.append(path) or real_parse(path, text))
    monkeypatch.setattr(P, "load_params", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    from pipeline.ops import tracking
    from tasks.common import tracker_for

    monkeypatch.setattr(tracking, "Tracker", lambda p: p)  # the Prefect task's tracker, without MLflow
    params_file = str(tiny_project / "params.yaml")
    steps = [(finetune.main, {"task": "senti"}), (finetune.main, {"task": "topic"}), (extract.main, {"task": "senti"}), (extract.main, {"task": "topic"}), (compose.main, {}), (search.main, {}), (evaluate.main, {})]
    for step, kw in steps:
        monkeypatch.setattr(config, "_MEMO", OrderedDict())  # a fresh process
        parses.clear()
        loads.clear()
        step(params_file, **kw)  # what the DVC stage runs …
        assert isinstance(tracker_for(params_file), P.PipelineParams)  # … and the Prefect task adds
        assert len(loads) >= 2 and len(parses) == 1, (step.__module__, len(loads), len(parses))
    assert (tiny_project / "outputs" / "metrics").is_dir()  # the steps really ran


def test_a_file_without_edit_plan_serves_core_commands_not_the_pipeline(tmp_path):
    """Core commands under the full app accept a tasks-only file; pipeline steps refuse it (no silent default plan)."""
    from taskvec.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("tasks:\n  toy: {source: x, labels: [a, b]}\n")
    p = load_params(path, model=P.PipelineParams)
    assert list(p.tasks) == ["toy"] and "edit" not in p.model_fields_set
    with pytest.raises(TaskvecError) as exc:
        P.load(path)
    assert str(exc.value) == f"{path}: edit: the pipeline needs an edit plan: give edit.learn, edit.forget or edit.analogies"
    path.write_text("tasks:\n  toy: {source: x, labels: [a, b]}\nfinetune: {tasks: [nope]}\n")
    with pytest.raises(TaskvecError, match="task 'nope' is used by the edit plan or finetune.tasks but not declared"):
        load_params(path, model=P.PipelineParams)


def test_effective_params_parse_the_file_once(tmp_path, monkeypatch):
    from taskvec import config

    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text() + "\n# a fresh copy: not in the memo\n")
    calls = []
    real = config._parse_yaml
    monkeypatch.setattr(config, "_parse_yaml", lambda path, text: calls.append(path) or real(path, text))
    out = Path(P.effective_params(params_file, ["train.steps=3"]))
    assert len(calls) == 1, calls
    written = yaml.safe_load(out.read_text())
    assert written["train"]["steps"] == 3 and P.load(out).train.steps == 3
    assert {k: v for k, v in written.items() if k != "train"} == {k: v for k, v in yaml.safe_load(params_file.read_text()).items() if k != "train"}
