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


@pytest.mark.slow
def test_flow_never_reuses_a_cached_result_for_outputs_an_experiment_rewrote(pipeline_env):
    """The issue's sequence: taskvec run; dvc exp run -S …; git checkout params.yaml; taskvec run.

    The second flow run must not take the cache hits of the first for the
    search/evaluate/register outputs the experiment rewrote: it re-runs them,
    reports the λ and weights of params.yaml, and dvc.lock ends up describing
    params.yaml and the files on disk.
    """
    import yaml
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.edit import edit

    root = dvc_project(pipeline_env / "repo", pipeline_env / "remote")
    params = yaml.safe_load((root / "params.yaml").read_text())  # project-relative paths, as the shipped params.yaml
    params["base"], params["data_dir"] = "tiny-base", "data"
    for t in params["tasks"]:
        params["tasks"][t]["source"] = f"example/{t}"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qam", "relative params"], cwd=root, check=True)
    pf = str(root / "params.yaml")

    with prefect_test_harness(server_startup_timeout=180):
        first = edit(pf)
        assert first["dvc"]["final"].get("commit") == 0, first["dvc"]
        lam = first["lambda"]
        change = "search.lambda_max=0.25" if lam >= 0.5 else "search.lambda_min=0.75"
        exp = dvc(root, "exp", "run", "-S", change)
        assert "Running stage 'search'" in exp.stdout and "Running stage 'finetune" not in exp.stdout, exp.stdout
        stale = json.loads((root / "outputs/model/taskvec.json").read_text())["output_hash"]
        stale_version = json.loads((root / "outputs/registry/registered.json").read_text())["version"]
        assert json.loads((root / "outputs/search/best.json").read_text())["lambda"] != lam and stale != first["output_hash"]
        subprocess.run(["git", "checkout", "params.yaml"], cwd=root, check=True)
        second = edit(pf)
        on_disk = json.loads((root / "outputs/model/taskvec.json").read_text())["output_hash"]
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        status = dvc(root, "status").stdout.lower()
        # the same change as a `taskvec run -S` override: runs on the effective params, commits nothing to DVC
        lock_before, params_before = (root / "dvc.lock").read_bytes(), (root / "params.yaml").read_bytes()
        third = edit(pf, register_model=False, overrides=[change])

    states = second["states"]
    assert all(states[s] == "Cached" for s in ("finetune/senti", "finetune/topic", "extract/senti", "extract/topic", "compose")), states
    assert all(states[s] == "Completed" for s in ("search", "evaluate", "register")), states
    assert second["lambda"] == lam and second["output_hash"] == first["output_hash"]
    assert on_disk == first["output_hash"]
    reg = second["registered"]
    assert reg["output_hash"] == first["output_hash"] and reg["version"] not in (first["registered"]["version"], stale_version)
    assert lock["stages"]["search"]["params"]["params.yaml"]["search"] == params["search"]
    assert "up to date" in status, status

    assert (root / "dvc.lock").read_bytes() == lock_before and (root / "params.yaml").read_bytes() == params_before
    assert "commit" not in third["dvc"] and "commit" not in third["dvc"]["final"], third["dvc"]
    assert third["params_file"] == str(root / ".taskvec-run-params.yaml") and third["overrides"] == [change]
    assert third["lambda"] != lam and third["states"]["search"] == "Completed" and third["states"]["compose"] == "Cached"
    assert json.loads((root / "outputs/search/best.json").read_text())["lambda"] == third["lambda"]

    # MLflow params and dataset sources name no absolute path
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parent = client.get_run(third["mlflow_run_id"])
    key, value = change.split("=")
    assert parent.data.tags["taskvec.overrides"] == change and float(parent.data.params[key]) == float(value)
    sources = []
    for run in client.search_runs(exp_ids):
        assert not any(str(pipeline_env) in str(v) for v in run.data.params.values()), run.data.params
        sources += [d.dataset.source for d in run.inputs.dataset_inputs]
    assert sources and not any(str(pipeline_env) in s for s in sources), sources
