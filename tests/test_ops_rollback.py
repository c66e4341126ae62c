"""Rollback θ_edit − λτ against a real MLflow server: checked, registered, audited; bad input changes nothing."""

from __future__ import annotations

import json

import pytest

from pipeline.ops import promotion as P
from pipeline.ops.rollback import rollback
from taskvec.errors import TaskvecError
from tests.conftest_ops import *  # noqa: F401,F403

pytestmark = pytest.mark.postgres


def _champion(ops, model, v):
    cmp = P.apply_gates({"t1": 0.9}, None, P.PromotionSpec(targets=["t1"]))
    P.record_gates(ops, model, v, cmp, champion_version=None)
    P.record_decision(ops, model, v, "approve", "ann", "ship")
    P.promote(ops, model, v)


def _snapshot(ops, model):
    versions = sorted(int(m.version) for m in ops.client.search_model_versions(f"name = '{model}'"))
    return versions, P.alias_version(ops.client, model, "champion"), len(ops.audit.entries())


def test_rollback_of_champion_edit(ops, edits, model_name, tmp_path):
    v = register_edit(ops, model_name, edits, [("t1", 0.7), ("t2", 0.4), ("bad", 0.9)])
    _champion(ops, model_name, v)
    res = rollback(ops, model_name, edits.sha["bad"], approver="oncall", reason="bad edit hurts c1")
    assert res.source_version == v and res.new_version != v
    assert res.check.ok and res.check.max_abs_diff < 1e-5 and res.check.max_ulps <= res.check.tolerance_ulps
    # ledger of the new version: the removed edit and its negation are gone
    mv = ops.client.get_model_version(model_name, res.new_version)
    ledger = json.loads(mv.tags["taskvec.ledger"])
    assert [e["vector_sha256"] for e in ledger["edits"]] == [edits.sha["t1"], edits.sha["t2"]]
    assert float(mv.tags["taskvec.rollback_max_abs_diff"]) == res.check.max_abs_diff
    # the artifact's taskvec.json matches and its output_hash is the real weights' hash
    from taskvec.io import TensorSource

    folder = P.download_version(mv, tmp_path / "dl", ops.client.tracking_uri)
    on_disk = json.loads((folder / "taskvec.json").read_text())
    assert on_disk["edits"] == ledger["edits"]
    with TensorSource(folder) as s:
        assert s.content_hash() == on_disk["output_hash"]
    # champion moved through the audited path
    assert P.alias_version(ops.client, model_name, "champion") == res.new_version
    assert res.champion_moved and res.champion_moved.entry.action == "rollback"
    last = ops.audit.entries(model=model_name)[-2:]
    assert [e.action for e in last] == ["approve", "rollback"]
    assert last[1].data["removed_vector"] == edits.sha["bad"] and last[1].data["max_abs_diff"] == res.check.max_abs_diff
    assert mv.tags["approved_by"] == "oncall"
    assert P.verify(ops).ok
    # and the fast path takes us back
    back = P.revert_champion(ops, model_name, approver="oncall", reason="false alarm")
    assert back.to_version == v


def test_rollback_of_a_compressed_version(ops, edits, model_name, tmp_path):
    """A version serving base + Σλτ̂ rolls back from the exact weights its ledger describes; the new version is compressed like params says."""
    folder = edits.build([("t1", 0.5), ("bad", 0.5)])
    spec = {"dtype": "bfloat16", "density": 0.5}
    v = register_folder(ops, model_name, folder, vectors=[edits.vectors["t1"], edits.vectors["bad"]], compress=spec)
    _champion(ops, model_name, v)
    params = tmp_path / "params.yaml"
    params.write_text("register:\n  compress: {dtype: bfloat16, density: 0.5}\n")
    res = rollback(ops, model_name, edits.sha["bad"], approver="oncall", reason="bad edit", params_file=params, evaluator=fake_evaluate, search_dirs=[edits.vectors["t1"].parent])
    assert res.check.ok and res.check.max_abs_diff < 1e-5  # θ − λτ from the exact weights, not the served θ̂
    mv = ops.client.get_model_version(model_name, res.new_version)
    comp = json.loads(mv.tags["taskvec.compression"])
    assert comp["spec"] == spec and comp["max_abs_weight_error"] > 0
    assert [e["vector_sha256"] for e in json.loads(mv.tags["taskvec.ledger"])["edits"]] == [edits.sha["t1"]]
    from taskvec.io import TensorSource

    served = P.download_version(mv, tmp_path / "dl", ops.client.tracking_uri)
    with TensorSource(served) as s:
        assert s.content_hash() == comp["output_hash"] != mv.tags["taskvec.output_hash"]
    # a bad compress spec in params is refused before anything is registered
    params.write_text("register:\n  compress: {density: 2}\n")
    before = _snapshot(ops, model_name)
    with pytest.raises(TaskvecError, match="register.compress"):
        rollback(ops, model_name, edits.sha["t1"], params_file=params, evaluator=fake_evaluate, search_dirs=[edits.vectors["t1"].parent])
    assert _snapshot(ops, model_name) == before


