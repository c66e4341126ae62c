"""The main job on a real Dask cluster (a ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1).

``taskvec run`` with ``TASKVEC_DASK_ADDRESS`` submits the edit flow's tasks through
``prefect_dask.DaskTaskRunner``; ``runner.finetune_resources: {GPU: 1}`` routes the fine-tunes
to the worker started with ``--resources GPU=1``. The outputs and the registered version
must equal those of the same project run locally (Prefect's thread pool). The local run's
store is then opened with ``mlflow ui``, as a user would, and its training runs listed
through the UI server's REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest_pipeline import dvc_env, write_project
from tests.conftest_store import dask_cluster, free_port, http_ok, service, tool

TASKVEC = str(Path(sys.executable).with_name("taskvec"))
STEPS = {"finetune/senti", "finetune/topic", "extract/senti", "extract/topic", "compose", "search", "evaluate", "register"}


def project(root: Path) -> Path:
    write_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["runner"] = {"finetune_resources": {"GPU": 1}}  # ignored by the thread pool, honoured by Dask
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def same_project(like: Path, root: Path) -> Path:
    """Another checkout of ``like``'s project: the same params.yaml (so the same base and data folders)."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_bytes((like / "params.yaml").read_bytes())
    return root


def job_env(home: Path) -> dict[str, str]:
    env = {**dvc_env(), "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "TASKVEC_DASK_ADDRESS", "TASKVEC_TASK_RUNNER"):
        env.pop(var, None)
    return env


def run_job(root: Path, env: dict) -> dict:
    proc = subprocess.run([TASKVEC, "run", "--params", "params.yaml", "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"taskvec run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def client(root: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def step_runs(root: Path, parent: str) -> dict[str, object]:
    c = client(root)
    exp = c.get_experiment_by_name("taskvec-test")
    return {r.info.run_name: r for r in c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}


def outputs(root: Path) -> dict[str, bytes]:
    """Every output file except Prefect's result cache and the registry record (run ids)."""
    base = root / "outputs"
    return {f.relative_to(base).as_posix(): f.read_bytes() for f in sorted(base.rglob("*")) if f.is_file() and f.relative_to(base).parts[0] not in (".prefect", "registry")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-run")
    root = project(tmp / "project")
    return root, run_job(root, job_env(tmp / "prefect-home"))


@pytest.mark.slow
def test_main_job_on_a_dask_cluster_equals_the_local_run(local_run, tmp_path):
    local_root, local = local_run
    root = same_project(local_root, tmp_path / "project")
    elsewhere = tmp_path / "workers-cwd"  # workers run in another folder, as on another machine sharing the checkout
    elsewhere.mkdir()
    cluster_env = {k: v for k, v in job_env(tmp_path / "worker-prefect-home").items() if k != "PATH"}
    with dask_cluster(tmp_path, [["--resources", "GPU=1"], []], env=cluster_env, cwd=elsewhere) as address:
        env = {**job_env(tmp_path / "prefect-home"), "TASKVEC_DASK_ADDRESS": address}
        remote = run_job(root, env)

    assert set(remote["states"]) == STEPS and all(s == "Completed" for s in remote["states"].values()), remote["states"]
    # the same bits: weights, vectors, composed vector, λ, metrics, model card
    assert remote["output_hash"] == local["output_hash"] and remote["lambda"] == local["lambda"]
    mine, theirs = outputs(root), outputs(local_root)
    assert sorted(mine) == sorted(theirs)
    assert [k for k in mine if mine[k] != theirs[k]] == []
    # the same registration
    assert (remote["registered"]["model"], remote["registered"]["version"]) == ("tiny-edit", "1")
    tags = client(root).get_model_version("tiny-edit", "1").tags
    local_tags = client(local_root).get_model_version("tiny-edit", "1").tags
    for key in ("taskvec.ledger", "taskvec.output_hash", "taskvec.edits", "taskvec.composition", "params.sha256", "data.digests"):
        assert tags[key] == local_tags[key], key

    # every step ran on a Dask worker; the fine-tunes on the one with the GPU resource
    where = {name: run.data.tags.get("taskvec.worker") for name, run in step_runs(root, remote["mlflow_run_id"]).items()}
    assert set(where) == STEPS and set(where.values()) <= {"w0", "w1"}, where
    assert where["finetune/senti"] == where["finetune/topic"] == "w0", where
    local_where = {name: run.data.tags.get("taskvec.worker") for name, run in step_runs(local_root, local["mlflow_run_id"]).items()}
    assert set(local_where.values()) == {"local"}, local_where


def api(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_ui_opens_on_the_projects_training_runs(local_run, tmp_path):
    """`mlflow ui --backend-store-uri sqlite:///mlflow.db`, run in the project folder, as README says."""
    root, summary = local_run
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [tool("mlflow"), "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with service(cmd, tmp_path / "mlflow-ui.log", lambda: http_ok(f"{url}/health"), cwd=root, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        exps = api(url, "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        exp = next(e for e in exps if e["name"] == "taskvec-test")
        assert exp["artifact_location"] == (root / "mlartifacts").resolve().as_uri()
        runs = api(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert STEPS | {"edit"} <= set(by_name), sorted(by_name)
        ft = by_name["finetune/senti"]
        assert {m["key"] for m in ft["data"]["metrics"]} >= {"final_loss", "train_loss"}
        arts = json.loads(urllib.request.urlopen(f"{url}/api/2.0/mlflow/artifacts/list?run_id={by_name['search']['info']['run_id']}&path=search", timeout=30).read())
        assert "search/curve.png" in {f["path"] for f in arts["files"]}
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/registered-models/get?name=tiny-edit", timeout=30) as r:
            model = json.loads(r.read())["registered_model"]
        assert any(a["alias"] == "challenger" for a in model.get("aliases", [])), model
        assert summary["registered"]["version"] == "1"
