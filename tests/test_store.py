"""The main job against a real S3-compatible object store, then everything pulled back on a fresh clone.

A ``moto_server`` process (S3 API over HTTP on 127.0.0.1) stands in for the MinIO of
``infra/compose.yaml``; ``mlflow server --artifacts-destination s3://mlflow/artifacts
--serve-artifacts`` (with ``MLFLOW_S3_ENDPOINT_URL``) is compose's MLflow; the DVC remote is
``s3://dvc/store`` with ``endpointurl``. ``taskvec run`` runs the tiny project against both;
a ``git clone`` elsewhere then gets the outputs with ``dvc pull`` and the registered model
from the artifact store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest_pipeline import dvc_env, dvc_project, pipeline_env  # noqa: F401
from tests.conftest_store import S3_KEYS, mlflow_s3_server, s3_keys, s3_server  # noqa: F401

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def add_s3_remote(root: Path, endpoint: str, env: dict) -> None:
    """The DVC remote of infra/README.md, on the test's S3 server (credentials from the environment)."""
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "remote", "add", "-f", "-d", "store", "s3://dvc/store"], root, env)
    sh([*dvc, "remote", "modify", "store", "endpointurl", endpoint], root, env)


@pytest.mark.slow
def test_main_job_round_trips_through_s3(pipeline_env, s3_server, mlflow_s3_server):
    import mlflow

    from pipeline.ops import registry
    from taskvec.io import TensorSource

    env = {**dvc_env(), **S3_KEYS, "MLFLOW_TRACKING_URI": mlflow_s3_server, "PREFECT_HOME": str(pipeline_env / "prefect-home")}
    root = dvc_project(pipeline_env / "repo", pipeline_env / "unused-local-remote")
    add_s3_remote(root, s3_server, env)
    sh([*GIT, "commit", "-q", "-am", "S3 remote"], root, env)

    run = sh([str(Path(sys.executable).with_name("taskvec")), "run", "--params", "params.yaml", "--json"], root, env)
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert summary["dvc"]["final"] == {"commit": 0, "push": 0}, summary["dvc"]
    reg = summary["registered"]
    assert (reg["model"], reg["version"]) == ("tiny-edit", "1")
    ledger = json.loads((root / "outputs/model/taskvec.json").read_text())

    # the bytes are in the object store: MLflow's artifacts under s3://mlflow/artifacts, DVC's under s3://dvc/store
    mlflow_objects = s3_keys(s3_server, "mlflow")
    assert any(k.startswith("artifacts/") and k.endswith("taskvec.json") for k in mlflow_objects), sorted(mlflow_objects)[:20]
    dvc_objects = s3_keys(s3_server, "dvc")
    assert dvc_objects and all(k.startswith("store/files/md5/") for k in dvc_objects), sorted(dvc_objects)[:5]
    assert not (pipeline_env / "unused-local-remote").exists()
    sh([*GIT, "add", "dvc.lock"], root, env)
    sh([*GIT, "commit", "-q", "-m", "edit"], root, env)

    # a fresh clone: the outputs come back from the S3 remote, byte for byte
    clone = pipeline_env / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], pipeline_env, env)
    assert not (clone / "outputs").exists()
    sh([sys.executable, "-m", "dvc", "pull"], clone, env)
    for rel in ("outputs/model/taskvec.json", "outputs/vectors/senti.safetensors", "outputs/vectors/topic.safetensors", "outputs/edit/vector.safetensors"):
        assert (clone / rel).read_bytes() == (root / rel).read_bytes(), rel
    with TensorSource(clone / "outputs/model") as src:
        assert src.content_hash(use_cache=False) == ledger["output_hash"]
    status = sh([sys.executable, "-m", "dvc", "status", "--cloud"], clone, env)
    assert "in sync" in status.stdout, status.stdout

    # and the registered model from the artifact store (through the server's proxy): the same weights
    mlflow.set_tracking_uri(mlflow_s3_server)
    mlflow.set_registry_uri(mlflow_s3_server)
    folder = registry.model_folder(mlflow.artifacts.download_artifacts("models:/tiny-edit@challenger", dst_path=str(pipeline_env / "dl")))
    assert json.loads((folder / "taskvec.json").read_text())["output_hash"] == ledger["output_hash"]
    os.chdir(clone)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-edit@challenger")
    preds = pyfunc.predict([{"text": "the movie was great", "task": "senti"}])["label"].tolist()
    assert preds[0] in ("negative", "positive")