def test_rollback_to_base_and_of_non_champion(ops, edits, model_name, tmp_path):
    v1 = register_edit(ops, model_name, edits, [("t2", 0.5)])
    _champion(ops, model_name, v1)
    v2 = register_edit(ops, model_name, edits, [("t1", 1.0)])
    res = rollback(ops, model_name, edits.sha["t1"][:16], version=v2, weights="full")
    assert res.check.ok and res.ledger["edits"] == []
    # full weights on request: the raw artifact is the whole base model folder
    mv = ops.client.get_model_version(model_name, res.new_version)
    assert mv.tags["taskvec.weights"] == "full"
    raw = P.download_version(mv, tmp_path / "raw", ops.client.tracking_uri, thin_ok=False)
    assert (raw / "model.safetensors").read_bytes() == (edits.base / "model.safetensors").read_bytes()
    assert res.champion_moved is None and P.alias_version(ops.client, model_name, "champion") == v1
    assert res.notes and "champion unchanged" in res.notes[0]
    e = ops.audit.entries(model=model_name)[-1]
    assert e.action == "rollback" and e.data["alias"] is None and e.version == res.new_version
    assert P.verify(ops).ok


def test_rollback_finds_vectors_locally_or_explicitly(ops, edits, model_name, tmp_path):
    v = register_edit(ops, model_name, edits, [("t1", 0.5), ("t2", 0.5)], log_vectors=False)
    with pytest.raises(TaskvecError, match="not found"):
        rollback(ops, model_name, edits.sha["t1"], version=v, search_dirs=[tmp_path])
    res = rollback(ops, model_name, edits.sha["t1"], version=v, search_dirs=[edits.vectors["t1"].parent])
    assert res.check.ok
    with pytest.raises(TaskvecError, match="no vector file with sha256"):
        rollback(ops, model_name, edits.sha["t2"], version=v, vectors=[edits.vectors["t1"]], search_dirs=[])


def test_bad_rollbacks_change_nothing(ops, edits, model_name):
    v1 = register_edit(ops, model_name, edits, [("t1", 0.5)])
    _champion(ops, model_name, v1)
    register_edit(ops, model_name, edits, [("t2", 0.5)])
    before = _snapshot(ops, model_name)
    cases = [
        (edits.sha["t2"], "does not contain vector"),  # known vector (in v2), not in the champion
        ("ab" * 32, "unknown vector"),
        ("xyz", "bad vector sha256"),
        (edits.sha["t1"][:4], "bad vector sha256"),
    ]
    for sha, msg in cases:
        with pytest.raises(TaskvecError, match=msg) as ei:
            rollback(ops, model_name, sha)
        assert "\n" not in str(ei.value)
    with pytest.raises(TaskvecError, match="no version 42"):
        rollback(ops, model_name, edits.sha["t1"], version="42")
    with pytest.raises(TaskvecError, match="not found"):
        rollback(ops, "nope-" + model_name, edits.sha["t1"])
    assert _snapshot(ops, model_name) == before


@pytest.fixture
def cli(ops, monkeypatch, capsys):
    """``run(*argv) -> (exit code, stdout, stderr)`` of the full ``taskvec`` command on the test's registry and audit log."""
    from pipeline.cli import main

    monkeypatch.setenv("TASKVEC_AUDIT_URL", ops.audit.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ops.client.tracking_uri)

    def run(*argv):
        with pytest.raises(SystemExit) as ei:
            main(list(argv))
        out = capsys.readouterr()
        return ei.value.code, out.out, out.err

    return run


