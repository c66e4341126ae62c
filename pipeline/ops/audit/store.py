"""Where the audit log lives: SQL tables and triggers, engines, the append lock and transactions (see :mod:`pipeline.ops.audit`)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.ops.audit.chain import ACTIONS, GENESIS, AuditEntry, VerifyReport, canonical_json, default_actor, entry_hash, foreign_anchor_problem, now_iso, verify_chain
from pipeline.ops.services import normalize_db_url as normalize_url
from taskvec.errors import TaskvecError
from taskvec.redact import clean_data, clean_text, redact_uri

TABLE = "taskvec_audit"
_PG_LOCK_KEY = 0x7A5C_0A0D  # arbitrary constant: the advisory lock every appender takes


# ---------------------------------------------------------------------------
# URL resolution and engines


def default_url(tracking_uri: str | None = None) -> str:
    """Where the audit log lives when not configured.

    ``TASKVEC_AUDIT_URL`` wins; else the tracking store's own database when
    MLflow uses one (a SQLite ``mlflow.db`` gets a sibling ``audit.db``; a
    PostgreSQL store is shared as is); else ``./audit.db``.
    """
    env = os.environ.get("TASKVEC_AUDIT_URL")
    if env:
        return normalize_url(env)
    uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        return normalize_url(f"sqlite:///{path.parent / 'audit.db'}")
    if uri.startswith(("postgresql", "postgres://")):
        return normalize_url(uri)
    return normalize_url("sqlite:///audit.db")


_ENGINES: dict[str, Any] = {}
_ENGINES_LOCK = threading.Lock()
_SCHEMA_DONE: dict[str, str] = {}  # url -> log id


def _engine(url: str):
    import sqlalchemy as sa
    from sqlalchemy import event

    with _ENGINES_LOCK:
        eng = _ENGINES.get(url)
        if eng is not None:
            return eng
        if url.startswith("sqlite"):
            db = url.split("///", 1)[-1]
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            eng = sa.create_engine(url, connect_args={"timeout": 120, "check_same_thread": False})

            @event.listens_for(eng, "connect")
            def _connect(dbapi_conn, _rec):  # let BEGIN IMMEDIATE below be the only transaction start
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA busy_timeout = 120000")
                cur.close()

            @event.listens_for(eng, "begin")
            def _begin(conn):  # take the write lock up front: appenders serialise here
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            eng = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        _ENGINES[url] = eng
        return eng


def _is_pg(conn) -> bool:
    return conn.dialect.name == "postgresql"


def _ph(conn) -> str:
    """The driver's parameter placeholder (exec_driver_sql passes SQL through untouched)."""
    return "%s" if _is_pg(conn) else "?"


def _lock(conn) -> None:
    if _is_pg(conn):
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
    # SQLite: BEGIN IMMEDIATE (see _engine) already holds the write lock


def location_id(url: str) -> str:
    """Digest of where a log lives: SQLite file path (absolute), else the URL without its password."""
    import sqlalchemy as sa

    url = normalize_url(url)
    if url.startswith("sqlite"):
        db = url.split("///", 1)[-1]
        key = "sqlite:" + (db if db in ("", ":memory:") else str(Path(db).expanduser().resolve()))
    else:
        try:
            key = sa.engine.make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - an unparsable URL still gets a stable id
            key = redact_uri(url)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def forget(url: str) -> None:
    """Drop this process's cached engine and schema state for ``url`` (after the database was deleted)."""
    url = normalize_url(url)
    with _ENGINES_LOCK:
        eng = _ENGINES.pop(url, None)
        _SCHEMA_DONE.pop(url, None)
    if eng is not None:
        eng.dispose()


_META_GUARD = "taskvec audit meta is write-once"



def _tables(seq_type: str) -> list[str]:
    """The two tables and the index, the same on both databases but for the type of ``seq``."""
    return [
        f"CREATE TABLE IF NOT EXISTS {TABLE}_meta (log_id TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        seq {seq_type} PRIMARY KEY, ts TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        model TEXT NOT NULL, version TEXT, payload TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL UNIQUE)""",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_model ON {TABLE} (model, version)",
    ]


