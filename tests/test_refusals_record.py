"""The record's refusal suite (issue 11): audit log, registry anchors, credentials, refuse-before-work.

ONE table of named cases, against a real MLflow SQLite store and the real
audit log (SQLite file beside it). Each case sets up its own store under
``tmp_path`` (an attacker's steps included) and returns a :class:`Case`: the
real CLI's argv (run in-process via ``pipeline.cli.main``) or a library call.
Every case asserts:

* exit status 2 (a user error), via ``SystemExit`` or ``TaskvecError``;
* stderr is exactly one line ``error: …`` containing the fragment naming the cause;
* the case's own ``check`` of the state afterwards (champion not moved, no
  audit entry appended, no output written).

Positive checks follow the table: free text is redacted and escaped everywhere
it lands (tag, audit row, ``audit show``, lineage), ``audit verify`` reports the
tampering, and a password given as ``--tracking-uri`` is not among the
parameters Prefect stores for the flow run.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.ops import audit as A
from pipeline.ops import promotion as P
from taskvec.errors import TaskvecError

SECRET = "hunter2pw"


# ---------------------------------------------------------------------------
# A store: MLflow SQLite registry (model m, versions 1-3) + SQLite audit log


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory):
    """An MLflow SQLite database with its schema already migrated (copied per test: migrations take seconds)."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("mlflow-template")
    uri = f"sqlite:///{d}/mlflow.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    return d / "mlflow.db"


@dataclass
class Store:
    root: Path

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.db"

    @property
    def audit_url(self) -> str:
        return f"sqlite:///{self.audit_path}"

    def ops(self) -> P.Ops:
        return P.Ops(self.mlflow_uri, self.audit_url)

    def uris(self) -> list[str]:
        return ["--tracking-uri", self.mlflow_uri, "--audit-url", self.audit_url]

    def gate(self, version: str, champion: str | None = None):
        spec = P.PromotionSpec(targets=["t1"], controls=[], target_floors={"t1": 0.5})
        return P.record_gates(self.ops(), "m", version, P.apply_gates({"t1": 0.9}, None, spec), champion_version=champion)

    def promote(self, version: str) -> None:
        ops = self.ops()
        self.gate(version, P.alias_version(ops.client, "m", "champion"))
        P.record_decision(ops, "m", version, "approve", "ann", "gates green")
        P.promote(ops, "m", version)

    def champion(self) -> str | None:
        return P.alias_version(self.ops().client, "m", "champion")

    def entries(self) -> int:
        return len(self.ops().audit.entries())

    def delete_audit_db(self) -> None:
        A.forget(self.audit_url)
        self.audit_path.unlink()

    def tamper(self, *sql: str) -> None:
        """A database admin's edits below the API: triggers dropped first."""
        A.forget(self.audit_url)
        con = sqlite3.connect(self.audit_path)
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            con.execute(f"DROP TRIGGER {name}")
        for s in sql:
            con.execute(s)
        con.commit()
        con.close()


@pytest.fixture
def store(tmp_path, mlflow_template) -> Store:
    root = tmp_path / "store"
    (root / "art").mkdir(parents=True)
    (root / "art" / "taskvec.json").write_text('{"edits": []}\n')  # an edited model folder carries its ledger
    shutil.copy(mlflow_template, root / "mlflow.db")
    s = Store(root)
    client = s.ops().client
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", str(root / "art"))
    yield s
    A.forget(s.audit_url)


# ---------------------------------------------------------------------------
# The table


@dataclass
class Case:
    argv: list[str] | None = None
    call: Callable[[], object] | None = None
    check: Callable[[], None] = lambda: None


CASES: list = []


def case(case_id: str, expect: str):
    def deco(fn):
        CASES.append(pytest.param(fn, expect, id=case_id))
        return fn

    return deco


def _unchanged(store: Store, champion: str | None, entries: int) -> Callable[[], None]:
    def check():
        assert store.champion() == champion, "the champion moved"
        assert store.entries() == entries, "an audit entry was appended"

    return check


