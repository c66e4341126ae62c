"""The audit log's entries: canonical hashing, the chain check against anchors, and the printed form.

Storage (SQL tables, locks, transactions) is :mod:`pipeline.ops.audit.store`;
this module is pure: it reads no database.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from taskvec.redact import escape_controls

GENESIS = "0" * 64
ACTIONS = ("request", "gates_failed", "approve", "reject", "promote", "rollback", "revert")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the bytes that get hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)


def entry_hash(seq: int, ts: str, actor: str, action: str, model: str, version: str | None, payload: str, prev_hash: str) -> str:
    body = canonical_json(
        {"seq": seq, "ts": ts, "actor": actor, "action": action, "model": model, "version": version, "payload": payload, "prev_hash": prev_hash}
    )
    return hashlib.sha256(body.encode()).hexdigest()


def default_actor() -> str:
    return os.environ.get("TASKVEC_ACTOR") or _safe_user()


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: str
    actor: str
    action: str
    model: str
    version: str | None
    payload: str  # canonical JSON, exactly as hashed
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict:
        return json.loads(self.payload)

    def computed_hash(self) -> str:
        return entry_hash(self.seq, self.ts, self.actor, self.action, self.model, self.version, self.payload, self.prev_hash)

    def as_dict(self) -> dict:
        return {**asdict(self), "payload": self.data}

    def anchor(self, log_id: str) -> str:
        """What is recorded outside the database: ``log_id:seq:hash``."""
        return f"{log_id}:{self.seq}:{self.hash}"


@dataclass
class VerifyReport:
    ok: bool
    entries: int
    head: str | None
    problems: list[str] = field(default_factory=list)
    anchors_checked: int = 0

    def summary(self) -> str:
        if self.ok:
            return f"audit log OK: {self.entries} entries, chain intact, {self.anchors_checked} anchor(s) match, head {self.head or '-'}"
        return f"audit log BROKEN ({len(self.problems)} problem(s)): " + "; ".join(self.problems[:5])


def split_log_id(log_id: str) -> tuple[str | None, str]:
    """``(location, random)`` of a log id; logs made before locations were recorded have location None."""
    loc, dot, rand = str(log_id).partition(".")
    return (loc, rand) if dot else (None, str(log_id))


def verify_chain(entries: list[AuditEntry], log_id: str, anchors: dict[str, str] | None = None) -> VerifyReport:
    """Recompute the chain of log ``log_id``'s ``entries``; ``anchors`` maps model → ``"log_id:seq:hash"`` recorded outside the database."""
    problems: list[str] = []
    prev = GENESIS
    by_seq: dict[int, AuditEntry] = {}
    for i, e in enumerate(entries, start=1):
        by_seq[e.seq] = e
        if e.seq != i:
            problems.append(f"entry {i} is missing (next stored entry is seq {e.seq}): deletion")
            prev = e.prev_hash  # resynchronise so one deletion is reported once
        if e.prev_hash != prev:
            problems.append(f"entry {e.seq}: prev_hash does not match the hash of entry {e.seq - 1}")
        if e.computed_hash() != e.hash:
            problems.append(f"entry {e.seq}: content does not match its hash (edited)")
        if e.action not in ACTIONS:
            problems.append(f"entry {e.seq}: unknown action {e.action!r}")
        prev = e.hash
    checked = 0
    for model, anchor in sorted((anchors or {}).items()):
        if not anchor:
            continue
        try:
            anchor_log, seq_s, digest = anchor.split(":", 2)
            seq = int(seq_s)
        except ValueError:
            problems.append(f"model {model}: malformed audit anchor {anchor!r}")
            continue
        if anchor_log != log_id:
            problem = foreign_anchor_problem(log_id, model, anchor_log, seq, has_entries=any(x.model == model for x in entries))
            if problem:
                problems.append(problem)
                checked += 1
            continue  # else: anchored in another audit log (another deployment sharing the registry)
        checked += 1
        e = by_seq.get(seq)
        if e is None:
            problems.append(f"model {model}: anchored entry {seq} is missing (entries were deleted from the end)")
        elif e.hash != digest or e.model != model:
            problems.append(f"model {model}: anchored entry {seq} differs from the anchor (edited or replaced)")
        else:
            later = [x for x in entries if x.model == model and x.seq > seq]
            if later:
                # an entry for this model was written without moving its anchor: out-of-band insert
                problems.append(f"model {model}: entry {later[0].seq} was added after the anchored head {seq} without the audited path")
    head = f"{entries[-1].seq}:{entries[-1].hash[:16]}" if entries else None
    return VerifyReport(ok=not problems, entries=len(entries), head=head, problems=problems, anchors_checked=checked)


def foreign_anchor_problem(mine_id: str, model: str, log_id: str, seq: int, *, has_entries: bool) -> str | None:
    """Why an anchor naming log ``log_id`` is a problem in log ``mine_id`` (None: another deployment's log, fine)."""
    mine, _ = split_log_id(mine_id)
    theirs, _ = split_log_id(log_id)
    if theirs is not None and theirs == mine:
        return (
            f"model {model}: anchored at entry {seq} of audit log {log_id}, but the database at this location is now log {mine_id}"
            " (the audit database was deleted and recreated, or its meta row rewritten)"
        )
    if has_entries:
        return f"model {model}: this audit log has entries for it, but its anchor names another audit log ({log_id}, entry {seq}): the anchor or the log was replaced"
    return None


def format_entries(entries: list[AuditEntry], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([e.as_dict() for e in entries], indent=2, sort_keys=True)
    lines = [f"{'seq':>5}  {'time (UTC)':<26}  {'actor':<12}  {'action':<12}  {'model':<20}  {'ver':>4}  hash          details"]
    for e in entries:
        data = e.data
        detail_keys = ("approver", "decision", "reason", "from_version", "to_version", "removed_vector", "passed")
        details = escape_controls(", ".join(f"{k}={data[k]}" for k in detail_keys if k in data))
        esc = escape_controls  # entries written before free text was cleaned may still hold control characters
        lines.append(f"{e.seq:>5}  {esc(e.ts[:26]):<26}  {esc(e.actor)[:12]:<12}  {esc(e.action):<12}  {esc(e.model)[:20]:<20}  {esc(e.version or '-'):>4}  {e.hash[:12]}  {details}")
    return "\n".join(lines)
