"""Promotion, approval, audit and rollback commands of the ``taskvec`` CLI.

    taskvec promote [MODEL] [--version challenger] [--no-wait]   gate + wait for approval (Prefect flow)
    taskvec approve MODEL VERSION --approver NAME --reason TEXT  approval record; resumes a paused promote run
    taskvec reject  MODEL VERSION --approver NAME --reason TEXT  rejection record (final for that version)
    taskvec champion-revert MODEL --approver NAME --reason TEXT  point champion back to the previous champion
    taskvec rollback MODEL --remove SHA [--version champion]     base + remaining edits, checked vs θ − λτ, registered, audited
    taskvec audit verify | audit show                            check / print the hash-chained audit log

Tracking server: ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` or params.yaml's
``mlflow.tracking_uri``; audit log: ``--audit-url`` or ``TASKVEC_AUDIT_URL``
(default: beside the tracking store, see :func:`pipeline.ops.audit.default_url`).

``--approver`` / ``--reason`` are free text: they are cleaned
(:func:`taskvec.redact.clean_text`: credentials masked, control characters
escaped) before they reach the audit log, tags, lineage or a Prefect run
input. ``taskvec promote --tracking-uri URI-with-password`` hands the URI to
the flow through the environment, never as a (stored) flow-run parameter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.options import Approver, AsJson, AuditUrl, Model, Reason, SetParam, TrackingUri, Version
from pipeline.cli.run import _offline_env

NoResume = Annotated[bool, typer.Option("--no-resume", help="Do not look for a paused promote flow run (approve: promote directly).")]
DECISIONS = {
    "approve": "Approve a gated challenger: write the approval record, then resume its paused promote run (or promote headless).",
    "reject": "Reject a challenger: recorded in the audit log; it can never become champion.",
}


def _effective(params: Path, overrides: list[str] | None) -> Path:
    """params + ``-S`` overrides (as ``taskvec run``); the evaluator reads them through ``TASKVEC_PARAMS``."""
    from pipeline.params import effective_params

    path = Path(effective_params(params, list(overrides or []))) if overrides else params
    os.environ["TASKVEC_PARAMS"] = str(path)
    return path


def _ops(tracking_uri: str | None, audit_url: str | None):
    from pipeline.ops.promotion import Ops

    return Ops(tracking_uri, audit_url)


def _params_model(params: Path) -> str:
    """params.yaml's ``mlflow.registered_model`` (the default model of ``taskvec promote``)."""
    from pipeline.params import MlflowSection, load

    return (load(params).mlflow if params.is_file() else MlflowSection()).registered_model


def _prefect_server():
    """:func:`pipeline.ops.services.prefect_api`, unless this process already talks to a Prefect API (a test harness)."""
    import contextlib
    import sys

    from pipeline.ops.services import check_prefect_api, prefect_api

    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            check_prefect_api()

            class _Ready:
                def wait(self) -> None:
                    return None

            return contextlib.nullcontext(_Ready())
    return prefect_api()


def _resume_paused(ops, model: str, version: str, run_input: dict) -> str | None:
    """Resume the paused promote run waiting on this version, if any; returns its id."""
    from uuid import UUID

    reqs = [e for e in ops.audit.entries(model=model, version=version) if e.action == "request" and e.data.get("flow_run_id")]
    if not reqs:
        return None
    run_id = reqs[-1].data["flow_run_id"]
    try:
        _offline_env()  # Prefect's ephemeral server (the project's database) gets a patient start-up on a busy CPU
        from prefect.client.orchestration import get_client
        from prefect.flow_runs import resume_flow_run

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(UUID(run_id))
        if not fr.state or not fr.state.is_paused():
            return None
        resume_flow_run(UUID(run_id), run_input=run_input)
        return run_id
    except Exception as exc:  # no Prefect API reachable, run gone, timed out …
        typer.echo(f"note: could not resume promote flow run {run_id} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); promoting headless", err=True)
        return None