def _reject_v1(store: Store) -> None:
    store.gate("1")
    P.record_decision(store.ops(), "m", "1", "reject", "bob", "regresses tone")


@case("audit-db-deleted-approve-rejected", "m version 1 is tagged rejected in MLflow")
def _(store, tmp):
    _reject_v1(store)
    store.delete_audit_db()
    return Case(["approve", "m", "1", "--approver", "mallory", "--reason", "again", "--no-resume", *store.uris()], check=_unchanged(store, None, 0))


@case("audit-db-deleted-gate-rejected", "m version 1 is tagged rejected in MLflow")
def _(store, tmp):  # what `promote --no-wait` records first
    _reject_v1(store)
    store.delete_audit_db()
    return Case(call=lambda: store.gate("1"), check=_unchanged(store, None, 0))


@case("audit-db-deleted-any-write", "but this audit log is")
def _(store, tmp):  # not only the rejected version: nothing is written to a replacement log
    _reject_v1(store)
    store.delete_audit_db()
    return Case(call=lambda: store.gate("2"), check=_unchanged(store, None, 0))


@case("audit-db-replaced-by-other-url", "audit database was replaced")
def _(store, tmp):
    _reject_v1(store)
    other = f"sqlite:///{tmp / 'elsewhere.db'}"
    return Case(call=lambda: P.record_gates(P.Ops(store.mlflow_uri, other), "m", "2", P.apply_gates({"t1": 0.9}, None, P.PromotionSpec(targets=["t1"])), champion_version=None))


@case("meta-rewritten-rows-deleted", "m version 1 is tagged rejected in MLflow")
def _(store, tmp):
    _reject_v1(store)  # entries 1 (request), 2 (reject)
    log_id = store.ops().audit.log_id
    store.tamper(f"UPDATE taskvec_audit_meta SET log_id = '{log_id.split('.')[0]}.forged'", "DELETE FROM taskvec_audit WHERE seq >= 2")
    return Case(["approve", "m", "1", "--approver", "mallory", "--reason", "x", "--no-resume", *store.uris()], check=_unchanged(store, None, 1))


@case("rows-deleted-from-rejection-on", "anchored entry 2 is missing")
def _(store, tmp):
    _reject_v1(store)
    store.tamper("DELETE FROM taskvec_audit WHERE seq >= 2")
    return Case(call=lambda: store.gate("2"), check=_unchanged(store, None, 1))


@case("hand-moved-alias-promote", "champion of m is version 2 in MLflow but version 1 (entry 3) in the audit log")
def _(store, tmp):
    store.promote("1")  # entries 1-3
    store.gate("3", "1")
    P.record_decision(store.ops(), "m", "3", "approve", "ann", "ok")  # entries 4-5: approved, not yet moved
    store.ops().client.set_registered_model_alias("m", "champion", "2")  # by hand, outside the audited path
    return Case(call=lambda: P.promote(store.ops(), "m", "3"), check=_unchanged(store, "2", 5))


@case("hand-moved-alias-approve", "champion of m is version 2 in MLflow but version 1 (entry 3) in the audit log")
def _(store, tmp):
    store.promote("1")
    store.gate("3", "1")
    store.ops().client.set_registered_model_alias("m", "champion", "2")
    return Case(["approve", "m", "3", "--approver", "ann", "--reason", "ok", "--no-resume", *store.uris()], check=_unchanged(store, "2", 4))


@case("hand-set-alias-never-audited", "champion of m is version 2 in MLflow but never set in the audit log")
def _(store, tmp):
    store.gate("3")
    store.ops().client.set_registered_model_alias("m", "champion", "2")
    return Case(["approve", "m", "3", "--approver", "ann", "--reason", "ok", "--no-resume", *store.uris()], check=_unchanged(store, "2", 1))


@case("anchor-tag-deleted", "has no taskvec.audit_head anchor")
def _(store, tmp):
    store.gate("1")
    store.ops().client.delete_registered_model_tag("m", "taskvec.audit_head")
    return Case(call=lambda: store.gate("2"), check=_unchanged(store, None, 1))


