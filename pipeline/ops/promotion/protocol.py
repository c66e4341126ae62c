"""The audited protocol: approval records, and the one path that moves ``champion``.

The champion alias of a registered model moves only through
:func:`move_alias`, which runs this protocol while holding the audit log's
append lock (:meth:`pipeline.ops.audit.AuditLog.transaction`):

1. check the approval record (an ``approve`` audit entry for that version,
   not yet consumed, and no ``reject`` entry for it) — or, for a rollback or
   revert, append the operator's approval in the same transaction;
2. remember the previous alias target, the version tags about to be
   overwritten and the model's audit anchor;
3. set the alias, set the tags, append the audit entry, set the anchor tag
   (``taskvec.audit_head`` = ``seq:hash`` of the newest entry of that model),
   commit;
4. if anything in 3 fails, undo what was done in reverse order (alias back to
   the previous version, or deleted if there was none; tags back to their old
   values) and roll the transaction back — so alias, tags and log entry
   change together or not at all.

Every other audited record (gate results, approvals, rejections) goes through
:func:`audited_append`, the same protocol without the alias. A rejected
version can never become champion; promotion is impossible without an
approval record.

Gates are in :mod:`pipeline.ops.promotion.gates`, evaluators in
:mod:`pipeline.ops.promotion.evaluator`, registry access in
:mod:`pipeline.ops.registry`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.ops import integrity
from pipeline.ops.audit import AuditEntry, AuditLog, AuditTransaction, default_actor, now_iso
from pipeline.ops.promotion.gates import Comparison
from pipeline.ops.registry import alias_version, get_version, mlflow_client
from pipeline.params import CHAMPION
from taskvec.errors import TaskvecError

log = logging.getLogger(__name__)

ANCHOR_TAG = "taskvec.audit_head"
MOVES = ("promote", "rollback", "revert")  # audit actions that move the champion alias
DECISIONS = ("approve", "reject")


# ---------------------------------------------------------------------------
# Audit anchors on the registry


def anchors(client) -> dict[str, str]:
    """``model → "seq:hash"`` of every registered model carrying an audit anchor."""
    out = {}
    for rm in _all_registered_models(client):
        tag = (rm.tags or {}).get(ANCHOR_TAG)
        if tag:
            out[rm.name] = tag
    return out


def _all_registered_models(client) -> Iterable:
    token = None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


# ---------------------------------------------------------------------------
# The audited protocol


class Ops:
    """MLflow registry + audit log, the pair every audited operation needs.

    The audit log is opened on first use, so a command refused while checking
    its input (an unknown model, a missing champion) creates no database.
    """

    def __init__(self, tracking_uri: str | None = None, audit_url: str | None = None, *, client=None, audit: AuditLog | None = None):
        self.client = client or mlflow_client(tracking_uri)
        self._audit, self._audit_url = audit, audit_url

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            from pipeline.ops.audit import default_url

            self._audit = AuditLog(self._audit_url or default_url(getattr(self.client, "tracking_uri", None)))
        return self._audit


def _fault(point: str) -> None:
    """Test hook: ``TASKVEC_FAULT=<point>`` raises at that point of the protocol."""
    if os.environ.get("TASKVEC_FAULT") == point:
        raise RuntimeError(f"injected fault at {point}")


class _Undo:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, fn: Callable[[], Any]) -> None:
        self._steps.append((what, fn))

    def put(self, what: str, previous: str | None, value: str, put: Callable[[str], Any], delete: Callable[[], Any]) -> None:
        """``put(value)`` in place of ``previous``, registering its undo: ``put(previous)``, or ``delete()`` if there was none."""
        self.push(what, delete if previous is None else (lambda: put(previous)))
        put(value)

    def run(self) -> list[str]:
        failed = []
        for what, fn in reversed(self._steps):
            try:
                fn()
            except Exception as exc:  # keep undoing the rest
                log.error("compensation %s failed: %s", what, exc)
                failed.append(what)
        return failed


def _set_version_tags(client, mv, tags: dict[str, str], undo: _Undo) -> None:
    old = dict(mv.tags or {})
    for key, value in tags.items():
        put = functools.partial(client.set_model_version_tag, mv.name, mv.version, key)
        undo.put(f"tag {key}", old.get(key), value, put, functools.partial(client.delete_model_version_tag, mv.name, mv.version, key))


def _set_anchor(client, model: str, entry: AuditEntry, undo: _Undo, log_id: str) -> None:
    prev = (client.get_registered_model(model).tags or {}).get(ANCHOR_TAG)
    put = functools.partial(client.set_registered_model_tag, model, ANCHOR_TAG)
    undo.put("audit anchor", prev, entry.anchor(log_id), put, functools.partial(client.delete_registered_model_tag, model, ANCHOR_TAG))


@contextmanager
def _audited(ops: Ops, action: str, model: str, version: str | None, **check) -> Iterator[tuple[AuditTransaction, _Undo]]:
    """The frame of every audited write: a locked transaction, checked before anything is written.

    The body does its side effects (registering their undo) and appends; on
    leaving it the transaction is committed. If the body or the commit fails,
    the side effects are undone and the transaction rolled back.
    """
    with ops.audit.transaction() as tx:
        undo = _Undo()
        try:
            integrity.check_before_write(ops, action, model, version, tx=tx, **check)
            yield tx, undo
            _fault("before_commit")
            tx.commit()
        except BaseException:
            undo.run()
            raise


def audited_append(ops: Ops, action: str, model: str, version: str | None, build: Callable[[AuditTransaction, _Undo], dict], *, actor: str | None = None) -> AuditEntry:
    """Append one entry whose payload ``build`` computes (and whose side effects it may register for undo)."""
    with _audited(ops, action, model, version) as (tx, undo):
        entry = tx.append(action, model, version, build(tx, undo), actor=actor)
        _set_anchor(ops.client, model, entry, undo, ops.audit.log_id)
        integrity.anchor_rejection(ops.client, entry, undo, ops.audit.log_id)
    return entry


def is_move(e: AuditEntry, alias: str = CHAMPION) -> bool:
    """An entry that moved ``alias`` (a rollback that only registered a version has alias None)."""
    return e.action in MOVES and e.data.get("alias") == alias and e.data.get("to_version") is not None


def _decisions(tx: AuditTransaction, model: str, version: str) -> tuple[list[AuditEntry], list[AuditEntry], set[int]]:
    entries = tx.entries(model=model)
    approvals = [e for e in entries if e.action == "approve" and e.version == version]
    rejects = [e for e in entries if e.action == "reject" and e.version == version]
    consumed = {e.data.get("approval_seq") for e in entries if e.action in MOVES and e.data.get("approval_seq")}
    return approvals, rejects, consumed


def _last_gate_request(tx: AuditTransaction, model: str, version: str) -> AuditEntry | None:
    reqs = [e for e in tx.entries(model=model, version=version) if e.action in ("request", "gates_failed")]
    return reqs[-1] if reqs else None


def record_gates(ops: Ops, model: str, version: str, comparison: Comparison, *, champion_version: str | None, flow_run_id: str | None = None, actor: str | None = None) -> AuditEntry:
    """Audit the gate evaluation: ``request`` (passed: awaits a decision) or ``gates_failed``."""
    get_version(ops.client, model, version)
    payload = {**comparison.record(), "champion_version": champion_version, "flow_run_id": flow_run_id}
    return audited_append(ops, "request" if comparison.passed else "gates_failed", model, str(version), lambda tx, undo: payload, actor=actor)


def record_decision(ops: Ops, model: str, version: str | int, decision: str, approver: str, reason: str, *, flow_run_id: str | None = None, require_gates: bool = True) -> AuditEntry:
    """Write the approval record (``approve``) or the rejection (``reject``) of a version."""
    if decision not in DECISIONS:
        raise TaskvecError(f"decision must be approve or reject, not {decision!r}")
    if not approver or not approver.strip():
        raise TaskvecError("an approval record needs the approver's name (--approver)")
    if not reason or not reason.strip():
        raise TaskvecError("an approval record needs a reason (--reason)")
    mv = get_version(ops.client, model, version)
    version = str(mv.version)

    def build(tx: AuditTransaction, undo: _Undo) -> dict:
        approvals, rejects, consumed = _decisions(tx, model, version)
        if rejects:
            raise TaskvecError(f"{model} version {version} was already rejected (audit entry {rejects[0].seq}); a rejected challenger never becomes champion")
        champion = alias_version(ops.client, model, CHAMPION)
        if champion == version:
            raise TaskvecError(f"{model} version {version} is already the champion")
        gate = _last_gate_request(tx, model, version)
        if decision == "approve" and require_gates:
            if gate is None:
                raise TaskvecError(f"{model} version {version} has no gate evaluation: run `taskvec promote {model} --version {version}` first")
            if gate.action != "request":
                raise TaskvecError(f"{model} version {version} failed its promotion gates (audit entry {gate.seq}); it cannot be approved")
        pending = [a for a in approvals if a.seq not in consumed]
        if decision == "approve" and pending:
            raise TaskvecError(f"{model} version {version} already has a pending approval (audit entry {pending[-1].seq})")
        return {
            "decision": decision,
            "approver": approver.strip(),
            "reason": reason.strip(),
            "gate_seq": None if gate is None else gate.seq,
            "flow_run_id": flow_run_id,
        }

    return audited_append(ops, decision, model, version, build, actor=approver.strip())


@dataclass
class Move:
    entry: AuditEntry
    model: str
    from_version: str | None
    to_version: str
    approval: AuditEntry | None


def move_alias(
    ops: Ops,
    model: str,
    version: str | int,
    *,
    action: str = "promote",
    alias: str = CHAMPION,
    inline_approval: tuple[str, str] | None = None,
    payload: dict | None = None,
    actor: str | None = None,
) -> Move:
    """Point ``alias`` at ``version`` — only with an approval record, atomically with tags and the audit entry.

    ``inline_approval=(approver, reason)`` appends that approval in the same
    transaction (rollback and revert are approved by the operator running
    them); otherwise the newest unconsumed ``approve`` entry is required.
    """
    if action not in MOVES:
        raise TaskvecError(f"{action!r} is not an alias move ({', '.join(MOVES)})")
    client = ops.client
    mv = get_version(client, model, version)
    version = str(mv.version)
    with _audited(ops, action, model, version, alias=alias) as (tx, undo):
        approvals, rejects, consumed = _decisions(tx, model, version)
        if rejects:
            raise TaskvecError(f"{model} version {version} was rejected (audit entry {rejects[0].seq}); a rejected version never becomes {alias}")
        previous = alias_version(client, model, alias)
        if previous == version:
            raise TaskvecError(f"{model} version {version} is already the {alias}")
        if inline_approval is not None:
            approver, reason = inline_approval
            if not approver or not approver.strip() or not reason or not reason.strip():
                raise TaskvecError(f"{action} needs an approver and a reason (--approver, --reason)")
            approval = tx.append(
                "approve", model, version, {"decision": "approve", "approver": approver.strip(), "reason": reason.strip(), "kind": action, "gate_seq": None, "flow_run_id": None}, actor=approver.strip()
            )
        else:
            pending = [a for a in approvals if a.seq not in consumed]
            if not pending:
                raise TaskvecError(f"no approval record for {model} version {version}: promotion needs `taskvec approve {model} {version} --approver NAME --reason TEXT`")
            approval = pending[-1]
        data = approval.data
        gate = None
        if data.get("gate_seq"):
            gate = next((e for e in tx.entries(model=model, version=version) if e.seq == data["gate_seq"]), None)
        approved_at = approval.ts
        put = functools.partial(client.set_registered_model_alias, model, alias)
        undo.put("alias", previous, version, put, functools.partial(client.delete_registered_model_alias, model, alias))
        _fault("after_alias")
        tags = {
            "approved_by": data["approver"],
            "approved_at": approved_at,
            "approval_reason": data["reason"],
            "gate_results": json.dumps(gate.data.get("gates", []) if gate else {"note": f"{action}: approved by operator, no gate evaluation"}, sort_keys=True)[:99_000],
            f"taskvec.{alias}_since": now_iso(),
            "taskvec.audit_approval_seq": str(approval.seq),
        }
        _set_version_tags(client, mv, tags, undo)
        _fault("after_tags")
        entry = tx.append(
            action,
            model,
            version,
            {
                **(payload or {}),
                "alias": alias,
                "from_version": previous,
                "to_version": version,
                "approval_seq": approval.seq,
                "approver": data["approver"],
                "reason": data["reason"],
                "gate_seq": data.get("gate_seq"),
            },
            actor=actor or data["approver"],
        )
        _set_anchor(client, model, entry, undo, ops.audit.log_id)
    return Move(entry, model, previous, version, approval)


def rejection(ops: Ops, model: str, version: str) -> AuditEntry | None:
    """The ``reject`` audit entry of a version, if it was rejected."""
    rejects = ops.audit.entries(model=model, version=str(version), action="reject")
    return rejects[0] if rejects else None


def check_promotable(ops: Ops, model: str, version: str | int):
    """One-line errors before a promotion starts: unknown model or version, a rejected version. Returns the version."""
    mv = get_version(ops.client, model, version)
    rej = rejection(ops, model, str(mv.version))
    if rej is not None:
        raise TaskvecError(f"{model} version {mv.version} was rejected (audit entry {rej.seq}); a rejected challenger never becomes champion")
    return mv


def promote(ops: Ops, model: str, version: str | int, *, alias: str = CHAMPION) -> Move:
    """Move ``champion`` to an approved version (consumes its approval record)."""
    return move_alias(ops, model, version, action="promote", alias=alias)


def previous_champion(ops: Ops, model: str, alias: str = CHAMPION) -> str | None:
    """The version the champion alias pointed to before its current one, from the audit log."""
    current = alias_version(ops.client, model, alias)
    moves = [e for e in ops.audit.entries(model=model) if is_move(e, alias)]
    if not moves or current is None:
        return None
    last = moves[-1]
    if last.data.get("to_version") != current:
        raise TaskvecError(f"{model}: alias {alias} points to version {current}, but the audit log's last move was to {last.data.get('to_version')}; run `taskvec audit verify`")
    return last.data.get("from_version")


def revert_champion(ops: Ops, model: str, *, approver: str, reason: str, alias: str = CHAMPION) -> Move:
    """Fast path: point ``champion`` back to the previous champion version, audited."""
    prev = previous_champion(ops, model, alias)
    if prev is None:
        raise TaskvecError(f"{model} has no previous {alias} to revert to")
    return move_alias(ops, model, prev, action="revert", alias=alias, inline_approval=(approver, reason), payload={"kind": "fast-path revert"})


def verify(ops: Ops, *, alias: str = CHAMPION):
    """Chain + anchors + alias consistency (champion == last audited move of each model)."""
    anc = anchors(ops.client)
    report = ops.audit.verify(anc)
    entries = ops.audit.entries()
    mine = {m for m, a in anc.items() if a.startswith(f"{ops.audit.log_id}:")}
    models = sorted({e.model for e in entries} | mine)
    for model in models:
        moves = [e for e in entries if e.model == model and is_move(e, alias)]
        try:
            current = alias_version(ops.client, model, alias)
        except Exception:
            continue  # model deleted from the registry: the chain itself is still verified
        expected = moves[-1].data.get("to_version") if moves else None
        if current != expected:
            report.problems.append(f"model {model}: alias {alias} points to {current or 'nothing'} but the audit log says {expected or 'nothing'} (moved outside the audited path)")
            report.ok = False
    return report


_KEY_RE = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes)."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-")[:100]


def actor() -> str:
    return default_actor()
