"""Real services on 127.0.0.1 for the object-store and cluster tests, each a separate process.

* :func:`s3_server` — ``moto_server`` (pip ``moto[server]``), an S3-compatible HTTP server
  standing in for the MinIO of ``infra/compose.yaml``; buckets ``mlflow`` and ``dvc``.
* :func:`mlflow_s3_server` — ``mlflow server --artifacts-destination s3://mlflow
  --serve-artifacts`` on that S3 endpoint (``MLFLOW_S3_ENDPOINT_URL``), as compose's ``mlflow``.
* :func:`dask_cluster` — ``dask scheduler`` plus worker processes (``dask worker``).

Ports come from ``TASKVEC_TEST_PORTS`` (``LOW-HIGH``, default any free port), so parallel
sessions can keep to their own range. Import explicitly from the test modules.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
S3_KEYS = {"AWS_ACCESS_KEY_ID": "taskvec-test", "AWS_SECRET_ACCESS_KEY": "taskvec-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1, from ``TASKVEC_TEST_PORTS`` (``LOW-HIGH``) when set."""
    span = os.environ.get("TASKVEC_TEST_PORTS")
    candidates = range(*(lambda lo, hi: (int(lo), int(hi) + 1))(*span.split("-"))) if span else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {span}")


def tool(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (not whatever PATH finds)."""
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed in {BIN}")
    return str(path)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except OSError:
        return False


@contextlib.contextmanager
def service(cmd: list[str], log: Path, ready: Callable[[], bool], *, env: dict | None = None, cwd: Path | None = None, timeout: float = 180) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own session, wait until ``ready()``, stop the whole process group afterwards."""
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[0]} not ready after {timeout}s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        fh.close()


@pytest.fixture
def s3_server(tmp_path) -> Iterator[str]:
    """A real S3-compatible server process (moto_server) with buckets ``mlflow`` and ``dvc``; its endpoint URL."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with service([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto.log", lambda: http_ok(f"{url}/moto-api/")):
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        for bucket in ("mlflow", "dvc"):
            s3.create_bucket(Bucket=bucket)
        yield url


def s3_keys(endpoint: str, bucket: str) -> dict[str, int]:
    """``key → size`` of every object in ``bucket`` (read with boto3 from the server itself)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


@pytest.fixture
def mlflow_s3_server(s3_server, tmp_path) -> Iterator[str]:
    """``mlflow server`` with a SQLite backend store and artifacts proxied to ``s3://mlflow`` on :func:`s3_server`."""
    from pipeline.ops.services import seed_db
    from pipeline.ops.tracking import mlflow_template_db

    db = tmp_path / "mlflow-server.db"
    seed_db(db, mlflow_template_db())  # skip the migrations when a migrated template exists
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [tool("mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", "s3://mlflow/artifacts",
           "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_server, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with service(cmd, tmp_path / "mlflow-server.log", lambda: http_ok(f"{uri}/health"), env=env):
        yield uri


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, workers: list[list[str]], *, env: dict | None = None, cwd: Path | None = None) -> Iterator[str]:
    """``dask scheduler`` + one ``dask worker`` process per entry of ``workers`` (its extra CLI args); the address."""
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    sched = [tool("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(service(sched, tmp_path / "dask-scheduler.log", lambda: _port_open(port), env=env, cwd=cwd))
        for i, extra in enumerate(workers):
            log = tmp_path / f"dask-worker-{i}.log"
            cmd = [tool("dask"), "worker", addr, "--host", "127.0.0.1", "--no-dashboard", "--nworkers", "1", "--nthreads", "2", "--name", f"w{i}", *extra]
            stack.enter_context(service(cmd, log, lambda log=log: "Registered to" in log.read_text(), env=env, cwd=cwd))
        yield addr


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