# -- refuse before work: data and training ----------------------------------


def _project(tmp: Path) -> Path:
    from tests.conftest_pipeline import write_project

    return write_project(tmp / "proj")


@case("run-bad-control-label", "spam/test.csv data row 3 has unknown label 'hamm'")
def _(store, tmp):
    root = _project(tmp)
    lines = (root / "data" / "spam" / "test.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",hamm"
    (root / "data" / "spam" / "test.csv").write_text("\n".join(lines) + "\n")

    def check():
        assert not (root / "outputs").exists() and not (root / "mlflow.db").exists(), "work started"

    return Case(["run", "--params", str(root / "params.yaml"), "--no-dvc"], check=check)


@case("run-latin1-csv", "is not UTF-8 text (byte 0xe9 at byte offset 18)")
def _(store, tmp):
    root = _project(tmp)
    (root / "data" / "topic" / "validation.csv").write_bytes("text,label\nthe caf\xe9 team,sports\n".encode("latin-1"))

    def check():
        assert not (root / "outputs").exists(), "work started"

    return Case(["run", "--params", str(root / "params.yaml"), "--no-dvc"], check=check)


@case("finetune-diverges", "task senti: the fine-tune diverged (non-finite weights in")
def _(store, tmp):
    import yaml

    root = _project(tmp)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = 1.0e6
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp / "ft-out"

    def check():
        assert not out.exists() and not list(tmp.glob(".ft-out*")), "output written"

    return Case(["finetune", "senti", "-p", str(root / "params.yaml"), "-o", str(out), "-q"], check=check)


@pytest.mark.parametrize(("build", "expect"), CASES)
def test_refusal(build, expect, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("TASKVEC_AUDIT_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    c = build(store, tmp_path)
    capsys.readouterr()
    if c.argv is not None:
        with pytest.raises(SystemExit) as exc:
            cli_main(c.argv)
        code = exc.value.code if isinstance(exc.value.code, int) else 1
        err = capsys.readouterr().err
    else:
        with pytest.raises(TaskvecError) as exc:
            c.call()
        code, err = exc.value.exit_code, f"error: {exc.value}\n"
    # progress bars of model loading / tokenising (printed by the `finetune` command even with -q, before
    # training: not this suite's concern) are not error output; everything else must be the one line
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2, f"exit status {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{err}"
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    c.check()


def test_every_class_is_in_the_table():
    ids = {p.id for p in CASES}
    assert len(ids) == len(CASES) >= 13


# ---------------------------------------------------------------------------
# verify reports what the refusals refuse


def _verify(store: Store, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(["audit", "verify", *store.uris()])
    return exc.value.code, capsys.readouterr().out


def test_verify_detects_deleted_rewritten_and_hand_moved(store, capsys):
    _reject_v1(store)
    store.promote("2")
    assert _verify(store, capsys)[0] == 0
    store.ops().client.set_registered_model_alias("m", "champion", "3")
    code, out = _verify(store, capsys)
    assert code == 1 and "alias champion points to 3 but the audit log says 2" in out
    store.ops().client.set_registered_model_alias("m", "champion", "2")
    store.tamper("UPDATE taskvec_audit_meta SET log_id = 'x.y'")
    code, out = _verify(store, capsys)
    assert code == 1 and "anchor names another audit log" in out and "was rejected in audit log" not in out
    store.delete_audit_db()
    code, out = _verify(store, capsys)
    assert code == 1 and "deleted and recreated" in out and "version 1 was rejected in audit log" in out


def test_meta_table_is_write_once(store):
    import sqlalchemy as sa

    store.gate("1")
    log = store.ops().audit
    for sql in ("UPDATE taskvec_audit_meta SET log_id = 'x'", "DELETE FROM taskvec_audit_meta", "INSERT INTO taskvec_audit_meta (log_id) VALUES ('y')"):
        with pytest.raises(sa.exc.DBAPIError, match="write-once"):
            with log._engine.begin() as conn:
                conn.exec_driver_sql(sql)
    assert store.ops().audit.log_id == log.log_id and store.ops().audit.verify().ok


# ---------------------------------------------------------------------------
# Free text: redacted and escaped wherever it lands


def test_password_and_newline_in_reason_are_cleaned_everywhere(store, tmp_path, capsys, monkeypatch):
    import yaml

    from tests.conftest_pipeline import write_project

    monkeypatch.delenv("TASKVEC_AUDIT_URL", raising=False)
    store.gate("1")
    reason = f"ok per postgresql://admin:{SECRET}@db:5432/prod and password={SECRET}\n    9  2026-01-01T00:00:00  mallory  promote  m  1  forged\x1b[2J\u202e"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(["approve", "m", "1", "--approver", f"ann\nroot", "--reason", reason, "--no-resume", *store.uris()])
    assert exc.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert SECRET not in out
    ops = store.ops()
    # the audit rows (approval record and the move) and the version's tags
    for e in ops.audit.entries(model="m")[1:]:
        assert SECRET not in e.payload and "\n" not in e.payload and "\x1b" not in e.payload and "\u202e" not in e.payload
        assert e.data["reason"].startswith("ok per postgresql://admin:***@db:5432/prod and password=***\\n    9")
        assert e.actor == "ann\\nroot"
    tags = ops.client.get_model_version("m", "1").tags
    assert tags["approval_reason"] == ops.audit.entries(model="m", action="approve")[0].data["reason"]
    assert tags["approved_by"] == "ann\\nroot" and SECRET not in json.dumps(tags)
    # audit show: one row per entry, nothing forged
    with pytest.raises(SystemExit):
        cli_main(["audit", "show", "--audit-url", store.audit_url])
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 1 + 3, shown  # header + request, approve, promote
    assert [row.split()[0] for row in shown[1:]] == ["1", "2", "3"] and SECRET not in "\n".join(shown)
    # lineage of the version
    root = write_project(tmp_path / "proj")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = store.mlflow_uri
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the environment wins over params; another test may have exported one
    with pytest.raises(SystemExit):
        cli_main(["lineage", "m", "1", "--params", str(root / "params.yaml")])
    lineage = capsys.readouterr().out
    assert "approval_reason: ok per postgresql://admin:***@db" in lineage and SECRET not in lineage
    assert all("forged" not in line or "\\n" in line for line in lineage.splitlines())


# ---------------------------------------------------------------------------
# Credentials never become Prefect flow-run parameters


@pytest.mark.postgres
def test_password_in_tracking_uri_is_not_a_flow_run_parameter(fresh_db, prefect_harness, tmp_path, capsys, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.promote import promote_flow
    from tests.conftest_ops import PG_HOST, PG_PORT, PG_USER

    db = fresh_db("taskvec_secret_uri")
    # trust auth ignores the password, so this URI with a password really works as the tracking store
    uri = f"postgresql+psycopg2://{PG_USER}:{SECRET}@{PG_HOST}:{PG_PORT}/{db}"
    params = tmp_path / "params.yaml"
    params.write_text("tasks:\n  t1: {source: x, labels: [a, b]}\n  c1: {source: y, labels: [a, b]}\nfinetune: {tasks: [t1]}\nedit: {learn: [t1], control: [c1]}\npromotion:\n  targets: [t1]\n")
    for var in ("MLFLOW_TRACKING_URI", "TASKVEC_AUDIT_URL"):  # recorded, so what the CLI exports is undone after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)

    def runs() -> list[dict]:
        with get_client(sync_client=True) as c:
            return [r.parameters for r in c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])))]

    from mlflow import MlflowClient

    art = tmp_path / "art"
    art.mkdir()
    (art / "taskvec.json").write_text('{"edits": []}\n')
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", str(art))
    before = len(runs())
    with pytest.raises(SystemExit):  # the flow run starts; its evaluation of the bare folder then fails
        cli_main(["promote", "m", "--version", "1", "--no-wait", "--params", str(params), "--tracking-uri", uri, "--audit-url", f"sqlite:///{tmp_path / 'audit.db'}"])
    assert SECRET not in capsys.readouterr().err
    stored = runs()
    assert len(stored) == before + 1
    new = [p for p in stored if p.get("params_file") == str(params)]
    assert len(new) == 1 and new[0]["tracking_uri"] is None, new
    assert SECRET not in json.dumps(stored)
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # where the flow read it from
    # control: the same URI given directly as a flow parameter is stored by Prefect (what the CLI avoids)
    with pytest.raises(Exception):
        promote_flow(model="absent", params_file=str(tmp_path / "control.yaml"), tracking_uri=uri, wait_for_approval=False)
    assert SECRET in json.dumps(runs())


def test_issue_repro_promote_no_wait_then_approve_after_audit_db_deleted(store, prefect_harness, tmp_path, capsys, monkeypatch):
    """The tester's steps: reject, delete audit.db, `promote --no-wait`, `approve --no-resume` — refused at each step."""
    monkeypatch.delenv("TASKVEC_AUDIT_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("tasks:\n  t1: {source: x, labels: [a, b]}\n  c1: {source: y, labels: [a, b]}\nfinetune: {tasks: [t1]}\nedit: {learn: [t1], control: [c1]}\npromotion:\n  targets: [t1]\n")
    promote = ["promote", "m", "--version", "1", "--no-wait", "--params", str(params), "--evaluator", "tests.conftest_ops:fake_evaluate", *store.uris()]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(promote)
    assert exc.value.code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["status"] == "awaiting_approval"
    with pytest.raises(SystemExit) as exc:
        cli_main(["reject", "m", "1", "--approver", "bob", "--reason", "regresses", "--no-resume", *store.uris()])
    assert exc.value.code == 0
    store.delete_audit_db()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(promote)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: refusing to request m version 1: m version 1 is tagged rejected in MLflow" in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["approve", "m", "1", "--approver", "mallory", "--reason", "again", "--no-resume", *store.uris()])
    assert exc.value.code == 2 and "is tagged rejected in MLflow" in capsys.readouterr().err
    assert store.champion() is None and store.entries() == 0


def test_by_environment_moves_only_credential_uris(monkeypatch):
    from flows.promote import by_environment

    for var in ("MLFLOW_TRACKING_URI", "TASKVEC_AUDIT_URL"):
        monkeypatch.setenv(var, "")
    secret_pg = f"postgresql://mlflow:{SECRET}@db/mlflow"
    assert by_environment("sqlite:///mlflow.db", f"https://host/audit?token={SECRET}") == ("sqlite:///mlflow.db", None)
    assert os.environ["TASKVEC_AUDIT_URL"] == f"https://host/audit?token={SECRET}" and os.environ["MLFLOW_TRACKING_URI"] == ""
    assert by_environment(secret_pg, None) == (None, None) and os.environ["MLFLOW_TRACKING_URI"] == secret_pg


def test_schedule_refuses_credentials_in_deployment_parameters(tmp_path):
    from flows.schedule import schedule_config

    p = tmp_path / "params.yaml"
    p.write_text(f"tasks:\n  t1: {{source: x, labels: [a, b]}}\n  c1: {{source: y, labels: [a, b]}}\nfinetune: {{tasks: [t1]}}\nedit: {{learn: [t1], control: [c1]}}\nschedule:\n  parameters:\n    force: true\n    note: 'db at postgresql://u:{SECRET}@h/db'\n")
    with pytest.raises(TaskvecError, match="schedule.parameters.note holds a credential") as err:
        schedule_config(p)
    assert SECRET not in str(err.value)
    p.write_text("tasks:\n  t1: {source: x, labels: [a, b]}\n  c1: {source: y, labels: [a, b]}\nfinetune: {tasks: [t1]}\nedit: {learn: [t1], control: [c1]}\nschedule:\n  parameters:\n    force: true\n")
    assert schedule_config(p)["parameters"]["force"] is True


from tests.conftest_ops import fresh_db, pg, prefect_harness  # noqa: E402,F401 - fixtures