def test_cli_commands(ops, edits, model_name, cli, capsys):
    v1 = register_edit(ops, model_name, edits, [("t1", 0.5)])
    capsys.readouterr()
    code, _, err = cli("approve", model_name, v1, "--approver", "ann", "--reason", "ok")
    assert code == 2 and err.startswith("error: ") and "no gate evaluation" in err
    cmp = P.apply_gates({"t1": 0.9}, None, P.PromotionSpec(targets=["t1"]))
    P.record_gates(ops, model_name, v1, cmp, champion_version=None)
    code, out, err = cli("approve", model_name, v1, "--approver", "ann", "--reason", "ok", "--no-resume")
    assert code == 0, err
    assert "champion of" in out and P.alias_version(ops.client, model_name, "champion") == v1
    v2 = register_edit(ops, model_name, edits, [("bad", 1.0)])
    capsys.readouterr()
    P.record_gates(ops, model_name, v2, cmp, champion_version=v1)
    code, out, _ = cli("reject", model_name, v2, "--approver", "bob", "--reason", "no")
    assert code == 0 and "recorded reject" in out
    code, _, err = cli("approve", model_name, v2, "--approver", "ann", "--reason", "x")
    assert code == 2 and "rejected" in err
    code, out, err = cli("rollback", model_name, "--remove", edits.sha["t1"], "--reason", "test")
    assert code == 0, err
    assert "max |diff|" in out and "champion" in out
    code, out, _ = cli("champion-revert", model_name, "--approver", "ann", "--reason", "undo")
    assert code == 0 and f"-> {v1}" in out
    code, out, _ = cli("audit", "show", "--model", model_name)
    assert code == 0 and "promote" in out and "reject" in out and "rollback" in out and "revert" in out
    code, out, _ = cli("audit", "verify")
    assert code == 0 and "audit log OK" in out
    with ops.audit._engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE taskvec_audit DISABLE TRIGGER USER")
        conn.exec_driver_sql("UPDATE taskvec_audit SET actor = 'mallory' WHERE seq = 2")
        conn.exec_driver_sql("ALTER TABLE taskvec_audit ENABLE TRIGGER USER")
    code, out, _ = cli("audit", "verify")
    assert code == 1 and "BROKEN" in out and "entry 2" in out
    code, _, err = cli("rollback", model_name, "--remove", "ff" * 32)
    assert code == 2 and "unknown vector" in err


