"""Append-only, hash-chained audit log of promotions, approvals, rejections and rollbacks.

Storage is one SQL table, ``taskvec_audit``, reached through SQLAlchemy: a
SQLite file for one machine, PostgreSQL (the MLflow backend's server) when
the pipeline is shared. Every entry carries::

    seq, ts, actor, action, model, version, payload (canonical JSON), prev_hash, hash

where ``hash = sha256(canonical JSON of all the other fields)`` and
``prev_hash`` is the previous entry's ``hash`` (64 zeros for the first). The
chain is linear because every append happens inside a transaction that first
takes a database-wide lock — ``BEGIN IMMEDIATE`` on SQLite,
``pg_advisory_xact_lock`` on PostgreSQL — reads the head, and inserts
``seq = head + 1``; concurrent writers (threads or processes, one machine or
many) serialise on that lock.

Append-only is enforced by triggers that abort any ``UPDATE``/``DELETE`` (and
``TRUNCATE`` on PostgreSQL) on *both* tables — the entries and
``taskvec_audit_meta``, which holds the log's id and accepts exactly one row —
and *detected* by :meth:`AuditLog.verify`, which
recomputes every hash, checks the ``seq`` run has no gap and every
``prev_hash`` links, and compares the head against *anchors* kept outside the
database (the ``taskvec.audit_head`` tag — ``log_id:seq:hash`` — that
:mod:`pipeline.ops.promotion` sets on each registered model with every entry of
that model), so cutting entries off the end is caught too.

``log_id`` is ``<location>.<random>``: ``location`` is a digest of where the
log lives (the SQLite file's absolute path, or the server URL without its
password), the random part is drawn when the table is created. Several audit
logs may share a registry (an anchor of another location is another
deployment's), but an anchor of the *same* location with another random part
means the database was deleted and recreated, or its meta row rewritten —
:meth:`AuditLog.verify` reports it, and :mod:`pipeline.ops.integrity` refuses
every audited write on a model anchored in another log, so a lost or replaced
database can never launder a rejection.

Free text in entries (payload strings, actor) is recorded through
:func:`taskvec.redact.clean_text`: credentials masked, control characters
escaped — the log never stores a password and no value can forge a row of
``audit show``.

:meth:`AuditLog.transaction` yields an open, locked transaction: callers do
their external side effects (moving an MLflow alias, setting tags) while the
lock is held, append the entry, and commit — or undo the side effects and
roll back. This package imports neither MLflow nor Prefect.

Modules: :mod:`~pipeline.ops.audit.chain` (entries, hashing, the chain check,
the printed form; reads no database) and :mod:`~pipeline.ops.audit.store`
(tables, triggers, engines, locks, :class:`AuditLog`). Every public name is
importable from ``pipeline.ops.audit``.
"""

from __future__ import annotations

from pipeline.ops.audit.chain import (
    ACTIONS,
    GENESIS,
    AuditEntry,
    VerifyReport,
    canonical_json,
    default_actor,
    entry_hash,
    foreign_anchor_problem,
    format_entries,
    now_iso,
    split_log_id,
    verify_chain,
)
from pipeline.ops.audit.store import _ENGINES, TABLE, AuditLog, AuditTransaction, default_url, forget, location_id, normalize_url

__all__ = [
    "ACTIONS", "GENESIS", "TABLE", "AuditEntry", "AuditLog", "AuditTransaction", "VerifyReport", "canonical_json", "default_actor",
    "default_url", "entry_hash", "foreign_anchor_problem", "forget", "format_entries", "location_id", "normalize_url", "now_iso",
    "split_log_id", "verify_chain", "_ENGINES",
]
