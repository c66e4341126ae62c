"""MLflow tracking for the edit pipeline.

Where runs go: ``MLFLOW_TRACKING_URI`` in the environment, else
``mlflow.tracking_uri`` of params.yaml — by default the embedded SQLite store
``sqlite:///mlflow.db`` beside params.yaml (relative SQLite paths are made
absolute against the params folder) with a local artifact root
(``mlflow.artifact_root``, default ``mlartifacts/``) set when the experiment
is created. A server URI (``http://…``) keeps the server's artifact store.

Run layout: one *parent* run per flow run (or per ``dvc repro`` register
stage) and one nested run per step (``finetune/sst2``, ``extract/sst2``,
``compose``, ``search``, ``evaluate``, ``register``) holding that step's
params, metrics, artifacts (λ curve CSV/PNG, accuracy plot, results table)
and dataset inputs (``mlflow.log_input`` of a :class:`MetaDataset` whose
digest is the data file's sha256).

Credentials never reach MLflow or the logs: every URI that is logged or
printed goes through :func:`redact` (``user:password@`` and token-like query
parameters are masked).

Writes to the store are serialised by a process-wide lock, so Prefect's
thread-pool tasks can log concurrently to SQLite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.ops.services import mlflow_uri, save_db_template, seed_db, template_dir
from taskvec.errors import TaskvecError
from taskvec.redact import redact_text


class _TimedLock:
    """A re-entrant lock that also adds up the seconds spent holding it (= time in MLflow calls)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = threading.local()
        self.seconds = 0.0

    def __enter__(self):
        import time

        self._lock.acquire()
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            self._depth.t0 = time.perf_counter()
        self._depth.n = depth + 1
        return self

    def __exit__(self, *exc) -> None:
        import time

        self._depth.n -= 1
        if self._depth.n == 0:
            self.seconds += time.perf_counter() - self._depth.t0
        self._lock.release()


#: serialises MLflow writes across Prefect's task threads; LOCK.seconds = time spent in MLflow
LOCK = _TimedLock()


def redact(text: str | None) -> str:
    """Mask credentials in ``text`` (URIs, tokens, secret environment values); see :mod:`taskvec.redact`."""
    return "" if text is None else redact_text(str(text))


def resolve_tracking_uri(p) -> str:
    """``MLFLOW_TRACKING_URI`` env, else params (SQLite/file paths made absolute against the params folder)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or p.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        uri = "sqlite:///" + str((p.root / rel).resolve())
    elif "://" not in uri:
        uri = str((p.root / uri).resolve())
    return uri


def _is_server(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


def artifact_location(p, uri: str) -> str | None:
    """``file://`` URI of the artifact root for local stores; None for a tracking server."""
    root = p.mlflow.artifact_root
    if "://" in root:
        return root
    if _is_server(uri):
        return None
    return (p.root / root).resolve().as_uri()


def mlflow_template_db() -> Path:
    """A migrated, empty MLflow SQLite store for this MLflow version (see :func:`pipeline.ops.services.template_dir`)."""
    from importlib.metadata import version

    return template_dir() / f"mlflow-{version('mlflow')}-empty.db"


