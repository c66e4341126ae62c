"""Reaching the pipeline's services: the MLflow store or server and the Prefect API.

Fail fast with one line: a server that does not answer within
``TASKVEC_SERVICE_TIMEOUT`` seconds (default 10) is reported as unreachable
before any work starts, instead of hanging in a client's retry loop (MLflow
retries 7 times with a 120 s timeout by default; Prefect 5 times). URLs in
messages are redacted.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from taskvec.errors import TaskvecError
from taskvec.redact import redact_uri


def timeout_s() -> float:
    try:
        return float(os.environ.get("TASKVEC_SERVICE_TIMEOUT", "10"))
    except ValueError:
        raise TaskvecError("TASKVEC_SERVICE_TIMEOUT must be a number of seconds") from None


def normalize_db_url(url: str) -> str:
    """A SQLAlchemy URL: bare ``postgresql://`` gets the installed driver (psycopg2); a path becomes SQLite."""
    from pathlib import Path

    url = str(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        try:
            import psycopg  # noqa: F401  (psycopg 3 installed: SQLAlchemy's default driver works)
        except ImportError:
            url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def is_http(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def probe(url: str, what: str) -> None:
    """GET ``url``; any HTTP answer means the server is up. Otherwise one line, within the timeout."""
    limit = timeout_s()
    try:
        with urllib.request.urlopen(url, timeout=limit):  # noqa: S310 - our own service URL
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TaskvecError(f"{what} {redact_uri(url)} is unreachable (no answer within {limit:g} s: {reason})") from None


def mlflow_uri(uri: str) -> str:
    """Check an MLflow tracking URI and bound its client: servers are probed, DB URLs get a driver."""
    if is_http(uri):
        probe(uri.rstrip("/") + "/health", "MLflow tracking server")
        # keep later calls bounded too, unless the user chose otherwise
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(int(timeout_s() * 3), 10)))
        return uri
    if uri.startswith(("postgres", "mysql", "mssql")):
        uri = normalize_db_url(uri)
        probe_db(uri, "MLflow tracking store")  # MLflow itself retries a dead DB for minutes
    return uri


def probe_db(url: str, what: str) -> None:
    """Open and close one connection with a connect timeout; one line if the database does not answer."""
    import sqlalchemy

    limit = timeout_s()
    args = {"connect_timeout": max(int(limit), 1)} if url.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - driver errors vary; report the first line
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise TaskvecError(f"{what} {redact_uri(url)} is unreachable (within {limit:g} s: {first})") from None