def _decide(model: str, version: str, decision: str, approver: str, reason: str, tracking_uri, audit_url, resume: bool) -> None:
    from pipeline.ops import promotion as P
    from taskvec.redact import clean_text

    approver, reason = clean_text(approver), clean_text(reason)

    ops = _ops(tracking_uri, audit_url)
    version = str(P.get_version(ops.client, model, version).version)
    rec = P.record_decision(ops, model, version, decision, approver, reason)
    typer.echo(f"recorded {decision} of {model} v{version} by {rec.actor} (audit entry {rec.seq})")
    resumed = None
    if resume:
        resumed = _resume_paused(ops, model, version, {"approver": approver, "decision": decision, "reason": reason, "recorded_seq": rec.seq})
    if resumed:
        typer.echo(f"resumed paused promote flow run {resumed}; it moves the champion")
        return
    if decision == "approve":
        move = P.promote(ops, model, version)
        typer.echo(f"champion of {model}: {move.from_version or 'none'} -> {move.to_version} (audit entry {move.entry.seq})")


def _decision_command(decision: str):
    """The ``taskvec approve`` / ``taskvec reject`` command."""

    def command(
        model: Model,
        version: Version,
        approver: Approver,
        reason: Reason,
        no_resume: NoResume = False,
        tracking_uri: TrackingUri = None,
        audit_url: AuditUrl = None,
    ) -> None:
        _decide(model, version, decision, approver, reason, tracking_uri, audit_url, not no_resume)

    return command