def _fresh_sqlite(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store that does not exist yet (MLflow would migrate it: ~2–12 s), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None if path.exists() else path


class Tracker:
    """An MLflow client bound to the pipeline's store and experiment."""

    def __init__(self, p):
        import mlflow
        from mlflow import MlflowClient

        self.params = p
        self.uri = mlflow_uri(resolve_tracking_uri(p))  # probes a server: one line, bounded wait
        self.mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        with LOCK:
            try:
                fresh = _fresh_sqlite(self.uri)
                seeded = fresh is not None and seed_db(fresh, mlflow_template_db())
                self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                exp = self.client.get_experiment_by_name(p.mlflow.experiment)
                if fresh is not None and not seeded:
                    # MLflow just migrated a new store: keep it, without its Default experiment, as the template
                    save_db_template(fresh, mlflow_template_db(), cleanup=("DELETE FROM experiment_tags", "DELETE FROM experiments"))
                if exp is None:
                    self.experiment_id = self.client.create_experiment(p.mlflow.experiment, artifact_location=artifact_location(p, self.uri))
                else:
                    self.experiment_id = exp.experiment_id
            except Exception as exc:  # noqa: BLE001 - unreachable server, bad URI, locked DB
                raise TaskvecError(f"MLflow tracking store {redact(self.uri)} is not usable: {redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None

    @property
    def safe_uri(self) -> str:
        return redact(self.uri)

    # -- runs ---------------------------------------------------------------

    def start(self, name: str, *, parent: str | None = None, tags: dict[str, str] | None = None, start_time: float | None = None) -> str:
        """Create a run (``start_time``: epoch seconds when the work began; default now), tagged with our process."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {MLFLOW_RUN_NAME: name, **process_tags(), **{k: redact(str(v)) for k, v in (tags or {}).items()}}
        if parent:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        with LOCK:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags, start_time=None if start_time is None else int(start_time * 1000))
        return run.info.run_id

    def end(self, run_id: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        with LOCK:
            self.client.set_terminated(run_id, status=status, end_time=None if end_time is None else int(end_time * 1000))

    @contextlib.contextmanager
    def run(self, name: str, *, parent: str | None = None, tags: dict[str, str] | None = None, seconds: float | None = None) -> Iterator[StepRun]:
        """A (nested, when ``parent``) run that ends FINISHED, or FAILED if the block raises.

        ``seconds``: how long the step's real work took, just before this call;
        the run then starts that long ago and ends when the work ended, so its
        duration in MLflow is the step's, not the time spent logging it.
        """
        import time

        work_end = time.time() if seconds is not None else None
        run_id = self.start(name, parent=parent, tags=tags, start_time=None if seconds is None else work_end - float(seconds))
        step = StepRun(self, run_id)
        try:
            yield step
        except BaseException:
            self.end(run_id, "FAILED")
            raise
        self.end(run_id, "FINISHED", end_time=work_end)

    def sweep_orphans(self) -> list[str]:
        """Mark FAILED the RUNNING runs of this experiment whose process (on this host) is gone.

        A flow killed with SIGKILL (or a lost machine) cannot end its MLflow
        runs; they would stay RUNNING forever. Every run records the process
        that created it (:func:`process_tags`); a run whose process no longer
        exists — same host, and the pid is dead or belongs to a process started
        at another time — is terminated FAILED with the tag
        ``taskvec.failed_reason``. Runs of other hosts or without these tags are
        left alone (their liveness cannot be known here). Returns the run ids.
        """
        import time

        from mlflow.entities import RunStatus

        swept: list[str] = []
        host = _host()
        with LOCK:
            runs = self.client.search_runs([self.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`taskvec.host` = '{host}'", max_results=1000)
        for run in runs:
            t = run.data.tags
            try:
                pid, started = int(t[PID_TAG]), float(t[PID_START_TAG])
            except (KeyError, ValueError):
                continue
            if _process_alive(pid, started):
                continue
            reason = f"orphaned: process {pid} on {host} ended without closing this run (swept at the start of a later run, pid {os.getpid()})"
            with LOCK:
                self.client.set_tag(run.info.run_id, "taskvec.failed_reason", reason)
                self.client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FAILED), end_time=int(time.time() * 1000))
            swept.append(run.info.run_id)
        return swept


PID_TAG = "taskvec.pid"
PID_START_TAG = "taskvec.pid_started"


def _host() -> str:
    import socket

    return socket.gethostname()


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def process_tags() -> dict[str, str]:
    """``taskvec.host`` / ``taskvec.pid`` / ``taskvec.pid_started``: which process owns a run (for :meth:`Tracker.sweep_orphans`)."""
    return {"taskvec.host": _host(), PID_TAG: str(os.getpid()), PID_START_TAG: f"{_create_time(os.getpid()) or 0.0:.2f}"}


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - started) < 1.0  # else: the pid was reused by another process
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


class StepRun:
    """Logging helpers for one run (all thread-safe, all redacting)."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = {k: redact(v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))[:6000] for k, v in _flatten(values).items()}
        with LOCK:
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(re.sub(r"[^\w\-. :/]", "_", k), float(v), ts, step) for k, v in _flatten(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        with LOCK:
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def series(self, key: str, points: list[tuple[int, float]]) -> None:
        """A metric history, e.g. the training loss per step."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(key, float(v), ts, int(s)) for s, v in points]
        with LOCK:
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def table(self, data: dict[str, list], artifact_file: str) -> None:
        """A table artifact (``MlflowClient.log_table``: JSON the MLflow UI shows and charts by any column)."""
        with LOCK:
            self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def tags(self, values: dict[str, Any]) -> None:
        with LOCK:
            for k, v in values.items():
                self.client.set_tag(self.run_id, k, redact(v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)))

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        with LOCK:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        with LOCK:
            self.client.log_text(self.run_id, redact(text), artifact_file)

    def dict(self, obj: Any, artifact_file: str) -> None:
        self.text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def datasets(self, lineage: dict[str, dict], context: str) -> None:
        """``mlflow.log_input`` of each split's digest: {key: {task, split, origin, sha256, rows_used...}}."""
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with LOCK, mlflow.start_run(run_id=self.run_id):
            for info in lineage.values():
                origin = str(info.get("origin", ""))
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        source = resolve_dataset_source(origin)
                except Exception:  # noqa: BLE001 - unknown source kind: fall back to a code source
                    from mlflow.data.code_dataset_source import CodeDatasetSource

                    source = CodeDatasetSource({"origin": redact(origin)})
                name = f"{info.get('task')}/{info.get('split')}"
                ds = MetaDataset(source=source, name=name, digest=str(info["sha256"])[:32])
                tags = {"sha256": str(info["sha256"]), "rows_used": str(info.get("rows_used", "")), "rows_total": str(info.get("rows_total", ""))}
                mlflow.log_input(ds, context=context, tags=tags)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def plot_accuracy(metrics: dict, path: str | os.PathLike) -> Path:
    """Bar chart: base (zero-shot), fine-tuned and edited accuracy per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(metrics["tasks"])
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(tasks)), 3.5))
    width = 0.27
    for i, (key, label) in enumerate((("base", "base (zero-shot)"), ("finetuned", "fine-tuned"), ("edited", "edited"))):
        vals = [metrics["tasks"][t].get(key, 0.0) for t in tasks]
        ax.bar([x + (i - 1) * width for x in range(len(tasks))], vals, width, label=label)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({metrics['tasks'][t]['role']})" for t in tasks])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{metrics['split']} accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