def check_prefect_api() -> None:
    """When ``PREFECT_API_URL`` names a server, make sure it answers before a flow starts."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        probe(url.rstrip("/") + "/health", "Prefect API")


# ---------------------------------------------------------------------------
# quiet, offline defaults for every process that imports the pipeline's ops


def quiet_env() -> None:
    """No telemetry, no loading bars: defaults (``setdefault``) set before MLflow/Prefect/transformers are imported.

    MLflow 3.17 honours ``MLFLOW_DISABLE_TELEMETRY`` and ``DO_NOT_TRACK``
    (``mlflow.telemetry.utils.is_telemetry_disabled``); Prefect's server
    analytics is ``PREFECT_SERVER_ANALYTICS_ENABLED``; transformers' "Loading
    weights" bars follow ``HF_HUB_DISABLE_PROGRESS_BARS`` (read when
    ``transformers.utils.logging`` is imported).
    """
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(key, value)


quiet_env()


# ---------------------------------------------------------------------------
# child processes that die with their parent


def child_command(module: str, *args: str, signal_name: str = "SIGKILL") -> list[str]:
    """``python -m pipeline.ops.child PID SIGNAL MODULE ARGS…``: MODULE runs as ``__main__`` and gets SIGNAL when we die.

    The child arms ``prctl(PR_SET_PDEATHSIG)`` itself (no ``preexec_fn``,
    which is unsafe in a threaded parent), so even a SIGKILL of this process
    takes the child down; see :mod:`pipeline.ops.child`.
    """
    import sys

    return [sys.executable, "-m", "pipeline.ops.child", str(os.getpid()), signal_name, module, *args]


import threading as _threading  # noqa: E402

_CHILDREN: set = set()
#: set when the command is being stopped (signal, Ctrl-C): no new child may start (a retry would outlive the stop)
STOPPING = _threading.Event()


def adopt(proc) -> None:
    """Register a running child (a ``subprocess.Popen``) to be killed by :func:`stop_children`."""
    _CHILDREN.add(proc)
    if STOPPING.is_set():  # stop_children ran meanwhile (it sets STOPPING before it looks at the set)
        proc.kill()


def release(proc) -> None:
    _CHILDREN.discard(proc)


def stop_children() -> int:
    """Kill every adopted child now and refuse new ones; returns how many were killed.

    Needed on SIGTERM/Ctrl-C: the interpreter's exit waits for Prefect's task
    threads, which wait for their fine-tunes — those would otherwise run to the
    end (and swap their outputs into ``outputs/``) after the user stopped the run.
    Lock-free, as it runs in a signal handler.
    """
    STOPPING.set()
    while True:
        try:
            procs = list(_CHILDREN)
            break
        except RuntimeError:  # the set changed size while being copied
            continue
    n = 0
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            n += 1
    return n


# ---------------------------------------------------------------------------
# the pipeline's own Prefect API server (instead of Prefect's ephemeral one)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


def _default_prefect_db() -> "Path | None":
    """The SQLite file Prefect's server would use, or None when a database URL is configured."""
    from pathlib import Path

    if any(os.environ.get(k) for k in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")):
        return None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    return home / "prefect.db"


def template_dir() -> "Path":
    """Where migrated empty databases are kept (``TASKVEC_DB_TEMPLATES``, default ``~/.cache/taskvec``)."""
    from pathlib import Path

    env = os.environ.get("TASKVEC_DB_TEMPLATES")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taskvec"


def seed_db(db: "Path", template: "Path") -> bool:
    """Create the SQLite file ``db`` as a copy of ``template`` if ``db`` does not exist yet; True if seeded.

    Atomic create-if-absent (copy to a temporary name, then ``os.link``), so a
    database that appeared meanwhile is never overwritten.
    """
    import shutil

    if db.exists() or not template.is_file():
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f"{db.name}.{os.getpid()}.seed")
    try:
        shutil.copyfile(template, tmp)
        os.link(tmp, db)
        return True
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def save_db_template(db: "Path", template: "Path", cleanup: tuple[str, ...] = ()) -> None:
    """Copy a just-migrated database to ``template`` (SQLite online backup, then ``cleanup`` statements); best effort."""
    import sqlite3

    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        src = sqlite3.connect(str(db))
        dst = sqlite3.connect(str(tmp))
        try:
            src.backup(dst)
            for stmt in cleanup:
                dst.execute(stmt)
            dst.commit()
        finally:
            dst.close()
            src.close()
        os.replace(tmp, template)
    except (OSError, sqlite3.Error):
        pass


def prefect_template_db() -> "Path":
    """A migrated, empty Prefect database for this Prefect version (in :func:`template_dir`)."""
    return template_dir() / f"prefect-{_prefect_version()}-empty.db"


