"""Gates, approval records and the audited champion move against a real MLflow server (PostgreSQL store)."""

from __future__ import annotations

import threading

import pytest

from pipeline.ops import promotion as P
from taskvec.errors import TaskvecError
from tests.conftest_ops import *  # noqa: F401,F403

pytestmark = pytest.mark.postgres


# ---------------------------------------------------------------------------
# Gates (pure)


def _spec(**kw):
    return P.PromotionSpec(targets=["t1"], controls=["c1"], target_floors={"t1": 0.7}, max_control_drop=1.0, **kw)


def test_gates_pass_and_fail():
    ok = P.apply_gates({"t1": 0.8, "c1": 0.895}, {"t1": 0.6, "c1": 0.90}, _spec())
    assert ok.passed
    drop = P.apply_gates({"t1": 0.8, "c1": 0.88}, {"t1": 0.6, "c1": 0.90}, _spec())
    assert not drop.passed and [g.gate for g in drop.gates if not g.passed] == ["control_drop"]
    floor = P.apply_gates({"t1": 0.69, "c1": 0.90}, {"t1": 0.6, "c1": 0.90}, _spec())
    assert not floor.passed and [g.gate for g in floor.gates if not g.passed] == ["target_floor"]
    missing = P.apply_gates({"t1": 0.9}, None, _spec())
    assert not missing.passed
    first = P.apply_gates({"t1": 0.9, "c1": 0.5}, None, _spec())
    assert first.passed  # no champion yet: nothing to drop from
    md = ok.markdown(_spec(), "x")
    assert "| t1 | target |" in md and "PASSED" in md


def test_load_spec_reads_params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("edit:\n  learn: [t1]\n  control: [c1]\npromotion:\n  max_control_drop: 0.5\n  target_floors: {t1: 0.8}\n")
    spec = P.load_spec(p)
    assert spec.targets == ["t1"] and spec.controls == ["c1"] and spec.max_control_drop == 0.5
    p.write_text("promotion:\n  max_control_drop: -1\n")
    with pytest.raises(TaskvecError, match="promotion.max_control_drop"):
        P.load_spec(p)
    p.write_text("promotion:\n  typo: 1\n")
    with pytest.raises(TaskvecError, match="promotion.typo"):
        P.load_spec(p)


# ---------------------------------------------------------------------------
# Approval records and the audited move


def _gate(ops, model, version, passed=True):
    cmp = P.apply_gates({"t1": 0.8 if passed else 0.1, "c1": 0.9}, None, _spec())
    return P.record_gates(ops, model, version, cmp, champion_version=P.alias_version(ops.client, model, "champion"))


def _state(ops, model):
    return P.alias_version(ops.client, model, "champion"), len(ops.audit.entries())


def test_promotion_needs_an_approval_record(ops, edits, model_name):
    v = register_edit(ops, model_name, edits, [("t1", 0.5)])
    before = _state(ops, model_name)
    with pytest.raises(TaskvecError, match="no approval record"):
        P.promote(ops, model_name, v)
    assert _state(ops, model_name) == before
    with pytest.raises(TaskvecError, match="no gate evaluation"):
        P.record_decision(ops, model_name, v, "approve", "ann", "looks good")
    _gate(ops, model_name, v)
    rec = P.record_decision(ops, model_name, v, "approve", "ann", "looks good")
    move = P.promote(ops, model_name, v)
    assert move.to_version == v and move.from_version is None and move.approval.seq == rec.seq
    mv = ops.client.get_model_version(model_name, v)
    assert mv.tags["approved_by"] == "ann" and mv.tags["approval_reason"] == "looks good"
    assert mv.tags["approved_at"] == rec.ts and "target_floor" in mv.tags["gate_results"]
    assert P.alias_version(ops.client, model_name, "champion") == v
    # the approval is consumed: the same record cannot promote twice
    v2 = register_edit(ops, model_name, edits, [("t1", 0.6)])
    with pytest.raises(TaskvecError, match="no approval record"):
        P.promote(ops, model_name, v2)
    assert P.verify(ops).ok


