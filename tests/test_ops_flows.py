"""Prefect flows under the test harness: promote (pause → resume by CLI or API), gates, rollback, schedule, Dask."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from uuid import UUID

import pytest

from flows.edit import edit
from pipeline.ops import promotion as P
from taskvec.errors import TaskvecError
from tests.conftest_ops import *  # noqa: F401,F403

pytestmark = pytest.mark.postgres

EVAL = "tests.conftest_ops:fake_evaluate"


# the smallest valid pipeline params file (params.yaml is validated whole, as PipelineParams)
PLAN = "tasks:\n  t1: {source: x, labels: [a, b]}\n  c1: {source: y, labels: [a, b]}\nfinetune: {tasks: [t1]}\nedit: {learn: [t1], control: [c1]}\n"


@pytest.fixture
def params_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(PLAN + "promotion:\n  targets: [t1]\n  controls: [c1]\n  target_floors: {t1: 0.65}\n  max_control_drop: 1.0\n  poll_interval_s: 0.5\n")
    return p


def _run_in_thread(fn, **kw):
    box: dict = {}

    def target():
        try:
            box["result"] = fn(**kw)
        except BaseException as exc:  # surfaced by the test
            import traceback

            box["error"] = exc
            box["traceback"] = traceback.format_exc()[-4000:]

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_paused(ops, model, version, box, timeout=120):
    from prefect.client.orchestration import get_client

    def paused():
        if "error" in box or "result" in box:
            raise AssertionError(f"promote flow ended before pausing: {box}")
        reqs = [e for e in ops.audit.entries(model=model, version=version) if e.action == "request" and e.data.get("flow_run_id")]
        if not reqs:
            return None
        with get_client(sync_client=True) as c:
            fr = c.read_flow_run(UUID(reqs[-1].data["flow_run_id"]))
        return reqs[-1].data["flow_run_id"] if fr.state and fr.state.is_paused() else None

    return wait_for(paused, timeout=timeout, interval=0.5, what="promote flow run to pause")


def _flow_kw(ops, model, params_file, **kw):
    return dict(model=model, params_file=str(params_file), tracking_uri=ops.client.tracking_uri, audit_url=ops.audit.url, evaluator=EVAL, timeout_s=180, poll_interval_s=0.5, **kw)


def test_promote_flow_pauses_and_cli_approval_resumes_it(prefect_harness, ops, edits, model_name, params_file, monkeypatch):
    from flows.promote import promote_flow
    from pipeline.cli import main

    v = register_edit(ops, model_name, edits, [("t1", 0.5)], alias="challenger")
    t, box = _run_in_thread(promote_flow, **_flow_kw(ops, model_name, params_file))
    run_id = _wait_paused(ops, model_name, v, box)
    assert P.alias_version(ops.client, model_name, "champion") is None  # nothing moves while paused
    monkeypatch.setenv("TASKVEC_AUDIT_URL", ops.audit.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ops.client.tracking_uri)
    with pytest.raises(SystemExit) as ei:
        main(["approve", model_name, v, "--approver", "ann", "--reason", "gates green"])
    assert ei.value.code == 0
    t.join(120)
    assert "error" not in box, box.get("error")
    res = box["result"]
    assert res["status"] == "promoted" and res["approver"] == "ann"
    assert P.alias_version(ops.client, model_name, "champion") == v
    entries = ops.audit.entries(model=model_name)
    assert [e.action for e in entries] == ["request", "approve", "promote"]
    # the CLI wrote the approval record; the resumed flow run (same id) consumed it and moved the alias
    assert entries[0].data["flow_run_id"] == run_id and entries[2].data["approval_seq"] == entries[1].seq
    assert res["decision_seq"] == entries[1].seq
    assert ops.client.get_model_version(model_name, v).tags["approved_by"] == "ann"
    assert P.verify(ops).ok
    # the comparison was published as Prefect artifacts
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[P.artifact_key("promotion", model_name)])))
    assert arts and "challenger v" in arts[0].data


def test_promote_flow_resumed_with_typed_input_reject(prefect_harness, ops, edits, model_name, params_file):
    from prefect.flow_runs import resume_flow_run

    from flows.promote import promote_flow

    v1 = register_edit(ops, model_name, edits, [("t1", 0.4)])
    P.record_gates(ops, model_name, v1, P.apply_gates({"t1": 0.9, "c1": 0.9}, None, P.load_spec(params_file)), champion_version=None)
    P.record_decision(ops, model_name, v1, "approve", "ann", "first")
    P.promote(ops, model_name, v1)
    v2 = register_edit(ops, model_name, edits, [("t1", 0.8)], alias="challenger")
    t, box = _run_in_thread(promote_flow, **_flow_kw(ops, model_name, params_file))
    run_id = _wait_paused(ops, model_name, v2, box)
    resume_flow_run(UUID(run_id), run_input={"approver": "bob", "decision": "reject", "reason": "not this week"})
    t.join(120)
    assert box.get("result", {}).get("status") == "rejected", box
    assert P.alias_version(ops.client, model_name, "champion") == v1
    with pytest.raises(Exception, match="rejected"):
        P.move_alias(ops, model_name, v2, action="revert", inline_approval=("x", "y"))
    assert [e.action for e in ops.audit.entries(model=model_name)][-2:] == ["request", "reject"]


def test_promote_flow_stops_when_gates_fail(prefect_harness, ops, edits, model_name, params_file):
    from flows.promote import promote_flow

    v1 = register_edit(ops, model_name, edits, [("t1", 0.5)])
    P.record_gates(ops, model_name, v1, P.apply_gates({"t1": 0.9, "c1": 0.9}, None, P.load_spec(params_file)), champion_version=None)
    P.record_decision(ops, model_name, v1, "approve", "ann", "first")
    P.promote(ops, model_name, v1)
    v2 = register_edit(ops, model_name, edits, [("bad", 1.0)])  # t1 up, control c1 down 5 points
    res = promote_flow(**_flow_kw(ops, model_name, params_file, version=v2))
    assert res["status"] == "gates_failed" and not res["gates_passed"]
    assert any(r["task"] == "c1" and not r["passed"] for r in res["comparison"])
    assert P.alias_version(ops.client, model_name, "champion") == v1
    assert ops.audit.entries(model=model_name)[-1].action == "gates_failed"


def test_promote_flow_headless_no_wait(prefect_harness, ops, edits, model_name, params_file):
    from flows.promote import promote_flow

    v = register_edit(ops, model_name, edits, [("t1", 0.5)])
    res = promote_flow(**_flow_kw(ops, model_name, params_file, version=v, wait_for_approval=False))
    assert res["status"] == "awaiting_approval"
    P.record_decision(ops, model_name, v, "approve", "ann", "headless")
    assert P.promote(ops, model_name, v).to_version == v


def test_rollback_flow(prefect_harness, ops, edits, model_name):
    from flows.rollback import rollback_flow

    v = register_edit(ops, model_name, edits, [("t1", 0.5), ("bad", 0.5)])
    P.record_gates(ops, model_name, v, P.apply_gates({"t1": 0.9}, None, P.PromotionSpec(targets=["t1"])), champion_version=None)
    P.record_decision(ops, model_name, v, "approve", "ann", "ok")
    P.promote(ops, model_name, v)
    res = rollback_flow(model=model_name, remove=edits.sha["bad"], approver="oncall", reason="incident", tracking_uri=ops.client.tracking_uri, audit_url=ops.audit.url)
    assert res["champion_moved"] and res["max_ulps"] <= 4 * 4
    assert P.alias_version(ops.client, model_name, "champion") == res["new_version"]
    assert P.verify(ops).ok


def test_scheduled_edit_skips_unchanged_inputs(prefect_harness, ops, edits, model_name, monkeypatch, tmp_path):
    import flows.schedule as S

    v = register_edit(ops, model_name, edits, [("t1", 0.5)])
    calls = []
    fp = {"digest": "a" * 64}
    monkeypatch.setattr(S, "input_fingerprint", lambda pf: dict(fp))
    monkeypatch.setattr(S, "_registry", lambda pf: (ops.client, model_name))

    def fake_edit_flow(pf):
        def run(**kwargs):
            inspect.signature(edit.fn).bind(**kwargs)  # called as the real edit flow must be
            calls.append(kwargs["params_file"])
            return {"registered": {"model": model_name, "version": v}, "states": {"finetune/t1": "Cached"}}

        return run

    monkeypatch.setattr(S, "edit_flow", fake_edit_flow)
    first = S.scheduled_edit(params_file=str(tmp_path / "params.yaml"))
    assert first["status"] == "ran" and len(calls) == 1
    again = S.scheduled_edit(params_file=str(tmp_path / "params.yaml"))
    assert again["status"] == "unchanged" and len(calls) == 1 and again["seconds"] < 5
    fp["digest"] = "b" * 64  # a changed input
    assert S.scheduled_edit(params_file=str(tmp_path / "params.yaml"))["status"] == "ran" and len(calls) == 2


def test_schedule_and_runner_config(tmp_path, monkeypatch):
    import yaml

    import flows.schedule as S

    p = tmp_path / "params.yaml"
    p.write_text(PLAN + "schedule:\n  cron: '*/30 * * * *'\nrunner:\n  kind: default\n")
    assert S.schedule_config(p)["cron"] == "*/30 * * * *"
    assert S.configured_task_runner(p) is None
    monkeypatch.setenv("TASKVEC_DASK_ADDRESS", "tcp://10.0.0.1:8786")
    assert S.runner_config(p) == {"kind": "dask", "address": "tcp://10.0.0.1:8786", "cluster_kwargs": {}}
    monkeypatch.delenv("TASKVEC_DASK_ADDRESS")
    p.write_text(PLAN + "runner:\n  kind: slurm\n")
    with pytest.raises(TaskvecError, match="runner.kind"):
        S.configured_task_runner(p)
    dep = yaml.safe_load(open("prefect.yaml"))["deployments"]
    nightly = next(d for d in dep if d["name"] == "nightly-edit")
    assert nightly["entrypoint"] == "flows/schedule.py:scheduled_edit" and nightly["schedules"][0]["cron"]


def test_dask_task_runner_runs_tasks(prefect_harness, tmp_path):
    pytest.importorskip("prefect_dask")
    from prefect import flow, task

    import flows.schedule as S

    runner = S.configured_task_runner(config={"kind": "dask", "address": None, "cluster_kwargs": {"n_workers": 1, "processes": False, "threads_per_worker": 2, "dashboard_address": None}})
    from prefect_dask import DaskTaskRunner

    assert isinstance(runner, DaskTaskRunner)

    @task
    def square(x):
        return x * x

    @flow(task_runner=runner)
    def tiny():
        return sum(f.result() for f in [square.submit(i) for i in range(5)])

    assert tiny() == 30


def test_scheduled_edit_finds_params_from_its_own_root(tmp_path, monkeypatch):
    """A worker's cwd need not be the project: a relative params file falls back to the flow's code root."""
    import flows.schedule as S

    monkeypatch.chdir(tmp_path)
    assert S.CODE_ROOT == Path(S.__file__).resolve().parent.parent
    assert S.resolve_params("params.yaml") == (S.CODE_ROOT / "params.yaml").resolve()
    (tmp_path / "params.yaml").write_text("schedule: {}\n")
    assert S.resolve_params("params.yaml") == (tmp_path / "params.yaml").resolve()
    assert S.resolve_params(str(tmp_path / "x.yaml")) == (tmp_path / "x.yaml").resolve()