_SQLITE_DDL = [
    *_tables("INTEGER"),
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_no_update BEFORE UPDATE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'taskvec audit log is append-only'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_no_delete BEFORE DELETE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'taskvec audit log is append-only'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_meta_no_update BEFORE UPDATE ON {TABLE}_meta
        BEGIN SELECT RAISE(ABORT, '{_META_GUARD}'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_meta_no_delete BEFORE DELETE ON {TABLE}_meta
        BEGIN SELECT RAISE(ABORT, '{_META_GUARD}'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_meta_once BEFORE INSERT ON {TABLE}_meta
        WHEN (SELECT count(*) FROM {TABLE}_meta) > 0
        BEGIN SELECT RAISE(ABORT, '{_META_GUARD}'); END""",
]

_PG_DDL = [
    *_tables("BIGINT"),
    f"""CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger AS $$
        BEGIN RAISE EXCEPTION 'taskvec audit log is append-only'; END $$ LANGUAGE plpgsql""",
    f"""CREATE OR REPLACE TRIGGER {TABLE}_no_change BEFORE UPDATE OR DELETE ON {TABLE}
        FOR EACH ROW EXECUTE FUNCTION {TABLE}_append_only()""",
    f"""CREATE OR REPLACE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE}
        FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only()""",
    f"""CREATE OR REPLACE FUNCTION {TABLE}_meta_guard() RETURNS trigger AS $$
        BEGIN
          IF TG_OP = 'INSERT' THEN
            IF EXISTS (SELECT 1 FROM {TABLE}_meta) THEN RAISE EXCEPTION '{_META_GUARD}'; END IF;
            RETURN NEW;
          END IF;
          RAISE EXCEPTION '{_META_GUARD}';
        END $$ LANGUAGE plpgsql""",
    f"""CREATE OR REPLACE TRIGGER {TABLE}_meta_no_change BEFORE INSERT OR UPDATE OR DELETE ON {TABLE}_meta
        FOR EACH ROW EXECUTE FUNCTION {TABLE}_meta_guard()""",
    f"""CREATE OR REPLACE TRIGGER {TABLE}_meta_no_truncate BEFORE TRUNCATE ON {TABLE}_meta
        FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_meta_guard()""",
]


def _row(r) -> AuditEntry:
    return AuditEntry(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8])


_COLS = "seq, ts, actor, action, model, version, payload, prev_hash, hash"


# ---------------------------------------------------------------------------
# The log


class AuditTransaction:
    """An open transaction holding the append lock (see :meth:`AuditLog.transaction`)."""

    def __init__(self, conn):
        self._conn = conn
        self.appended: list[AuditEntry] = []
        self.committed = False

    def commit(self) -> None:
        """Commit now (releasing the lock), so a failing commit can still be compensated by the caller."""
        if not self.committed:
            self._conn.commit()
            self.committed = True

    def head(self) -> AuditEntry | None:
        r = self._conn.exec_driver_sql(f"SELECT {_COLS} FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        return _row(r) if r else None

    def entries(self, model: str | None = None, version: str | None = None, action: str | None = None) -> list[AuditEntry]:
        return _select(self._conn, model=model, version=version, action=action)

    def append(self, action: str, model: str, version: str | int | None = None, payload: dict | None = None, *, actor: str | None = None) -> AuditEntry:
        if action not in ACTIONS:
            raise TaskvecError(f"unknown audit action {action!r} (one of {', '.join(ACTIONS)})")
        if not model:
            raise TaskvecError("an audit entry needs a model name")
        head = self.head()
        seq = 1 if head is None else head.seq + 1
        prev = GENESIS if head is None else head.hash
        ts = now_iso()
        actor = clean_text(actor or default_actor())
        version = None if version is None else str(version)
        body = canonical_json(clean_data(payload or {}))
        digest = entry_hash(seq, ts, actor, action, model, version, body, prev)
        self._conn.exec_driver_sql(
            f"INSERT INTO {TABLE} ({_COLS}) VALUES ({', '.join([_ph(self._conn)] * 9)})",
            (seq, ts, actor, action, model, version, body, prev, digest),
        )
        entry = AuditEntry(seq, ts, actor, action, model, version, body, prev, digest)
        self.appended.append(entry)
        return entry


def _select(conn, *, model=None, version=None, action=None, limit=None) -> list[AuditEntry]:
    ph = _ph(conn)
    where, args = [], []
    for col, val in (("model", model), ("version", None if version is None else str(version)), ("action", action)):
        if val is not None:
            where.append(f"{col} = {ph}")
            args.append(val)
    sql = f"SELECT {_COLS} FROM {TABLE}" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return [_row(r) for r in conn.exec_driver_sql(sql, tuple(args)).fetchall()]


class AuditLog:
    """The hash-chained audit log at a SQLAlchemy URL (see module docstring)."""

    def __init__(self, url: str | None = None):
        self.url = normalize_url(url) if url else default_url()
        if self.url in _SCHEMA_DONE and self.url.startswith("sqlite"):
            db = self.url.split("///", 1)[-1]
            if db and db != ":memory:" and not Path(db).exists():
                forget(self.url)  # deleted under this process: open it as a new database
        self._engine = _engine(self.url)
        self._ensure_schema()

    def _ensure_schema(self) -> None:
        if self.url in _SCHEMA_DONE:
            self.log_id = _SCHEMA_DONE[self.url]
            return
        import sqlalchemy as sa

        try:
            with self._engine.begin() as conn:
                _lock(conn)  # concurrent first users must not race on CREATE
                for ddl in _PG_DDL if _is_pg(conn) else _SQLITE_DDL:
                    conn.exec_driver_sql(ddl)
                row = conn.exec_driver_sql(f"SELECT log_id FROM {TABLE}_meta").fetchone()
                if row is None:
                    import uuid

                    row = (f"{location_id(self.url)}.{uuid.uuid4().hex}",)
                    conn.exec_driver_sql(f"INSERT INTO {TABLE}_meta (log_id) VALUES ({_ph(conn)})", row)
                self.log_id = row[0]
        except sa.exc.OperationalError as exc:
            raise TaskvecError(f"cannot open audit log at {redact_uri(self.url)}: {str(exc.orig).strip().splitlines()[0]}") from None
        _SCHEMA_DONE[self.url] = self.log_id

    @contextmanager
    def transaction(self) -> Iterator[AuditTransaction]:
        """A locked transaction: appends in it are committed together, or not at all.

        Committed on normal exit; rolled back if the body raises.
        """
        with self._engine.connect() as conn:
            conn.begin()
            try:
                _lock(conn)
                tx = AuditTransaction(conn)
                yield tx
                tx.commit()
            except BaseException:
                if conn.in_transaction():
                    conn.rollback()
                raise

    def append(self, action: str, model: str, version: str | int | None = None, payload: dict | None = None, *, actor: str | None = None) -> AuditEntry:
        with self.transaction() as tx:
            return tx.append(action, model, version, payload, actor=actor)

    def entries(self, model: str | None = None, version: str | int | None = None, action: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        with self._engine.connect() as conn:
            with conn.begin() if _is_pg(conn) else _nullctx():
                return _select(conn, model=model, version=version, action=action, limit=limit)

    def head(self) -> AuditEntry | None:
        with self._engine.connect() as conn:
            r = conn.exec_driver_sql(f"SELECT {_COLS} FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
            return _row(r) if r else None

    def verify(self, anchors: dict[str, str] | None = None, *, entries: list[AuditEntry] | None = None) -> VerifyReport:
        """Recompute the chain (:func:`~pipeline.ops.audit.chain.verify_chain`); ``anchors`` maps model → ``"log_id:seq:hash"`` recorded outside the database.

        ``entries``: the log's entries already read (e.g. inside an open :meth:`transaction`); default: read them.
        """
        return verify_chain(self.entries() if entries is None else entries, self.log_id, anchors)

    def foreign_anchor_problem(self, model: str, log_id: str, seq: int, *, has_entries: bool) -> str | None:
        """Why an anchor naming another log is a problem here (None: another deployment's log, fine)."""
        return foreign_anchor_problem(self.log_id, model, log_id, seq, has_entries=has_entries)

@contextmanager
def _nullctx():
    yield