def test_failed_gates_cannot_be_approved(ops, edits, model_name):
    v = register_edit(ops, model_name, edits, [("bad", 1.0)])
    _gate(ops, model_name, v, passed=False)
    with pytest.raises(TaskvecError, match="failed its promotion gates"):
        P.record_decision(ops, model_name, v, "approve", "ann", "please")


def test_rejected_challenger_never_becomes_champion(ops, edits, model_name):
    v = register_edit(ops, model_name, edits, [("t1", 0.5)])
    _gate(ops, model_name, v)
    P.record_decision(ops, model_name, v, "reject", "bob", "regresses tone")
    with pytest.raises(TaskvecError, match="already rejected"):
        P.record_decision(ops, model_name, v, "approve", "ann", "overrule")
    with pytest.raises(TaskvecError, match="rejected"):
        P.promote(ops, model_name, v)
    with pytest.raises(TaskvecError, match="rejected"):
        P.move_alias(ops, model_name, v, action="revert", inline_approval=("ann", "force"))
    assert P.alias_version(ops.client, model_name, "champion") is None
    assert P.verify(ops).ok


def test_bad_inputs_are_one_line_errors(ops, edits, model_name):
    v = register_edit(ops, model_name, edits, [("t1", 0.5)])
    n = len(ops.audit.entries())
    for call, msg in [
        (lambda: P.record_decision(ops, model_name, "99", "approve", "a", "r"), "no version 99"),
        (lambda: P.record_decision(ops, "no-such-model", v, "approve", "a", "r"), "not found"),
        (lambda: P.record_decision(ops, model_name, v, "maybe", "a", "r"), "approve or reject"),
        (lambda: P.record_decision(ops, model_name, v, "approve", " ", "r"), "approver"),
        (lambda: P.record_decision(ops, model_name, v, "approve", "a", ""), "reason"),
        (lambda: P.revert_champion(ops, model_name, approver="a", reason="r"), "no previous champion"),
    ]:
        with pytest.raises(TaskvecError, match=msg) as ei:
            call()
        assert "\n" not in str(ei.value)
    assert len(ops.audit.entries()) == n


@pytest.mark.parametrize("fault", ["tags", "after_alias", "after_tags", "before_commit", "anchor"])
def test_failure_mid_promotion_restores_everything(ops, edits, model_name, monkeypatch, fault):
    v1 = register_edit(ops, model_name, edits, [("t1", 0.5)])
    _gate(ops, model_name, v1)
    P.record_decision(ops, model_name, v1, "approve", "ann", "first")
    P.promote(ops, model_name, v1)
    v2 = register_edit(ops, model_name, edits, [("t1", 0.7)])
    _gate(ops, model_name, v2)
    P.record_decision(ops, model_name, v2, "approve", "ann", "second")
    entries_before = len(ops.audit.entries())
    anchor_before = ops.client.get_registered_model(model_name).tags[P.ANCHOR_TAG]
    tags_before = dict(ops.client.get_model_version(model_name, v2).tags)

    from mlflow import MlflowClient

    if fault == "tags":
        real = MlflowClient.set_model_version_tag
        calls = {"n": 0}

        def flaky(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # fail in the middle of the tag writes
                raise RuntimeError("tag store down")
            return real(self, *a, **k)

        monkeypatch.setattr(MlflowClient, "set_model_version_tag", flaky)
    elif fault == "anchor":
        monkeypatch.setattr(MlflowClient, "set_registered_model_tag", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("anchor down")))
    else:
        monkeypatch.setenv("TASKVEC_FAULT", fault)
    with pytest.raises(RuntimeError):
        P.promote(ops, model_name, v2)
    monkeypatch.undo()
    assert P.alias_version(ops.client, model_name, "champion") == v1
    assert len(ops.audit.entries()) == entries_before
    assert dict(ops.client.get_model_version(model_name, v2).tags) == tags_before
    assert ops.client.get_registered_model(model_name).tags[P.ANCHOR_TAG] == anchor_before
    assert P.verify(ops).ok
    # the approval was not consumed: the retry succeeds
    assert P.promote(ops, model_name, v2).to_version == v2


