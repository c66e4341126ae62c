"""Tracking and process plumbing: orphan sweep, real step durations, DB templates, quiet env, child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    from pipeline.ops import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TASKVEC_DB_TEMPLATES", str(tmp_path / "templates"))
    mlflow_cfg = SimpleNamespace(tracking_uri="sqlite:///mlflow.db", artifact_root="mlartifacts", experiment="t", registered_model="m")
    return tracking.Tracker(SimpleNamespace(mlflow=mlflow_cfg, root=tmp_path))


def _dead_process() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_sweep_marks_runs_of_dead_processes_failed_and_leaves_live_ones(tracker):
    from pipeline.ops import tracking

    pid, started = _dead_process()
    host = tracking._host()
    dead = tracker.start("edit", tags={"taskvec.pid": str(pid), "taskvec.pid_started": f"{started:.2f}"})
    reused = tracker.start("edit", tags={"taskvec.pid": str(os.getpid()), "taskvec.pid_started": "12345.00"})  # our pid, another start time
    mine = tracker.start("edit")  # this live process
    other_host = tracker.start("edit", tags={"taskvec.host": host + "-elsewhere", "taskvec.pid": str(pid), "taskvec.pid_started": f"{started:.2f}"})
    finished = tracker.start("edit", tags={"taskvec.pid": str(pid), "taskvec.pid_started": f"{started:.2f}"})
    tracker.end(finished)

    swept = tracker.sweep_orphans()

    assert sorted(swept) == sorted([dead, reused])
    status = {r: tracker.client.get_run(r).info.status for r in (dead, reused, mine, other_host, finished)}
    assert status == {dead: "FAILED", reused: "FAILED", mine: "RUNNING", other_host: "RUNNING", finished: "FINISHED"}
    reason = tracker.client.get_run(dead).data.tags["taskvec.failed_reason"]
    assert reason.startswith(f"orphaned: process {pid} on {host} ")
    assert tracker.sweep_orphans() == []


def test_step_run_spans_the_measured_work(tracker):
    with tracker.run("compose", seconds=35.0) as run:
        run.metrics({"x": 1.0})
    info = tracker.client.get_run(run.run_id).info
    assert info.end_time - info.start_time == 35_000
    assert info.status == "FINISHED"


def test_lambda_table_keeps_lambda_as_a_column(tracker):
    import json

    with tracker.run("search") as run:
        run.table({"lambda": [-0.5, 0.25, 1.0], "objective": [0.1, 0.3, 0.2]}, "search/lambda_curve.json")
    path = tracker.client.download_artifacts(run.run_id, "search/lambda_curve.json")
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["lambda", "objective"] and [r[0] for r in table["data"]] == [-0.5, 0.25, 1.0]


def test_fresh_mlflow_store_is_seeded_from_the_template(tmp_path, monkeypatch):
    import sqlite3

    from pipeline.ops import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TASKVEC_DB_TEMPLATES", str(tmp_path / "templates"))
    cfg = SimpleNamespace(tracking_uri="sqlite:///mlflow.db", artifact_root="mlartifacts", experiment="t", registered_model="m")
    first = tracking.Tracker(SimpleNamespace(mlflow=cfg, root=tmp_path / "a"))
    template = tracking.mlflow_template_db()
    assert template.is_file()
    with sqlite3.connect(template) as db:
        assert db.execute("select count(*) from experiments").fetchone() == (0,)  # no Default, no pipeline experiment
    (tmp_path / "b").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    second = tracking.Tracker(SimpleNamespace(mlflow=cfg, root=tmp_path / "b"))
    names = {e.name: e.artifact_location for e in second.client.search_experiments()}
    assert set(names) == {"t", "Default"} and names["t"] == (tmp_path / "b" / "mlartifacts").as_uri()
    assert first.experiment_id == second.experiment_id == "1"
    run = second.start("edit")
    assert second.client.get_run(run).info.status == "RUNNING"


def _clean_env(**extra) -> dict:

    drop = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_DISABLE_PROGRESS_BARS"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.mark.parametrize("import_ops,expected", [(True, "True False"), (False, "False True")])
def test_pipeline_ops_turn_telemetry_and_loading_bars_off(import_ops, expected):
    code = ("import pipeline.ops.services; " if import_ops else "") + (
        "from mlflow.telemetry.utils import is_telemetry_disabled; from transformers.utils import logging; "
        "print(is_telemetry_disabled(), logging.is_progress_bar_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected


def test_child_dies_with_its_parent_even_on_sigkill(tmp_path):
    """A parent started through child_command's wrapper gets SIGKILLed; its child goes too."""
    pidfile = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        "from pipeline.ops.services import child_command\n"
        f"p = subprocess.Popen(child_command('http.server', '0', '--bind', '127.0.0.1'), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = psutil.Process(int(pidfile.read_text()))
        assert child.ppid() == parent.pid and child.is_running()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs([child], timeout=30)
        assert alive == [] and gone
    finally:
        if parent.poll() is None:
            parent.kill()
