"""Registry ↔ audit-log integrity: what every audited write checks first, and the anchors it leaves.

The audit log (:mod:`pipeline.ops.audit`) is the record; MLflow holds the
state it describes (aliases) and the anchors that let the record be checked
from outside its own database:

* ``taskvec.audit_head`` on each registered model — ``log_id:seq:hash`` of the
  model's newest entry (set by :mod:`pipeline.ops.promotion` with every entry);
* ``taskvec.rejected`` on each rejected model version — ``log_id:seq:hash`` of
  the ``reject`` entry (:func:`anchor_rejection`, set in the same protocol
  step as the head anchor, undone with it).

:func:`check_before_write` runs before every audited write on a model (gate
record, approval, rejection, alias move) and refuses, naming the
discrepancy, when:

* the model's head anchor names another audit log (the database was deleted,
  recreated or replaced, or ``--audit-url`` names the wrong one), or names an
  entry that is missing or different, or entries were added after it without
  the audited path, or the chain itself is broken;
* the registry's alias disagrees with the audit chain ("champion of M is
  version 3 in MLflow but version 2 in the audit log");
* the version is tagged rejected in MLflow (approval, gate request or move) —
  so a rejected version never becomes champion even when the audit database
  says nothing about it.

Without this check a new, empty audit log would accept a new gate record for
the model and move its head anchor, laundering the loss. Recovery from a
genuinely lost database is a restore from backup (the anchors then match
again), never a silent restart.

:func:`verify` is :func:`pipeline.ops.promotion.verify` plus the rejection
anchors (a rejected version that is champion, or a rejection anchor whose
entry is gone or different).
"""

from __future__ import annotations

from pipeline.ops.audit import AuditEntry, split_log_id
from taskvec.errors import TaskvecError

ANCHOR_TAG = "taskvec.audit_head"
REJECTED_TAG = "taskvec.rejected"
CHAMPION = "champion"
MOVES = ("promote", "rollback", "revert")
#: audit actions that bring a version closer to an alias: refused for a version tagged rejected
ADVANCING = ("request", "approve", *MOVES)


def _model_tags(client, model: str) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(model).tags or {})
    except MlflowException:
        return {}


def _version_tags(client, model: str, version) -> dict:
    from mlflow.exceptions import MlflowException

    if version is None:
        return {}
    try:
        return dict(client.get_model_version(model, str(version)).tags or {})
    except MlflowException:
        return {}


def _parse(anchor: str) -> tuple[str, int, str] | None:
    try:
        log_id, seq, digest = str(anchor).split(":", 2)
        return log_id, int(seq), digest
    except ValueError:
        return None


def _alias_version(client, model: str, alias: str) -> str | None:
    from pipeline.ops.promotion import alias_version

    return alias_version(client, model, alias)


def _is_move(e: AuditEntry, alias: str) -> bool:
    return e.action in MOVES and e.data.get("alias") == alias and e.data.get("to_version") is not None


def anchor_problems(ops, model: str, entries: list[AuditEntry] | None = None) -> list[str]:
    """Discrepancies between the model's head anchor in MLflow and the audit log (empty: consistent)."""
    audit = ops.audit
    entries = audit.entries() if entries is None else entries
    mine = [e for e in entries if e.model == model]
    anchor = _model_tags(ops.client, model).get(ANCHOR_TAG)
    if not anchor:
        if mine:
            return [f"the audit log holds {len(mine)} entries for {model} (last: entry {mine[-1].seq}) but the registry has no {ANCHOR_TAG} anchor for it (tag deleted)"]
        return []
    parsed = _parse(anchor)
    if parsed is None:
        return [f"{model}: malformed audit anchor {anchor!r}"]
    log_id, seq, _ = parsed
    if log_id != audit.log_id:
        loc_then, _ = split_log_id(log_id)
        loc_now, _ = split_log_id(audit.log_id)
        why = "the audit database was deleted and recreated, or its meta row rewritten" if loc_then and loc_then == loc_now else "the audit database was replaced, or --audit-url / TASKVEC_AUDIT_URL names the wrong one"
        return [f"{model} is anchored at entry {seq} of audit log {log_id}, but this audit log is {audit.log_id} ({why}); restore that audit database"]
    report = audit.verify({model: anchor}, entries=entries)
    return list(report.problems)


def alias_problem(ops, model: str, alias: str = CHAMPION, entries: list[AuditEntry] | None = None) -> str | None:
    """``"champion of M is version 3 in MLflow but version 2 in the audit log"``, or None when they agree."""
    entries = ops.audit.entries(model=model) if entries is None else [e for e in entries if e.model == model]
    moves = [e for e in entries if _is_move(e, alias)]
    audited = moves[-1].data.get("to_version") if moves else None
    current = _alias_version(ops.client, model, alias)
    if current == audited:
        return None
    in_mlflow = f"version {current}" if current else "not set"
    in_log = f"version {audited} (entry {moves[-1].seq})" if moves else "never set"
    return f"{alias} of {model} is {in_mlflow} in MLflow but {in_log} in the audit log (moved outside the audited path; point it back, or run `taskvec audit verify`)"


