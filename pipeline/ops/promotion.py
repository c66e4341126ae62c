"""Audited promotion: gates, approval records, and the one path that moves ``champion``.

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

Evaluation is injected: ``evaluate(model_dir) -> {task: accuracy}``;
:func:`load_evaluator` resolves ``"module:function"`` strings so flows and
deployments can name one.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.ops.audit import AuditEntry, AuditLog, AuditTransaction, default_actor, now_iso
from pipeline.params import CHAMPION, PromotionSpec
from taskvec.errors import TaskvecError

log = logging.getLogger(__name__)

ANCHOR_TAG = "taskvec.audit_head"
LEDGER_TAG = "taskvec.ledger"
MOVES = ("promote", "rollback", "revert")  # audit actions that move the champion alias
DECISIONS = ("approve", "reject")

Evaluator = Callable[[Path], dict[str, float]]


# ---------------------------------------------------------------------------
# Parameters (the ``promotion:`` section of params.yaml)


def load_spec(params_file: str | os.PathLike = "params.yaml") -> PromotionSpec:
    """``promotion:`` of params.yaml (validated whole, as PipelineParams); targets/controls default to the edit plan's."""
    from pipeline.params import load

    p = load(params_file)
    spec = p.promotion
    if not spec.targets:
        spec.targets = p.edit.target_tasks()
    if not spec.controls:
        spec.controls = list(dict.fromkeys(p.edit.control))
    return spec


# ---------------------------------------------------------------------------
# Gates


@dataclass
class GateResult:
    gate: str
    task: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass
