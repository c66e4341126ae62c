"""Killing `taskvec run` (SIGKILL, SIGTERM, SIGINT) mid fine-tune leaves no process behind; orphaned MLflow runs are swept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest_pipeline import pipeline_env, tiny_project  # noqa: F401

TASKVEC = str(Path(sys.executable).parent / "taskvec")


def _set_steps(pf: Path, steps: int) -> None:
    raw = yaml.safe_load(pf.read_text())
    raw["train"]["steps"] = steps
    pf.write_text(yaml.safe_dump(raw, sort_keys=False))


def _edit_runs(project: Path) -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("taskvec-test")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'edit'", order_by=["attributes.start_time ASC"])
    return runs


def _ours(pf: Path) -> list[psutil.Process]:
    """Every process on the machine working on this test's project (whatever its parent now is)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(pf) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _start(pf: Path) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, TASKVEC_PROGRESS_EVERY_S="0")
    proc = subprocess.Popen([TASKVEC, "run", "--params", str(pf), "--no-dvc", "--no-register"], cwd=pf.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killing_taskvec_run_leaves_no_process_and_no_running_mlflow_run(tiny_project, sig):
    pf = tiny_project / "params.yaml"
    _set_steps(pf, 1_000_000)  # a fine-tune that is surely running when the signal comes
    proc, lines = _start(pf)
    try:
        deadline = time.monotonic() + 600
        while True:  # wait until a fine-tune runs and has reported progress on the console
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "no fine-tune progress: " + "".join(lines)[-4000:]
            family = psutil.Process(proc.pid).children(recursive=True)
            finetunes = [p for p in family if "pipeline.steps.finetune" in " ".join(p.cmdline())]
            if finetunes and any("step=" in ln for ln in lines):
                break
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in family), "the Prefect API server is a child of taskvec run"
        os.kill(proc.pid, sig)
        proc.wait(timeout=180)
        _, alive = psutil.wait_procs(family, timeout=60)
        assert alive == [], [" ".join(p.cmdline())[:200] for p in alive]
        assert _ours(pf) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in _ours(pf):
            p.kill()
    assert any("finetune senti: step=" in ln or "finetune topic: step=" in ln for ln in lines), "".join(lines)[-3000:]
    assert not any("Loading weights" in ln for ln in lines)
    assert not (tiny_project / "outputs" / "finetuned" / "senti").exists()  # the killed fine-tune swapped nothing in

    (killed,) = _edit_runs(tiny_project)
    if sig != signal.SIGKILL:
        # a catchable signal: the flow unwound and ended its run
        assert killed.info.status == "FAILED", killed.info.status
        return
    assert killed.info.status == "RUNNING"  # nobody could end it
    # the next start marks it FAILED, saying why, and runs normally
    _set_steps(pf, 2)
    again, out = _start(pf)
    assert again.wait(timeout=900) == 0, "".join(out)[-4000:]
    first, second = _edit_runs(tiny_project)
    assert first.info.run_id == killed.info.run_id
    assert first.info.status == "FAILED" and first.data.tags["taskvec.failed_reason"].startswith(f"orphaned: process {proc.pid} ")
    assert second.info.status == "FINISHED"
    assert any("orphaned MLflow run" in ln for ln in out)
    # a whole run's console: fine-tune progress lines, no "Loading weights" bars, no telemetry errors
    assert any("finetune senti: step=2/2 done" in ln for ln in out), "".join(out)[-3000:]
    assert not any("Loading weights" in ln or "telemetry" in ln.lower() for ln in out), "".join(out)[-3000:]