def rejection_problem(ops, model: str, version) -> str | None:
    """Why ``version`` may not advance because MLflow records it as rejected (None: not tagged)."""
    tag = _version_tags(ops.client, model, version).get(REJECTED_TAG)
    if not tag:
        return None
    parsed = _parse(tag)
    where = f"audit entry {parsed[1]} of log {parsed[0]}" if parsed else repr(tag)
    return f"{model} version {version} is tagged rejected in MLflow ({REJECTED_TAG}: {where}); a rejected version never becomes champion"


def check_before_write(ops, action: str, model: str, version=None, *, alias: str = CHAMPION, tx=None) -> None:
    """Refuse an audited write on ``model`` whose record disagrees with the registry (see module docstring).

    Called at the start of :func:`pipeline.ops.promotion.audited_append` (gate
    records, approvals, rejections) and of :func:`pipeline.ops.promotion.move_alias`,
    inside their locked transaction ``tx`` (so a concurrent audited move is
    either wholly before this check or wholly after the write).
    """
    entries = tx.entries() if tx is not None else ops.audit.entries()
    problems = anchor_problems(ops, model, entries)
    if action in ADVANCING:
        known = any(e.action == "reject" and e.model == model and e.version == str(version) for e in entries)
        rejected = None if known else rejection_problem(ops, model, version)  # known: the protocol names the entry itself
        if rejected:
            problems.insert(0, rejected)
        disagree = alias_problem(ops, model, alias, entries)
        if disagree:
            problems.append(disagree)
    if problems:
        what = f"{action} {model}" + (f" version {version}" if version is not None else "")
        more = f" (+{len(problems) - 1} more problem(s): run `taskvec audit verify`)" if len(problems) > 1 else ""
        raise TaskvecError(f"refusing to {what}: {problems[0]}{more}")


def anchor_rejection(client, entry: AuditEntry, undo, log_id: str) -> None:
    """Tag a rejected version ``taskvec.rejected = log_id:seq:hash`` (undone with the rest of the protocol step)."""
    if entry.action != "reject" or entry.version is None:
        return
    model, version = entry.model, entry.version
    prev = _version_tags(client, model, version).get(REJECTED_TAG)

    def restore():
        if prev is None:
            client.delete_model_version_tag(model, version, REJECTED_TAG)
        else:
            client.set_model_version_tag(model, version, REJECTED_TAG, prev)

    undo.push("rejection anchor", restore)
    client.set_model_version_tag(model, version, REJECTED_TAG, entry.anchor(log_id))


def rejection_anchor_problems(ops, models: list[str], alias: str = CHAMPION) -> list[str]:
    """Rejection anchors that the audit log no longer backs, and rejected versions holding ``alias``."""
    problems = []
    by_seq = {e.seq: e for e in ops.audit.entries()}
    for model in models:
        try:
            versions = ops.client.search_model_versions(f"name = '{model}'")
        except Exception:  # noqa: BLE001 - model gone from the registry
            continue
        champion = None
        try:
            champion = _alias_version(ops.client, model, alias)
        except Exception:  # noqa: BLE001
            pass
        for mv in versions:
            tag = (mv.tags or {}).get(REJECTED_TAG)
            if not tag:
                continue
            v = str(mv.version)
            if v == champion:
                problems.append(f"model {model}: version {v} is {alias} but is tagged rejected ({REJECTED_TAG} {tag[:40]}…)")
            parsed = _parse(tag)
            if parsed is None:
                problems.append(f"model {model}: version {v} has a malformed {REJECTED_TAG} anchor")
                continue
            log_id, seq, digest = parsed
            if log_id != ops.audit.log_id:
                if ops.audit.foreign_anchor_problem(model, log_id, seq, has_entries=False):
                    problems.append(f"model {model}: version {v} was rejected in audit log {log_id} (entry {seq}), which is not this log {ops.audit.log_id}: the audit database was deleted and recreated")
                continue
            e = by_seq.get(seq)
            if e is None or e.hash != digest or e.action != "reject" or e.version != v:
                problems.append(f"model {model}: the rejection of version {v} (audit entry {seq}) is missing from the audit log or differs from its anchor")
    return problems


def verify(ops, *, alias: str = CHAMPION):
    """:func:`pipeline.ops.promotion.verify` plus the rejection anchors of every model it covers."""
    from pipeline.ops.promotion import anchors as model_anchors
    from pipeline.ops.promotion import verify as chain_verify

    report = chain_verify(ops, alias=alias)
    models = {e.model for e in ops.audit.entries()}
    for model, anchor in model_anchors(ops.client).items():
        log_id = (_parse(anchor) or ("", 0, ""))[0]
        # this log's models, and those anchored in an earlier log at this same location (a recreated database)
        if log_id == ops.audit.log_id or ops.audit.foreign_anchor_problem(model, log_id, 0, has_entries=False):
            models.add(model)
    extra = rejection_anchor_problems(ops, sorted(models), alias)
    if extra:
        report.problems.extend(extra)
        report.ok = False
    return report
