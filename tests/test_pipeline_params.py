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
    data["search"]["control_threshold"] = 0.95
    p = P.load(_write(tmp_path, data))
    obj = edit_objective(p, base={"senti": 0.5, "topic": 0.8, "spam": 0.8}, ft={"senti": 0.9})
    acc = {"senti": 0.72, "topic": 0.6, "spam": 0.78}
    assert obj.value(acc) == pytest.approx(0.72 / 0.9 - 0.6 / 0.8)
    assert obj.feasible(acc)  # 0.78 >= 0.95 * 0.8
    assert not obj.feasible({"senti": 0.9, "topic": 0.6, "spam": 0.75})  # 0.75 < 0.76
    assert obj.key({"senti": 0.9, "topic": 0.6, "spam": 0.75}) == float("-inf")


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