def test_champion_revert_fast_path(ops, edits, model_name):
    vs = []
    for lam in (0.3, 0.6):
        v = register_edit(ops, model_name, edits, [("t1", lam)])
        _gate(ops, model_name, v)
        P.record_decision(ops, model_name, v, "approve", "ann", f"lam {lam}")
        P.promote(ops, model_name, v)
        vs.append(v)
    move = P.revert_champion(ops, model_name, approver="carol", reason="incident 42")
    assert (move.from_version, move.to_version) == (vs[1], vs[0])
    assert P.alias_version(ops.client, model_name, "champion") == vs[0]
    last = ops.audit.entries(model=model_name)[-2:]
    assert [e.action for e in last] == ["approve", "revert"] and last[1].data["approver"] == "carol"
    assert ops.client.get_model_version(model_name, vs[0]).tags["approved_by"] == "carol"
    assert P.verify(ops).ok


def test_verify_detects_out_of_band_alias_move_and_truncation(ops, edits, model_name):
    v1 = register_edit(ops, model_name, edits, [("t1", 0.5)])
    v2 = register_edit(ops, model_name, edits, [("t2", 0.5)])
    _gate(ops, model_name, v1)
    P.record_decision(ops, model_name, v1, "approve", "ann", "ok")
    P.promote(ops, model_name, v1)
    assert P.verify(ops).ok
    ops.client.set_registered_model_alias(model_name, "champion", v2)  # bypassing the audited path
    rep = P.verify(ops)
    assert not rep.ok and any("outside the audited path" in p for p in rep.problems)
    ops.client.set_registered_model_alias(model_name, "champion", v1)
    with ops.audit._engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE taskvec_audit DISABLE TRIGGER USER")
        conn.exec_driver_sql("DELETE FROM taskvec_audit WHERE seq = (SELECT max(seq) FROM taskvec_audit)")
        conn.exec_driver_sql("ALTER TABLE taskvec_audit ENABLE TRIGGER USER")
    rep = P.verify(ops)
    assert not rep.ok and any("missing" in p for p in rep.problems)


# ---------------------------------------------------------------------------
# Reliability: eight concurrent writers against one backend


def test_eight_concurrent_promotions(ops, edits, model_name):
    versions = [register_edit(ops, model_name, edits, [("t1", 0.1 * (i + 1))], log_vectors=False) for i in range(8)]
    for v in versions:
        _gate(ops, model_name, v)
        P.record_decision(ops, model_name, v, "approve", f"approver-{v}", "batch")
    errors, moves = [], []

    def go(v):
        try:
            moves.append(P.promote(P.Ops(ops.client.tracking_uri, ops.audit.url), model_name, v))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    promos = [e for e in ops.audit.entries(model=model_name) if e.action == "promote"]
    assert len(promos) == 8 and sorted(e.version for e in promos) == sorted(versions)
    # the moves form one linear history: each from_version is the previous to_version
    assert promos[0].data["from_version"] is None
    assert all(b.data["from_version"] == a.data["to_version"] for a, b in zip(promos, promos[1:]))
    assert P.alias_version(ops.client, model_name, "champion") == promos[-1].version
    rep = P.verify(ops)
    assert rep.ok, rep.problems


def test_eight_concurrent_registrations(ops, edits, model_name):
    from mlflow.exceptions import MlflowException

    folder = edits.build([("t1", 0.2)])
    try:
        ops.client.create_registered_model(model_name)
    except MlflowException:
        pass
    got, errors = [], []

    def go(i):
        try:
            got.append(register_folder(P.Ops(ops.client.tracking_uri, ops.audit.url), model_name, folder, tags={"i": str(i)}, description="c"))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(got)) == 8
    listed = ops.client.search_model_versions(f"name = '{model_name}'")
    assert sorted(int(m.version) for m in listed) == list(range(1, 9))
    assert sorted(m.tags["i"] for m in listed) == [str(i) for i in range(8)]