def register(app: typer.Typer) -> None:
    audit_app = typer.Typer(help="The append-only, hash-chained audit log of promotions, rejections and rollbacks.", no_args_is_help=True)
    app.add_typer(audit_app, name="audit")

    for decision, doc in DECISIONS.items():
        app.command(decision, help=doc)(_decision_command(decision))

    @app.command("promote")
    def promote_cmd(
        model: Annotated[Optional[str], typer.Argument(help="Registered model (default: params.yaml mlflow.registered_model).")] = None,
        version: Annotated[str, typer.Option("--version", help="Challenger version or alias.")] = "challenger",
        params: Annotated[Path, typer.Option("--params", help="params.yaml with the promotion gates.")] = Path("params.yaml"),
        evaluator: Annotated[Optional[str], typer.Option("--evaluator", help="module:function evaluating a model folder -> {task: accuracy}.")] = None,
        no_wait: Annotated[bool, typer.Option("--no-wait", help="Gate and record, then exit; approve later with `taskvec approve`.")] = False,
        set_param: SetParam = None,
        tracking_uri: TrackingUri = None,
        audit_url: AuditUrl = None,
    ) -> None:
        """Run the promote flow: evaluate challenger vs champion, gate, wait for approval, move champion."""
        from pipeline.ops import promotion as P

        # bad input is one line and exit 2 before a flow run starts: unknown model/version, rejected version, bad evaluator, dead store
        _offline_env()
        params = _effective(params, set_param)
        spec = P.load_spec(params)
        P.load_evaluator(evaluator or spec.evaluator)
        ops = _ops(tracking_uri, audit_url)
        P.check_promotable(ops, model or _params_model(params), version)
        # the flow runs on taskvec's own Prefect server (as `taskvec run`; the project's Prefect database, so
        # `taskvec approve` in another shell finds a paused run), started before Prefect is imported
        with _prefect_server() as api:
            from flows.promote import by_environment, promote_flow

            tracking_uri, audit_url = by_environment(tracking_uri, audit_url)  # a credential is never a stored flow parameter
            api.wait()
            res = promote_flow(model=model, version=version, params_file=str(params), tracking_uri=tracking_uri, audit_url=audit_url, evaluator=evaluator, wait_for_approval=not no_wait)
        typer.echo(json.dumps(res, indent=2, default=str))

    @app.command("champion-revert")
    def revert_cmd(
        model: Model,
        approver: Approver,
        reason: Reason,
        tracking_uri: TrackingUri = None,
        audit_url: AuditUrl = None,
    ) -> None:
        """Fast path: point champion back to the previous champion version (audited)."""
        from pipeline.ops.promotion import revert_champion

        move = revert_champion(_ops(tracking_uri, audit_url), model, approver=approver, reason=reason)
        typer.echo(f"champion of {model}: {move.from_version} -> {move.to_version} (audit entry {move.entry.seq})")

    @app.command("rollback")
    def rollback_cmd(
        model: Model,
        remove: Annotated[str, typer.Option("--remove", help="sha256 (or ≥8-digit prefix) of the edit's vector to remove.")],
        version: Annotated[str, typer.Option("--version", help="Version or alias to roll back from.")] = "champion",
        vector: Annotated[Optional[list[Path]], typer.Option("--vector", help="Vector file(s) to use (else found with the version's run or in outputs/).")] = None,
        approver: Annotated[Optional[str], typer.Option("--approver", help="Operator approving the champion move (default: $TASKVEC_ACTOR or user).")] = None,
        reason: Annotated[Optional[str], typer.Option("--reason", help="Why (audit log).")] = None,
        no_move: Annotated[bool, typer.Option("--no-move", help="Register the rolled-back version but leave champion where it is.")] = False,
        evaluator: Annotated[Optional[str], typer.Option("--evaluator", help="module:function scoring the rolled-back model -> {task: accuracy} (default: params.yaml promotion.evaluator).")] = None,
        params: Annotated[Optional[Path], typer.Option("--params", help="params.yaml naming the promotion evaluator (default: $TASKVEC_PARAMS, else ./params.yaml).")] = None,
        weights: Annotated[Optional[str], typer.Option("--weights", help="thin (ledger + stored vectors, materialised on load) or full (whole weights); default: params.yaml register.weights, else thin.")] = None,
        set_param: SetParam = None,
        as_json: AsJson = False,
        tracking_uri: TrackingUri = None,
        audit_url: AuditUrl = None,
    ) -> None:
        """Rebuild base + the remaining edits, check it against θ − λτ, evaluate and register it, move champion if needed."""
        from pipeline.ops.rollback import rollback

        if set_param:
            params = _effective(params or Path(os.environ.get("TASKVEC_PARAMS", "params.yaml")), set_param)

        res = rollback(_ops(tracking_uri, audit_url), model, remove, version=version, vectors=vector, approver=approver, reason=reason, move_champion=not no_move, evaluator=evaluator, params_file=params, weights=weights)
        if as_json:
            typer.echo(json.dumps({"source_version": res.source_version, "new_version": res.new_version, "removed": res.removed, "max_abs_diff": res.check.max_abs_diff, "max_ulps": res.check.max_ulps, "accuracy": res.accuracy, "champion_moved": bool(res.champion_moved), "notes": res.notes}, indent=2))
        else:
            typer.echo(res.summary())
            for n in res.notes:
                typer.echo(f"note: {n}")

    @audit_app.command("verify")
    def verify_cmd(
        as_json: AsJson = False,
        no_registry: Annotated[bool, typer.Option("--no-registry", help="Check the chain only (no anchors / alias check against MLflow).")] = False,
        tracking_uri: TrackingUri = None,
        audit_url: AuditUrl = None,
    ) -> None:
        """Recompute the hash chain and check anchors and champion aliases; exit 1 if anything was edited or deleted."""
        if no_registry:
            from pipeline.ops.audit import AuditLog, default_url

            report = AuditLog(audit_url or default_url()).verify()
        else:
            from pipeline.ops.integrity import verify

            report = verify(_ops(tracking_uri, audit_url))
        if as_json:
            typer.echo(json.dumps(report.__dict__, indent=2))
        else:
            typer.echo(report.summary())
            for p in report.problems:
                typer.echo(f"  - {p}")
        if not report.ok:
            raise typer.Exit(1)

    @audit_app.command("show")
    def show_cmd(
        model: Annotated[Optional[str], typer.Option("--model", help="Only this registered model.")] = None,
        version: Annotated[Optional[str], typer.Option("--version", help="Only this version.")] = None,
        action: Annotated[Optional[str], typer.Option("--action", help="Only this action (promote, approve, reject, rollback, revert, request, gates_failed).")] = None,
        as_json: AsJson = False,
        audit_url: AuditUrl = None,
    ) -> None:
        """Print the audit log."""
        from pipeline.ops.audit import AuditLog, default_url, format_entries

        entries = AuditLog(audit_url or default_url()).entries(model=model, version=version, action=action)
        typer.echo(format_entries(entries, as_json=as_json))
