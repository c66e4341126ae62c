"""`dvc repro` of the pipeline in a temporary git repo with a local remote; no-op re-run; push/pull; exp run -S."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest_pipeline import dvc_env, dvc_project, pipeline_env  # noqa: F401


def dvc(root, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_dvc_repro_reproduces_then_does_nothing(pipeline_env):
    root = dvc_project(pipeline_env / "repo", pipeline_env / "remote")
    first = dvc(root, "repro")
    for stage in ("finetune@senti", "finetune@topic", "extract@senti", "extract@topic", "compose", "search", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    assert (root / "dvc.lock").is_file()
    for out in ("outputs/model/taskvec.json", "outputs/model/README.md", "outputs/search/best.json", "outputs/metrics/evaluate.json", "outputs/registry/registered.json"):
        assert (root / out).is_file(), out
    registered = json.loads((root / "outputs/registry/registered.json").read_text())
    assert registered["version"] == "1"

    # an unchanged re-run does no work (and is quick)
    started = time.perf_counter()
    again = dvc(root, "repro")
    elapsed = time.perf_counter() - started
    assert "Running stage" not in again.stdout, again.stdout
    assert elapsed < 60, f"no-op dvc repro took {elapsed:.1f}s"
    print(f"no-op dvc repro: {elapsed:.1f}s")

    # the registered version carries the dvc.lock hashes of its inputs
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("tiny-edit", "1").tags
    lock_hashes = json.loads(tags["dvc.lock"])
    assert "outputs/model" in lock_hashes and "outputs/vectors/senti.safetensors" in lock_hashes
    assert tags["prefect.flow_run_id"] == "none" and len(tags["git.commit"]) == 40

    # push to the local remote, lose the outputs, pull them back
    dvc(root, "push")
    assert any((pipeline_env / "remote").rglob("*"))
    model_hash = json.loads((root / "outputs/model/taskvec.json").read_text())["output_hash"]
    shutil.rmtree(root / "outputs" / "model")
    shutil.rmtree(root / ".dvc" / "cache")
    dvc(root, "pull")
    assert json.loads((root / "outputs/model/taskvec.json").read_text())["output_hash"] == model_hash
    status = dvc(root, "status")
    assert "up to date" in status.stdout.lower(), status.stdout

    # an experiment with a changed search parameter re-runs only search and what follows
    exp = dvc(root, "exp", "run", "-S", "search.grid_points=3")
    assert "Running stage 'search'" in exp.stdout and "Running stage 'finetune" not in exp.stdout, exp.stdout
    assert "Running stage 'extract" not in exp.stdout
