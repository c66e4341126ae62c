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
