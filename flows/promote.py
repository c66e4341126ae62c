"""The ``promote`` flow: evaluate challenger vs champion, gate, ask a human, move ``champion``.

1. Evaluate the challenger (alias ``challenger`` by default, or a version
   number) and the current champion on every target and control task (two
   Prefect tasks, run concurrently by the flow's task runner).
2. Apply the gates of ``params.yaml``'s ``promotion:`` section and publish
   the comparison as a Prefect markdown + table artifact; record it in the
   audit log (``request`` when the gates pass, ``gates_failed`` otherwise).
3. If the gates pass, pause with a typed input (:class:`ApprovalInput`:
   approver, decision, reason). Resume it from the Prefect UI/API, or
   headless with ``taskvec approve MODEL VERSION`` / ``taskvec reject``,
   which write the approval record and resume the paused run.
4. Approval: :func:`pipeline.ops.promotion.promote` moves ``champion`` with the
   tags and the audit entry, atomically. Rejection is recorded; a rejected
   version never becomes champion.

Run: ``python -m flows.promote --model NAME [--version 7]`` or ``taskvec promote``.

Credentials: Prefect stores every flow-run parameter in its database, so a
tracking or audit URI holding a password must not be one. Callers pass them
through :func:`by_environment` (``MLFLOW_TRACKING_URI`` / ``TASKVEC_AUDIT_URL``
of the process running the flow; ``taskvec promote --tracking-uri`` does), and
the approver's free text is cleaned (:func:`taskvec.redact.clean_text`) before
it reaches the run input, logs, tags and the audit log.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.input import RunInput

from pipeline.ops import promotion as P


class ApprovalInput(RunInput):
    """What a human gives to resume a paused promotion."""

    approver: str
    decision: Literal["approve", "reject"]
    reason: str
    recorded_seq: int | None = None  # set by `taskvec approve`, which already wrote the record


def by_environment(tracking_uri: str | None, audit_url: str | None) -> tuple[str | None, str | None]:
    """``(tracking_uri, audit_url)`` safe as flow parameters: a URI carrying a credential moves to the environment.

    It becomes ``MLFLOW_TRACKING_URI`` / ``TASKVEC_AUDIT_URL`` of this process
    (where the flow runs in-process, as ``taskvec promote`` does) and its
    parameter is None, so Prefect never stores it.
    """
    from taskvec.redact import redact_uri

    out: list[str | None] = []
    for value, var in ((tracking_uri, "MLFLOW_TRACKING_URI"), (audit_url, "TASKVEC_AUDIT_URL")):
        if value and redact_uri(value) != value:
            os.environ[var] = value
            value = None
        out.append(value)
    return out[0], out[1]


def _model_name(model: str | None, params_file: str) -> str:
    if model:
        return model
    from pathlib import Path

    from pipeline.params import MlflowSection, load

    return (load(params_file).mlflow if Path(params_file).is_file() else MlflowSection()).registered_model


@task(name="evaluate-version", retries=0)
def evaluate_version(tracking_uri: str | None, model: str, version: str, evaluator: str) -> dict[str, float]:
    import tempfile
    from pathlib import Path

    client = P.mlflow_client(tracking_uri)
    mv = P.get_version(client, model, version)
    with tempfile.TemporaryDirectory(prefix="taskvec-eval-") as tmp:
        path = P.download_version(mv, Path(tmp), client.tracking_uri)
        scores = P.load_evaluator(evaluator)(path)
    return {k: float(v) for k, v in scores.items()}


def _publish(cmp: P.Comparison, spec: P.PromotionSpec, model: str, version: str, champion: str | None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    title = f"{model}: challenger v{version} vs champion {('v' + champion) if champion else '(none)'}"
    create_markdown_artifact(markdown=cmp.markdown(spec, title), key=P.artifact_key("promotion", model), description=title)
    create_table_artifact(table=cmp.rows(spec), key=P.artifact_key("promotion-table", model), description=title)


@flow(name="promote")
def promote_flow(
    model: str | None = None,
    version: str = "challenger",
    params_file: str = "params.yaml",
    tracking_uri: str | None = None,
    audit_url: str | None = None,
    evaluator: str | None = None,
    wait_for_approval: bool = True,
    timeout_s: int | None = None,
    poll_interval_s: float | None = None,
) -> dict[str, Any]:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    spec = P.load_spec(params_file)
    model = _model_name(model, params_file)
    ops = P.Ops(tracking_uri, audit_url)
    mv = P.get_version(ops.client, model, version)
    version = str(mv.version)
    champion = P.alias_version(ops.client, model, spec.champion_alias)
    if champion == version:
        return {"status": "already_champion", "model": model, "version": version}
    ev = evaluator or spec.evaluator
    uri = ops.client.tracking_uri
    from taskvec.redact import redact_uri

    if redact_uri(uri) != uri:  # never a task parameter: the tasks read it from this process's environment
        if tracking_uri:
            logger.warning("the tracking URI holding a credential was passed as a flow parameter (stored by Prefect); pass it through MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        uri = None
    # one after the other: two evaluations in one process share torch's threads and tqdm's class lock
    # (a concurrent pair raced in tqdm: "type object 'tqdm' has no attribute '_lock'")
    challenger_scores = evaluate_version.submit(uri, model, version, ev).result()
    champion_scores = evaluate_version.submit(uri, model, champion, ev).result() if champion else None
    cmp = P.apply_gates(challenger_scores, champion_scores, spec)
    _publish(cmp, spec, model, version, champion)
    run_id = str(flow_run.get_id()) if flow_run.get_id() else None
    gate_entry = P.record_gates(ops, model, version, cmp, champion_version=champion, flow_run_id=run_id)
    result: dict[str, Any] = {"model": model, "version": version, "champion": champion, "gates_passed": cmp.passed, "gate_seq": gate_entry.seq, "comparison": cmp.rows(spec)}
    if not cmp.passed:
        logger.warning("gates failed for %s v%s; not promoting", model, version)
        return {**result, "status": "gates_failed"}
    if not wait_for_approval:
        logger.info("gates passed; approve headless with: taskvec approve %s %s --approver NAME --reason TEXT", model, version)
        return {**result, "status": "awaiting_approval"}

    from prefect.flow_runs import pause_flow_run

    logger.info("gates passed; waiting for approval (Prefect UI, or `taskvec approve %s %s`)", model, version)
    decision: ApprovalInput = pause_flow_run(
        wait_for_input=ApprovalInput,
        timeout=timeout_s or spec.approval_timeout_s,
        poll_interval=poll_interval_s or spec.poll_interval_s,
        key=P.artifact_key("approval", model, version),
    )
    if decision.recorded_seq is not None:
        rec = next((e for e in ops.audit.entries(model=model, version=version) if e.seq == decision.recorded_seq), None)
        if rec is None or rec.action != decision.decision:
            raise RuntimeError(f"resumed with audit entry {decision.recorded_seq}, which is not a {decision.decision} of {model} v{version}")
    else:
        rec = P.record_decision(ops, model, version, decision.decision, decision.approver, decision.reason, flow_run_id=run_id)
    result["decision_seq"] = rec.seq
    from taskvec.redact import clean_text

    approver = clean_text(decision.approver)
    if decision.decision == "reject":
        logger.info("rejected by %s: %s", approver, clean_text(decision.reason))
        return {**result, "status": "rejected", "approver": approver}
    move = P.promote(ops, model, version, alias=spec.champion_alias)
    logger.info("champion %s -> %s (audit entry %s)", move.from_version, move.to_version, move.entry.seq)
    return {**result, "status": "promoted", "approver": approver, "from_version": move.from_version, "audit_seq": move.entry.seq}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Evaluate, gate and (after approval) promote a challenger.")
    ap.add_argument("--model")
    ap.add_argument("--version", default="challenger")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-wait", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(promote_flow(model=a.model, version=a.version, params_file=a.params, wait_for_approval=not a.no_wait), indent=2, default=str))


if __name__ == "__main__":
    main()