class PrefectServer:
    """A Prefect API server on 127.0.0.1 for the lifetime of one command (``taskvec run``).

    Replaces Prefect's ephemeral server, which is started inside the flow call
    and migrates a fresh database on every new ``PREFECT_HOME`` (15–25 s on a
    busy CPU). This one

    * starts *before* the pipeline's heavy imports, so its start-up overlaps them;
    * dies with us: it is a :func:`child_command` (``PR_SET_PDEATHSIG``), so a
      SIGKILL of ``taskvec run`` does not leave it behind, and :meth:`stop`
      ends it on every normal or signalled exit;
    * seeds a brand-new SQLite database from a migrated empty copy kept per
      Prefect version (:func:`prefect_template_db`; made the first time a
      server comes up on a fresh database), so the Alembic migrations run once
      per machine and Prefect version, not once per project.

    Not used when ``PREFECT_API_URL`` names a server (that one is probed instead).
    """

    def __init__(self) -> None:
        self.proc = None
        self.port: int | None = None
        self.seeded = False
        self._db = None
        self._fresh_db = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "PrefectServer":
        import subprocess
        from pathlib import Path

        self._db = _default_prefect_db()
        if self._db is not None and not self._db.exists():
            self._fresh_db = True
            self.seeded = seed_db(self._db, prefect_template_db())
        self.port = _free_port()
        from importlib.util import find_spec

        # locate Prefect without importing it: its settings snapshot the environment (PREFECT_API_URL) at import
        prefect_pkg = Path(list(find_spec("prefect").submodule_search_locations)[0])
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        cmd = child_command(
            "uvicorn", "--app-dir", str(prefect_pkg.parent), "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on", signal_name="SIGTERM",
        )
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        os.environ["PREFECT_API_URL"] = self.api_url
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until ``/api/health`` answers (one line if the server died or did not come up in time)."""
        import time

        limit = timeout if timeout is not None else float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        deadline = time.monotonic() + limit
        while True:
            if self.proc.poll() is not None:
                raise TaskvecError(f"the Prefect API server exited with status {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(self.api_url + "/health", timeout=2):  # noqa: S310 - our own server
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TaskvecError(f"the Prefect API server did not answer within {limit:g} s")
            time.sleep(0.1)
        if self._fresh_db and not self.seeded:
            self._save_template()

    def _save_template(self) -> None:
        """Keep the just-migrated, still empty database as the template for later fresh homes."""
        save_db_template(self._db, prefect_template_db())

    def stop(self) -> None:
        import subprocess

        proc, self.proc = self.proc, None
        if proc is None:
            return
        _drain_prefect_clients()  # else their exit-time drain retries against the stopped server
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]


def _drain_prefect_clients(timeout: float = 10) -> None:
    """Flush the Prefect client's log and event queues (as ``prefect_test_harness`` does before stopping its server)."""
    import inspect
    import sys

    if "prefect" not in sys.modules:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.utilities.asyncutils import run_coro_as_sync

        async def drain() -> None:
            for worker in (APILogWorker, EventsWorker):
                result = worker.drain_all(timeout=timeout)
                if inspect.isawaitable(result):
                    await result

        run_coro_as_sync(drain())
    except Exception:  # noqa: BLE001 - best effort: the server is stopped either way
        pass


class _Terminated(SystemExit):
    """SIGTERM/SIGHUP turned into an exception, so ``finally`` blocks (MLflow runs → FAILED, servers stopped) run."""


def _raise_terminated(signum, _frame):
    """Kill the children first: unwinding the flow waits for its task threads, which wait for them."""
    import signal

    stop_children()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(128 + signum)


import contextlib as _contextlib  # noqa: E402


class _External:
    """``PREFECT_API_URL`` names a server: nothing to start or wait for (it was probed)."""

    seeded = False

    def wait(self, timeout: float | None = None) -> None:
        return None


@_contextlib.contextmanager
def prefect_api():
    """For one ``taskvec run``: the configured ``PREFECT_API_URL`` (probed), or a :class:`PrefectServer` of our own.

    Enter it *before* importing Prefect or the flows: the server starts in the
    background and ``PREFECT_API_URL`` is set for the Prefect client; call the
    yielded object's ``wait()`` after the heavy imports, just before the flow,
    so start-up and imports overlap. Inside, SIGTERM, SIGHUP and SIGINT first
    kill the running children (:func:`stop_children`), then raise
    :class:`SystemExit` (KeyboardInterrupt for SIGINT), so the flow's ``finally`` blocks run (its MLflow run
    ends FAILED) and the server is stopped on the way out; children started
    with :func:`child_command` die with this process even on SIGKILL.
    """
    import signal
    import threading

    if os.environ.get("PREFECT_API_URL"):
        check_prefect_api()
        server = _External()
    else:
        server = PrefectServer().start()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            old[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield server
    except BaseException:
        stop_children()
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if isinstance(server, PrefectServer):
            server.stop()


def executor() -> str:
    """Where this step runs: the name of the Dask worker (``dask worker --name``) under Dask, else ``local``.

    Recorded as the MLflow tag ``taskvec.worker`` of every step run.
    """
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):  # ValueError: not inside a Dask worker
        return "local"