class Comparison:
    challenger: dict[str, float]
    champion: dict[str, float] | None
    gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def rows(self, spec: PromotionSpec) -> list[dict]:
        out = []
        for task in sorted(set(self.challenger) | set(self.champion or {})):
            role = "target" if task in spec.targets else "control" if task in spec.controls else "other"
            ch = self.challenger.get(task)
            cp = (self.champion or {}).get(task)
            gates = [g for g in self.gates if g.task == task]
            out.append(
                {
                    "task": task,
                    "role": role,
                    "champion": None if cp is None else round(cp, 6),
                    "challenger": None if ch is None else round(ch, 6),
                    "delta_points": None if ch is None or cp is None else round((ch - cp) * 100, 4),
                    "gates": "; ".join(g.detail for g in gates) or "-",
                    "passed": all(g.passed for g in gates),
                }
            )
        return out

    def record(self) -> dict:
        return {
            "passed": self.passed,
            "challenger": self.challenger,
            "champion": self.champion,
            "gates": [g.__dict__ for g in self.gates],
        }

    def markdown(self, spec: PromotionSpec, title: str) -> str:
        lines = [f"# {title}", "", f"**Gates: {'PASSED' if self.passed else 'FAILED'}**", ""]
        lines += ["| task | role | champion | challenger | Δ points | gate | ok |", "|---|---|---|---|---|---|---|"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for r in self.rows(spec):
            delta = "-" if r["delta_points"] is None else f"{r['delta_points']:+.2f}"
            lines.append(f"| {r['task']} | {r['role']} | {fmt(r['champion'])} | {fmt(r['challenger'])} | {delta} | {r['gates']} | {'✅' if r['passed'] else '❌'} |")
        return "\n".join(lines) + "\n"


def apply_gates(challenger: dict[str, float], champion: dict[str, float] | None, spec: PromotionSpec) -> Comparison:
    """Control tasks may not drop more than ``max_control_drop`` points; targets must reach their floor."""
    cmp = Comparison(dict(challenger), None if champion is None else dict(champion))
    for task in spec.targets:
        floor = spec.target_floors.get(task, spec.default_target_floor)
        acc = challenger.get(task)
        if acc is None:
            cmp.gates.append(GateResult("target_evaluated", task, False, None, None, "target task not evaluated"))
            continue
        if floor is not None:
            ok = acc >= floor
            cmp.gates.append(GateResult("target_floor", task, ok, acc, floor, f"acc {acc:.4f} {'>=' if ok else '<'} floor {floor:.4f}"))
    for task in spec.controls:
        acc = challenger.get(task)
        if acc is None:
            cmp.gates.append(GateResult("control_evaluated", task, False, None, None, "control task not evaluated"))
            continue
        ref = None if champion is None else champion.get(task)
        if ref is None:
            cmp.gates.append(GateResult("control_drop", task, True, None, spec.max_control_drop, "no champion score to compare"))
            continue
        drop = (ref - acc) * 100
        ok = drop <= spec.max_control_drop + 1e-9
        cmp.gates.append(GateResult("control_drop", task, ok, round(drop, 6), spec.max_control_drop, f"drop {drop:.2f} pt {'<=' if ok else '>'} {spec.max_control_drop:g}"))
    for task in sorted(set(spec.target_floors) - set(spec.targets)):
        raise TaskvecError(f"promotion.target_floors names {task!r}, which is not a target task ({', '.join(spec.targets) or 'none'})")
    return cmp


# ---------------------------------------------------------------------------
# Evaluators


def load_evaluator(ref: str | Evaluator) -> Evaluator:
    """A callable, or ``"module:function"`` naming one."""
    if callable(ref):
        return ref
    mod, _, name = str(ref).partition(":")
    if not mod or not name:
        raise TaskvecError(f"evaluator {ref!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise TaskvecError(f"evaluator {ref!r} not found ({exc})") from None
    return fn


def default_evaluator(model_dir: Path, params_file: str | os.PathLike | None = None) -> dict[str, float]:
    """Accuracy of every target and control task, via :func:`taskvec.evaluate.evaluate_model`.

    Heads come from the task's fine-tune output when present (``outputs/finetuned/<task>``),
    else from the model folder, else the base's zero-shot head.
    """
    from taskvec.evaluate import evaluate_model

    from pipeline.params import load

    params_file = params_file or os.environ.get("TASKVEC_PARAMS", "params.yaml")
    spec = load_spec(params_file)
    params = load(params_file)  # the pipeline schema: params.yaml has pipeline sections
    out = {}
    for task in dict.fromkeys(spec.targets + spec.controls):
        head = Path(params_file).resolve().parent / "outputs" / "finetuned" / task / "heads" / f"{task}.safetensors"
        res = evaluate_model(model_dir, task, params, head_path=head if head.is_file() else None)
        out[task] = float(res["accuracy"])
    return out


# ---------------------------------------------------------------------------
# Registry access (MLflow client)


def mlflow_client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    from pipeline.ops.services import mlflow_uri

    uri = mlflow_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _params_tracking_uri())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _params_tracking_uri() -> str | None:
    from pipeline.params import MlflowSection, load

    path = Path(os.environ.get("TASKVEC_PARAMS", "params.yaml"))
    return (load(path).mlflow if path.is_file() else MlflowSection()).tracking_uri


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") or "not found" in str(exc).lower()


def alias_version(client, model: str, alias: str) -> str | None:
    """The version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise


def get_version(client, model: str, ref: str | int):
    """The model version for ``ref``: a number, or an alias (``champion``, ``@challenger``)."""
    from mlflow.exceptions import MlflowException

    ref = str(ref).lstrip("@")
    try:
        client.get_registered_model(model)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TaskvecError(f"registered model {model!r} not found") from None
        raise
    if not ref.isdigit():
        v = alias_version(client, model, ref)
        if v is None:
            raise TaskvecError(f"model {model!r} has no version with alias {ref!r}")
        ref = v
    try:
        return client.get_model_version(model, ref)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TaskvecError(f"model {model!r} has no version {ref}") from None
        raise


def ledger_of(client, mv) -> dict:
    """The edit ledger of a version: its ``taskvec.ledger`` tag, else taskvec.json in its artifact."""
    raw = (mv.tags or {}).get(LEDGER_TAG)
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            raise TaskvecError(f"{mv.name} version {mv.version}: tag {LEDGER_TAG} is not JSON") from None
    from taskvec.engine import read_ledger

    led = read_ledger(download_version(mv, tracking_uri=getattr(client, "tracking_uri", None)))
    if led is None:
        raise TaskvecError(f"{mv.name} version {mv.version} has no edit ledger (no {LEDGER_TAG} tag, no taskvec.json)")
    return led


def download_version(mv, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Path:
    import mlflow

    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=None if dst is None else str(dst), tracking_uri=tracking_uri)
    except Exception as exc:  # MlflowException, OSError …
        raise TaskvecError(f"cannot download {mv.name} version {mv.version} from {mv.source}: {str(exc).splitlines()[0]}") from None
    return model_folder(Path(path))


def model_folder(root: Path) -> Path:
    """The HF folder (with taskvec.json) in a downloaded artifact: the root, or ``data/model`` of the pipeline's pyfunc."""
    root = Path(root)
    if (root / "taskvec.json").is_file():
        return root
    for cand in sorted(root.glob("data/*")) + sorted(root.glob("*")):
        if (cand / "taskvec.json").is_file():
            return cand
    return root


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
    """MLflow registry + audit log, the pair every audited operation needs."""

    def __init__(self, tracking_uri: str | None = None, audit_url: str | None = None, *, client=None, audit: AuditLog | None = None):
        self.client = client or mlflow_client(tracking_uri)
        if audit is None:
            from pipeline.ops.audit import default_url

            audit = AuditLog(audit_url or default_url(getattr(self.client, "tracking_uri", None)))
        self.audit = audit


def _fault(point: str) -> None:
    """Test hook: ``TASKVEC_FAULT=<point>`` raises at that point of the protocol."""
    if os.environ.get("TASKVEC_FAULT") == point:
        raise RuntimeError(f"injected fault at {point}")


class _Undo:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, fn: Callable[[], Any]) -> None:
        self._steps.append((what, fn))

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
        prev = old.get(key)

        def restore(key=key, prev=prev):
            if prev is None:
                client.delete_model_version_tag(mv.name, mv.version, key)
            else:
                client.set_model_version_tag(mv.name, mv.version, key, prev)

        undo.push(f"tag {key}", restore)
        client.set_model_version_tag(mv.name, mv.version, key, value)


