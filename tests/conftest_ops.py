"""Fixtures for the promotion / audit / rollback tests (import with ``from tests.conftest_ops import *``).

* ``pg``: PostgreSQL on 127.0.0.1:5432 (trust auth) or a skip with the reason;
  ``fresh_db(prefix)`` creates a uniquely named database, dropped at the end.
* ``mlflow_server``: one real ``mlflow server`` per test session, PostgreSQL
  backend store in its own fresh database, artifacts served from a tmp dir;
  yields its ``http://127.0.0.1:PORT`` URI.
* ``audit_url``: a fresh PostgreSQL database per test for the audit log.
* ``ops``: :class:`pipeline.ops.promotion.Ops` on both (``TASKVEC_PARAMS`` names
  :func:`fake_evaluate` as the promotion evaluator, which rollback uses).
* ``edits``: a tiny BERT base, three task vectors (``t1``, ``t2``, ``bad``)
  and :func:`register_edit` to register ``apply(base, …)`` as a version
  (through :func:`register_folder`, the pipeline's registration).
* :func:`fake_evaluate`: deterministic evaluator reading the model's ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USER = os.environ.get("TASKVEC_TEST_PG_USER", "postgres")

__all__ = [
    "pg",
    "fresh_db",
    "fresh_schema",
    "_audit_db",
    "mlflow_server",
    "audit_url",
    "ops",
    "edits",
    "model_name",
    "prefect_harness",
    "register_edit",
    "register_folder",
    "fake_evaluate",
    "pg_url",
    "wait_for",
    "http_service",
    "free_port",
]


def pg_url(db: str) -> str:
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}"


def _admin():
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="test", connect_timeout=5)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg():
    """An admin connection to PostgreSQL, or skip: these tests need the server CI runs."""
    try:
        conn = _admin()
    except Exception as exc:  # psycopg2.OperationalError, ImportError
        pytest.skip(f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT} as {PG_USER} (start it: pg_ctlcluster <ver> main start): {str(exc).strip().splitlines()[0]}")
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def fresh_db(pg):
    """Factory: a new empty database (dropped, connections terminated, at session end)."""
    made: list[str] = []

    def make(prefix: str = "taskvec_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with pg.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return name

    yield make
    from pipeline.ops import audit as A

    for url, eng in list(A._ENGINES.items()):
        if any(name in url for name in made):
            eng.dispose()
    with pg.cursor() as cur:
        for name in made:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def mlflow_server(fresh_db, tmp_path_factory):
    """A real ``mlflow server`` (PostgreSQL backend store, served artifacts) for the whole session."""
    db = fresh_db("taskvec_mlflow")
    art = tmp_path_factory.mktemp("mlflow-artifacts")
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-log") / "server.log"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        *([str(mlflow_bin)] if mlflow_bin.is_file() else [sys.executable, "-m", "mlflow"]), "server",
        "--backend-store-uri", pg_url(db),
        "--artifacts-destination", str(art),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with http_service(cmd, env=env, log=log, health=f"http://127.0.0.1:{port}/health", timeout=180, what="mlflow server") as uri:
        old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        yield uri
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


@contextlib.contextmanager
def http_service(cmd: list[str], *, env: dict, log: Path, health: str, timeout: float, what: str):
    """Run ``cmd`` (a server, in its own process group, output to ``log``) until ``health`` answers 200; yield its base URL.

    A server that exits before it is healthy fails with the tail of its log;
    on leaving, its whole process group gets SIGTERM (SIGKILL after 20 s).
    """
    import signal
    import urllib.request

    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(health, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=timeout, interval=0.5, what=f"{what} {health}")
        yield health.rsplit("/", 1)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=20)
        fh.close()


@pytest.fixture(scope="session")
def _audit_db(fresh_db):
    return fresh_db("taskvec_audit")


@pytest.fixture
def fresh_schema(pg, _audit_db):
    """Factory: a URL whose connections live in a new, empty schema of the session's audit database.

    (A schema per test is as isolated as a database per test, without the
    seconds DROP DATABASE costs.)
    """

    def make() -> str:
        import psycopg2

        schema = f"s_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=_audit_db)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {schema}")
        conn.close()
        return f"{pg_url(_audit_db)}?options=-csearch_path%3D{schema}"

    return make


@pytest.fixture
def audit_url(fresh_schema):
    return fresh_schema()


@pytest.fixture
def ops(mlflow_server, audit_url, tmp_path, monkeypatch):
    """Ops on the session's server and a fresh audit log; the deployment's params name :func:`fake_evaluate`."""
    from pipeline.ops.promotion import Ops

    params = tmp_path / "ops-params.yaml"
    params.write_text("tasks:\n  t1: {source: x, labels: [a, b]}\n  c1: {source: y, labels: [a, b]}\nfinetune: {tasks: [t1]}\nedit: {learn: [t1], control: [c1]}\npromotion:\n  targets: [t1]\n  controls: [c1]\n  evaluator: tests.conftest_ops:fake_evaluate\n")
    monkeypatch.setenv("TASKVEC_PARAMS", str(params))
    return Ops(mlflow_server, audit_url)


@pytest.fixture
def model_name(request):
    """A registered-model name unique to the test (the server is shared by the session)."""
    return f"tv-{request.node.name[:40]}-{uuid.uuid4().hex[:6]}".replace("[", "-").replace("]", "")


# ---------------------------------------------------------------------------
# Tiny models and vectors


class Edits:
    def __init__(self, root: Path):
        from taskvec.engine import extract
        from tests.conftest import perturb
        from tests.conftest_tasks import make_model

        self.root = root
        self.base = make_model(root / "base")  # tiny BERT + tokenizer: registered versions load as pyfuncs
        self.vectors: dict[str, Path] = {}
        self.sha: dict[str, str] = {}
        for i, name in enumerate(("t1", "t2", "bad"), start=1):
            ft = perturb(self.base, root / f"ft-{name}", seed=10 + i, scale=0.02)
            res = extract(self.base, ft, root / "vectors" / f"{name}.safetensors")
            self.vectors[name] = res.path
            self.sha[name] = res.sha256
        self._n = 0

    def build(self, edits: list[tuple[str, float]], *, heads: bool = False) -> Path:
        """apply(base, edits) into a new folder (one apply, as the pipeline's evaluate step writes it); ``heads``: add a ``t1`` head."""
        from taskvec.engine import apply

        self._n += 1
        out = self.root / "built" / f"m{self._n}"
        apply(self.base, [(self.vectors[n], lam) for n, lam in edits], out)
        if heads:
            from taskvec.heads import build_head, load_encoder, save_head

            encoder, tokenizer, _ = load_encoder(out)
            save_head(build_head(encoder, tokenizer, "t1", ["negative", "positive"], ["bad", "good"]), out / "heads" / "t1.safetensors")
        return out


@pytest.fixture(scope="session")
def edits(tmp_path_factory):
    return Edits(tmp_path_factory.mktemp("ops-edits"))


def register_folder(ops, model: str, folder: Path, *, tags: dict[str, str] | None = None, vectors: list[Path] = (), description: str = "test edit", weights: str = "thin", compress: dict | None = None) -> str:
    """Register ``folder`` the pipeline's way (:func:`pipeline.ops.registry.register_model`) in a run of ``taskvec-test``; returns the version."""
    from mlflow.exceptions import MlflowException

    from pipeline.ops import registry

    client = ops.client
    exp = client.get_experiment_by_name("taskvec-test")
    if exp is None:
        try:
            exp_id = client.create_experiment("taskvec-test")
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name("taskvec-test").experiment_id
    else:
        exp_id = exp.experiment_id
    rid = client.create_run(exp_id).info.run_id
    ledger = json.loads((Path(folder) / "taskvec.json").read_text())
    rec = registry.register_model(client, rid, folder, name=model, tags={**registry.ledger_tags(ledger), **(tags or {})}, vectors=list(vectors), version_description=description, weights=weights, compress=compress)
    client.set_terminated(rid, "FINISHED")
    return rec["version"]


def register_edit(ops, model: str, edits: Edits, spec: list[tuple[str, float]], *, alias: str | None = None, log_vectors: bool = True, heads: bool = False) -> str:
    """Build ``base + Σ λ τ`` and register it (ledger tags + pyfunc model, vectors in the vector store); returns the version.

    Thin by default; ``log_vectors=False`` registers full weights and stores no vector (a thin version needs its vectors).
    """
    folder = edits.build(spec, heads=heads)
    vectors = list(dict.fromkeys(edits.vectors[n] for n, _ in spec)) if log_vectors else []
    v = register_folder(ops, model, folder, vectors=vectors, weights="thin" if log_vectors else "full")
    if alias:
        ops.client.set_registered_model_alias(model, alias, v)
    return v


def fake_evaluate(model_dir) -> dict[str, float]:
    """Deterministic scores from the ledger: t1/t2 gain 0.2·λ from their vector; ``bad`` costs control c1 5·λ points."""
    ledger = json.loads((Path(model_dir) / "taskvec.json").read_text()) if (Path(model_dir) / "taskvec.json").is_file() else {"edits": []}
    scores = {"t1": 0.60, "t2": 0.60, "c1": 0.90}
    for e in ledger.get("edits", []):
        name = Path(e.get("vector", "")).stem
        lam = float(e.get("lambda", 0))
        if name in ("t1", "t2"):
            scores[name] += 0.2 * lam
        elif name == "bad":
            scores["c1"] -= 0.05 * lam
            scores["t1"] += 0.3 * lam
    return scores


# ---------------------------------------------------------------------------
# Prefect


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (temporary server + database) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
