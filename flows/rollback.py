"""The ``rollback`` flow: remove one edit from a registered version (see :mod:`pipeline.ops.rollback`).

Rebuilds base + the remaining edits (the canonical materialisation), checks
θ_edit − λτ against it (max |diff| within float rounding), evaluates it with
the promotion evaluator, registers it as a new version whose ledger no longer
holds the edit and, when the source was the champion, moves ``champion`` to it
through the audited path. A Prefect artifact reports the check.

Run: ``python -m flows.rollback --model NAME --remove SHA`` or ``taskvec rollback``.

``tracking_uri`` / ``audit_url`` are stored by Prefect with the flow run: never
pass a URI holding a password as one — give it through ``MLFLOW_TRACKING_URI`` /
``TASKVEC_AUDIT_URL`` (:func:`flows.promote.by_environment` does this for
callers). ``approver`` / ``reason`` are cleaned (credentials masked, control
characters escaped) before they reach tags and the audit log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipeline.ops import promotion as P
from pipeline.ops import rollback as R


@flow(name="rollback")
def rollback_flow(
    model: str,
    remove: str,
    version: str = "champion",
    vectors: list[str] | None = None,
    search_dirs: list[str] | None = None,
    approver: str | None = None,
    reason: str | None = None,
    move_champion: bool = True,
    tracking_uri: str | None = None,
    audit_url: str | None = None,
    evaluator: str | None = None,
    params_file: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    ops = P.Ops(tracking_uri, audit_url)
    res = R.rollback(
        ops,
        model,
        remove,
        version=version,
        vectors=[Path(v) for v in vectors or []],
        search_dirs=None if search_dirs is None else [Path(d) for d in search_dirs],
        approver=approver,
        reason=reason,
        move_champion=move_champion,
        evaluator=evaluator,
        params_file=params_file,
        weights=weights,
    )
    logger.info(res.summary())
    md = (
        f"# Rollback of {model} v{res.source_version}\n\n"
        f"| | |\n|---|---|\n| removed vector | `{res.removed['vector_sha256']}` |\n| λ | {res.removed['lambda']:g} |\n"
        f"| new version | {res.new_version} |\n| max abs diff vs rebuild | {res.check.max_abs_diff:.3e} |\n"
        f"| max diff (ulp) | {res.check.max_ulps:.2f} (limit {res.check.tolerance_ulps:g}) |\n"
        f"| champion moved | {'yes: v%s → v%s' % (res.champion_moved.from_version, res.champion_moved.to_version) if res.champion_moved else 'no'} |\n"
    )
    create_markdown_artifact(markdown=md, key=P.artifact_key("rollback", model), description=f"rollback of {model} v{res.source_version}")
    return {
        "model": model,
        "source_version": res.source_version,
        "new_version": res.new_version,
        "removed_vector": res.removed["vector_sha256"],
        "max_abs_diff": res.check.max_abs_diff,
        "max_ulps": res.check.max_ulps,
        "accuracy": res.accuracy,
        "champion_moved": bool(res.champion_moved),
        "audit_seq": res.champion_moved.entry.seq if res.champion_moved else None,
        "notes": res.notes,
    }
