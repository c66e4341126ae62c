"""The hash-chained audit log: chain, append-only triggers, tamper detection, concurrent appenders."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from pipeline.ops.audit import GENESIS, AuditLog, format_entries
from taskvec.errors import TaskvecError
from tests.conftest_ops import *  # noqa: F401,F403


@pytest.fixture(params=["sqlite", "postgres"])
def log(request, tmp_path):
    if request.param == "sqlite":
        return AuditLog(f"sqlite:///{tmp_path / 'audit.db'}")
    return AuditLog(request.getfixturevalue("fresh_schema")())


def _raw(log: AuditLog, sql: str, args=()):
    """Tamper below the API: drop the append-only triggers first, as a DB admin could."""
    with log._engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE taskvec_audit DISABLE TRIGGER USER")
            conn.exec_driver_sql(sql, args)
            conn.exec_driver_sql("ALTER TABLE taskvec_audit ENABLE TRIGGER USER")
        else:
            conn.exec_driver_sql("DROP TRIGGER taskvec_audit_no_update")
            conn.exec_driver_sql("DROP TRIGGER taskvec_audit_no_delete")
            conn.exec_driver_sql(sql, args)


def _fill(log: AuditLog, n: int = 5):
    return [log.append("approve", "m", i, {"approver": "ann", "reason": f"r{i}", "x": 0.1 * i}, actor="ann") for i in range(1, n + 1)]


def test_chain_links_and_verifies(log):
    entries = _fill(log)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    rep = log.verify({"m": entries[-1].anchor(log.log_id)})
    assert rep.ok, rep.problems
    assert rep.entries == 5 and rep.anchors_checked == 1
    assert "approve" in format_entries(log.entries())


def test_updates_and_deletes_are_refused(log):
    _fill(log, 2)
    import sqlalchemy as sa

    for sql in ("UPDATE taskvec_audit SET actor = 'mallory' WHERE seq = 1", "DELETE FROM taskvec_audit WHERE seq = 2"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with log._engine.begin() as conn:
                conn.exec_driver_sql(sql)
    assert log.verify().ok and len(log.entries()) == 2


@pytest.mark.parametrize(
    "tamper, expect",
    [
        ("UPDATE taskvec_audit SET payload = '{\"approver\":\"mallory\"}' WHERE seq = 3", "entry 3: content does not match"),
        ("UPDATE taskvec_audit SET actor = 'mallory' WHERE seq = 1", "entry 1: content does not match"),
        ("DELETE FROM taskvec_audit WHERE seq = 2", "entry 2 is missing"),
        ("DELETE FROM taskvec_audit WHERE seq = 5", "anchored entry 5 is missing"),
        ("DELETE FROM taskvec_audit WHERE seq >= 4", "anchored entry 5 is missing"),
    ],
)
def test_verify_detects_edits_and_deletions(log, tamper, expect):
    entries = _fill(log)
    anchors = {"m": entries[-1].anchor(log.log_id)}
    assert log.verify(anchors).ok
    _raw(log, tamper)
    rep = log.verify(anchors)
    assert not rep.ok
    assert any(expect in p for p in rep.problems), rep.problems


def test_rehashed_forgery_is_caught_by_the_anchor(log):
    """An attacker who recomputes the hashes after an edit still breaks the chain or the anchor."""
    from pipeline.ops.audit import entry_hash

    entries = _fill(log, 3)
    anchors = {"m": entries[-1].anchor(log.log_id)}
    e = entries[2]
    forged = entry_hash(e.seq, e.ts, "mallory", e.action, e.model, e.version, e.payload, e.prev_hash)
    _raw(log, f"UPDATE taskvec_audit SET actor = 'mallory', hash = '{forged}' WHERE seq = 3")
    rep = log.verify(anchors)
    assert not rep.ok and any("differs from the anchor" in p for p in rep.problems)


def test_bad_input_is_one_line_error(log):
    with pytest.raises(TaskvecError, match="unknown audit action"):
        log.append("delete-everything", "m")
    with pytest.raises(TaskvecError, match="needs a model"):
        log.append("approve", "")
    assert log.entries() == []


def test_eight_concurrent_threads_keep_the_chain_linear(log):
    def worker(i):
        for k in range(10):
            log.append("request", f"m{i % 3}", i, {"k": k})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(1, 81))
    assert log.verify().ok


def _proc_append(url: str, i: int, n: int) -> None:
    from pipeline.ops.audit import AuditLog

    log = AuditLog(url)
    for k in range(n):
        log.append("request", "m", i, {"k": k, "proc": i})


def test_eight_concurrent_processes_keep_the_chain_linear(log):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_proc_append, args=(log.url, i, 5)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    entries = log.entries()
    assert len(entries) == 40 and [e.seq for e in entries] == list(range(1, 41))
    assert log.verify().ok


def test_rollback_of_transaction_appends_nothing(log):
    _fill(log, 1)
    with pytest.raises(RuntimeError):
        with log.transaction() as tx:
            tx.append("approve", "m", 9, {"approver": "x"})
            raise RuntimeError("boom")
    assert len(log.entries()) == 1 and log.verify().ok


def test_meta_table_is_write_once(log):
    """The log id row can be neither changed, deleted, truncated nor joined by a second row."""
    import sqlalchemy as sa

    _fill(log, 1)
    log_id = log.log_id
    statements = ["UPDATE taskvec_audit_meta SET log_id = 'forged'", "DELETE FROM taskvec_audit_meta", "INSERT INTO taskvec_audit_meta (log_id) VALUES ('second')"]
    if log.url.startswith("postgresql"):
        statements.append("TRUNCATE taskvec_audit_meta")
    for sql in statements:
        with pytest.raises(sa.exc.DBAPIError, match="write-once"):
            with log._engine.begin() as conn:
                conn.exec_driver_sql(sql)
    with log._engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT log_id FROM taskvec_audit_meta").fetchall() == [(log_id,)]


def test_log_id_names_its_location_and_a_recreated_log_is_caught(tmp_path):
    from pipeline.ops import audit as A

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    first = AuditLog(url)
    e = first.append("reject", "m", 1, {"approver": "bob", "reason": "no"}, actor="bob")
    anchor = e.anchor(first.log_id)
    assert first.log_id.split(".")[0] == A.location_id(url) == A.location_id(str(tmp_path / "audit.db"))
    (tmp_path / "audit.db").unlink()
    second = AuditLog(url)  # noticed the file is gone: a new database, a new random part
    assert second.log_id != first.log_id and second.log_id.split(".")[0] == first.log_id.split(".")[0]
    rep = second.verify({"m": anchor})
    assert not rep.ok and "deleted and recreated" in rep.problems[0]
    other = AuditLog(f"sqlite:///{tmp_path / 'other.db'}")  # another deployment's log: its anchors are not ours
    assert other.verify({"m": anchor}).ok
    A.forget(url)


def test_free_text_is_redacted_and_escaped_in_entries_and_show(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "s3cr3t-env-value")
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}")
    e = log.append("approve", "m", 1, {"reason": "see https://u:pw123@h/x, s3cr3t-env-value\n    2  forged row\r\x1b[31m\u202eevil", "n": [1, "a\nb"]}, actor="ann\nroot")
    assert e.data == {"reason": "see https://u:***@h/x, ***\\n    2  forged row\\r\\x1b[31m\\u202eevil", "n": [1, "a\\nb"]}
    assert e.actor == "ann\\nroot" and log.verify().ok
    shown = format_entries(log.entries()).splitlines()
    assert len(shown) == 2 and "\x1b" not in shown[1] and "pw123" not in shown[1]
