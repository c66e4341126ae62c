"""The tags that make a registered version reproducible: ledger, hashes, provenance.

:func:`ledger_tags` (every version: the edit ledger, base and output content
hashes, ordered edits), :func:`version_tags` (the register step's: plus git
commit, ``dvc.lock`` hashes, params hash, dataset digests, Prefect flow-run
id, metrics summary) and :func:`dvc_lock_hashes`. Re-exported by
:mod:`pipeline.ops.registry`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.ops import tracking

LEDGER_TAG = "taskvec.ledger"




def dvc_lock_hashes(root: str | os.PathLike) -> tuple[dict[str, str], str | None]:
    """``({path: md5}, sha256 of dvc.lock)`` for every stage out and external dep recorded in dvc.lock."""
    import hashlib

    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}, None
    raw = lock.read_bytes()
    data = yaml.safe_load(raw) or {}
    hashes: dict[str, str] = {}
    for name, stage in (data.get("stages") or {}).items():
        if name == "register":
            continue
        for kind in ("outs", "deps"):
            for entry in stage.get(kind) or []:
                path = entry.get("path", "")
                if kind == "deps" and not (path.startswith("outputs/") or path.startswith("..") or path.startswith("/")):
                    continue  # code deps are covered by git.commit
                md5 = entry.get("md5") or entry.get("hash") or ""
                if md5:
                    hashes[path] = md5
    return dict(sorted(hashes.items())), hashlib.sha256(raw).hexdigest()


def edits_of(ledger: dict) -> list[dict]:
    """Flat ordered list of {vector_sha256, vector, lambda, method, ...} of a ledger."""
    out = []
    for e in ledger.get("edits", []):
        opts = {k: v for k, v in e.items() if k not in ("merge", "vector_sha256", "vector", "lambda")}
        for item in e.get("merge", [e]):
            out.append({"vector_sha256": item["vector_sha256"], "vector": item.get("vector"), "lambda": item["lambda"], **opts})
    return out


def _dump(o: Any) -> str:
    return json.dumps(o, sort_keys=True, separators=(",", ":"), default=str)


def ledger_tags(ledger: dict) -> dict[str, str]:
    """The tags every registered version carries about its weights (ledger, hashes, ordered edits)."""
    core = {k: v for k, v in ledger.items() if k != "weight_files"}
    return {
        LEDGER_TAG: _dump(core),
        "taskvec.base_model": str(ledger["base_model"]),
        "taskvec.base_hash": str(ledger["base_hash"]),
        "taskvec.output_hash": str(ledger["output_hash"]),
        "taskvec.edits": _dump([{k: e[k] for k in ("vector_sha256", "lambda", "method")} for e in edits_of(ledger)]),
    }


def version_tags(*, ledger: dict, composition: dict, git: dict, dvc_hashes: dict, dvc_sha: str | None, params_sha: str, digests: dict, flow_run_id: str | None, summary: dict) -> dict[str, str]:
    tags = {
        **ledger_tags(ledger),
        "taskvec.composition": _dump(composition),
        "git.commit": str(git.get("commit")),
        "git.dirty": str(bool(git.get("dirty"))).lower(),
        "dvc.lock": _dump(dvc_hashes),
        "dvc.lock_sha256": str(dvc_sha),
        "params.sha256": params_sha,
        "data.digests": _dump(digests),
        "prefect.flow_run_id": str(flow_run_id or "none"),
        "metrics.summary": _dump(summary),
    }
    return {k: tracking.redact(v) for k, v in tags.items()}