def _set_anchor(client, model: str, entry: AuditEntry, undo: _Undo, log_id: str) -> None:
    prev = (client.get_registered_model(model).tags or {}).get(ANCHOR_TAG)

    def restore():
        if prev is None:
            client.delete_registered_model_tag(model, ANCHOR_TAG)
        else:
            client.set_registered_model_tag(model, ANCHOR_TAG, prev)

    undo.push("audit anchor", restore)
    client.set_registered_model_tag(model, ANCHOR_TAG, entry.anchor(log_id))


def audited_append(ops: Ops, action: str, model: str, version: str | None, build: Callable[[AuditTransaction, _Undo], dict], *, actor: str | None = None) -> AuditEntry:
    """Append one entry whose payload ``build`` computes (and whose side effects it may register for undo)."""
    with ops.audit.transaction() as tx:
        undo = _Undo()
        try:
            payload = build(tx, undo)
            entry = tx.append(action, model, version, payload, actor=actor)
            _set_anchor(ops.client, model, entry, undo, ops.audit.log_id)
            _fault("before_commit")
            tx.commit()
            return entry
        except BaseException:
            undo.run()
            raise


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
    with ops.audit.transaction() as tx:
        undo = _Undo()
        try:
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

            def restore_alias():
                if previous is None:
                    client.delete_registered_model_alias(model, alias)
                else:
                    client.set_registered_model_alias(model, alias, previous)

            undo.push("alias", restore_alias)
            client.set_registered_model_alias(model, alias, version)
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
            _fault("before_commit")
            tx.commit()
            return Move(entry, model, previous, version, approval)
        except BaseException:
            undo.run()
            raise


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