def test_rolled_back_version_is_first_class(ops, edits, model_name, tmp_path, monkeypatch):
    """Registered weights = base + remaining edits (bit for bit); reproduce OK; loadable pyfunc; own card and metrics."""
    import types

    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline.ops import registry
    from taskvec.io import TensorSource

    v = register_edit(ops, model_name, edits, [("t1", 0.7), ("t2", 0.4), ("bad", 0.9)], heads=True)
    _champion(ops, model_name, v)
    # a different store as MLflow's global default: every call must use the ops client's URI
    decoy = f"sqlite:///{tmp_path / 'decoy.db'}"
    mlflow.set_tracking_uri(decoy)
    mlflow.set_registry_uri(decoy)
    res = rollback(ops, model_name, edits.sha["bad"], approver="oncall", reason="bad edit")
    mv = ops.client.get_model_version(model_name, res.new_version)
    # the registered weights are exactly apply(base, remaining edits)
    with TensorSource(edits.build([("t1", 0.7), ("t2", 0.4)])) as s:
        expected_hash = s.content_hash()
    assert mv.tags["taskvec.output_hash"] == res.ledger["output_hash"] == expected_hash
    assert float(mv.tags["taskvec.rollback_max_abs_diff"]) == res.check.max_abs_diff <= 1e-5
    # a first-class thin version: ledger + references to the two stored vectors, no weights of its own
    assert mv.tags["taskvec.weights"] == "thin"
    assert set(json.loads(mv.tags["taskvec.vectors"])) == {edits.sha["t1"], edits.sha["t2"], edits.sha["bad"]}
    raw = registry.download_version(mv, tmp_path / "raw", ops.client.tracking_uri, thin_ok=False)
    assert not list(raw.glob("*.safetensors")) and (raw / "taskvec-thin.json").is_file() and (raw / "heads" / "t1.safetensors").is_file()
    assert sorted(json.loads((raw / "taskvec-thin.json").read_text())["vectors"]) == sorted([edits.sha["t1"], edits.sha["t2"]])
    rep = registry.reproduce(types.SimpleNamespace(root=tmp_path), model_name, res.new_version, client=ops.client)
    assert rep["ok"] and rep["rebuilt_hash"] == rep["registered_hash"] == expected_hash
    # registered like any other version: same experiment as the source's run, artifacts under its root
    src = ops.client.get_model_version(model_name, v)
    exp = ops.client.get_experiment(ops.client.get_run(src.run_id).info.experiment_id)
    assert ops.client.get_run(mv.run_id).info.experiment_id == exp.experiment_id
    assert mv.source.startswith("models:/m-")
    assert ops.client.get_logged_model(mv.source.split("/")[-1]).artifact_location.startswith(exp.artifact_location)
    # metrics recomputed by the promotion evaluator (fake_evaluate: t1 0.6 + 0.2·0.7, t2 0.6 + 0.2·0.4, c1 unhurt)
    assert res.accuracy == pytest.approx({"t1": 0.74, "t2": 0.68, "c1": 0.90})
    assert json.loads(mv.tags["metrics.accuracy"]) == res.accuracy
    assert ops.client.get_run(mv.run_id).data.metrics["accuracy.c1"] == pytest.approx(0.90)
    # its model card lists the remaining edits and the new accuracies only
    folder = registry.download_version(mv, tmp_path / "dl", ops.client.tracking_uri)
    card = (folder / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ") and "`" in line]
    assert [r.split("`")[1] for r in rows] == [edits.sha["t1"], edits.sha["t2"]]
    assert "| c1 | 0.9000 |" in card and "| t1 | 0.7400 |" in card
    # and it loads and predicts through the registry alias
    mlflow.set_tracking_uri(ops.client.tracking_uri)
    mlflow.set_registry_uri(ops.client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    out = model.predict(pd.DataFrame({"text": ["good"], "task": ["t1"]}))
    assert out["label"].tolist() == ["positive"]
    with pytest.raises(MlflowException, match="unknown task 'agnews'"):
        model.predict(pd.DataFrame({"text": ["good"], "task": ["agnews"]}))


def test_rejected_version_is_not_rolled_back(ops, edits, model_name):
    v = register_edit(ops, model_name, edits, [("t1", 0.5), ("t2", 0.5)])
    P.record_gates(ops, model_name, v, P.apply_gates({"t1": 0.9}, None, P.PromotionSpec(targets=["t1"])), champion_version=None)
    P.record_decision(ops, model_name, v, "reject", "bob", "no")
    before = _snapshot(ops, model_name)
    with pytest.raises(TaskvecError, match="was rejected"):
        rollback(ops, model_name, edits.sha["t1"], version=v)
    with pytest.raises(TaskvecError, match="was rejected"):
        P.check_promotable(ops, model_name, v)
    assert _snapshot(ops, model_name) == before


def test_cli_bad_input_is_one_line_exit_2(ops, edits, model_name, cli, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TASKVEC_SERVICE_TIMEOUT", "3")
    v = register_edit(ops, model_name, edits, [("t1", 0.5)])
    P.record_gates(ops, model_name, v, P.apply_gates({"t1": 0.9}, None, P.PromotionSpec(targets=["t1"])), champion_version=None)
    P.record_decision(ops, model_name, v, "reject", "bob", "no")
    capsys.readouterr()
    before = _snapshot(ops, model_name)
    dead = "http://127.0.0.1:9"
    cases = [
        (("promote", model_name, "--version", "42"), "no version 42"),
        (("promote", "nope-" + model_name, "--version", "1"), "not found"),
        (("promote", model_name, "--version", v), "was rejected"),
        (("promote", model_name, "--version", "1", "--tracking-uri", dead), "unreachable"),
        (("rollback", model_name, "--remove", edits.sha["t1"]), "no version with alias 'champion'"),
        (("rollback", model_name, "--remove", edits.sha["t1"], "--version", "42"), "no version 42"),
        (("rollback", model_name, "--remove", edits.sha["t1"], "--tracking-uri", dead), "unreachable"),
        (("lineage", model_name, "42"), "no version 42"),
        (("reproduce", "nope-" + model_name, "1"), "not found"),
    ]
    for argv, msg in cases:
        code, out, err = cli(*argv)
        assert code == 2, (argv, code, out, err)
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)
    assert _snapshot(ops, model_name) == before
