"""Scheduled retraining and re-editing: the ``scheduled-edit`` flow, its cron deployment and the task runner.

``scheduled_edit`` first fingerprints its inputs — base content hash, data
file digests, params.yaml sha256 — and compares them with the fingerprint
recorded on the registered model (tag ``taskvec.schedule.fingerprint``) by
the last scheduled run that registered something. Same fingerprint and the
version still exists: it returns ``unchanged`` in seconds and registers
nothing. Otherwise it runs the ``edit`` flow, whose task cache keys are the
content hashes of each step's inputs, so only the steps downstream of the
changed input re-run (a new data file for one task re-runs that task's
fine-tune → extract → compose → search → evaluate → register; the other
task's fine-tune is a cache hit).

Deployment: ``taskvec deploy`` (work pool + ``prefect.yaml``'s deployments,
with the absolute project root in the pull step; a worker of the ``taskvec``
pool runs it on the cron schedule, no extra variable) or, without a work pool,
``python -m flows.schedule serve`` (``flow.serve`` with the same cron).
Cron and parameters come from params.yaml's ``schedule:`` section.

Task runner (no home-made scheduler): when configured — ``TASKVEC_DASK_ADDRESS``
(an existing Dask scheduler, e.g. ``tcp://dask-scheduler:8786``), or
``TASKVEC_TASK_RUNNER=dask`` (a local Dask cluster), or params.yaml
``runner: {kind: dask, address: …, cluster_kwargs: …}`` — the edit flow's
tasks (the fine-tunes first of all) are submitted to Dask through
``prefect_dask.DaskTaskRunner``; otherwise the flow keeps its own runner.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

FINGERPRINT_TAG = "taskvec.schedule.fingerprint"


# ---------------------------------------------------------------------------
# configuration


def schedule_config(params_file: str | os.PathLike = "params.yaml") -> dict:
    """``schedule:`` of params.yaml with defaults: cron, timezone, deployment name, flow parameters."""
    from pipeline.params import load

    sec = load(params_file).schedule
    from taskvec.redact import redact_mapping

    clean = redact_mapping(sec.parameters)
    for key, value in sec.parameters.items():
        if clean.get(key) != value:  # deployment parameters are stored (and shown) by Prefect
            from taskvec.errors import TaskvecError

            raise TaskvecError(f"schedule.parameters.{key} holds a credential; Prefect stores deployment parameters: put it in the worker's environment instead")
    return {
        "cron": sec.cron,
        "timezone": sec.timezone,
        "name": sec.deployment,
        "parameters": {"params_file": str(params_file), "register_model": sec.register_model, **sec.parameters},
    }


def runner_config(params_file: str | os.PathLike = "params.yaml") -> dict:
    """``{"kind": "dask"|"default", "address": …, "cluster_kwargs": …}`` from the environment or params.yaml."""
    from pipeline.params import load

    addr = os.environ.get("TASKVEC_DASK_ADDRESS")
    if addr:
        return {"kind": "dask", "address": addr, "cluster_kwargs": {}}
    sec = load(params_file).runner
    return {"kind": os.environ.get("TASKVEC_TASK_RUNNER") or sec.kind, "address": sec.address, "cluster_kwargs": sec.cluster_kwargs}


def configured_task_runner(params_file: str | os.PathLike = "params.yaml", config: dict | None = None):
    """A ``DaskTaskRunner`` when Dask is configured, else None (the flow keeps its own runner)."""
    cfg = config or runner_config(params_file)
    if cfg["kind"] in ("default", "thread", None):
        return None
    if cfg["kind"] != "dask":
        from taskvec.errors import TaskvecError

        raise TaskvecError(f"runner.kind must be dask or default, not {cfg['kind']!r}")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        from taskvec.errors import TaskvecError

        raise TaskvecError("runner.kind is dask but prefect-dask is not installed (pip install 'prefect-dask==0.3.7')") from None
    if cfg.get("address"):
        return DaskTaskRunner(address=cfg["address"])
    return DaskTaskRunner(cluster_kwargs=cfg.get("cluster_kwargs") or {})


def edit_flow(params_file: str | os.PathLike = "params.yaml"):
    """The pipeline's ``edit`` flow with the configured task runner."""
    from flows.edit import edit

    runner = configured_task_runner(params_file)
    return edit.with_options(task_runner=runner) if runner is not None else edit


#: the project's code root, found from this file (a worker needs no TASKVEC_ROOT)
CODE_ROOT = Path(__file__).resolve().parent.parent


def resolve_params(params_file: str | os.PathLike) -> Path:
    """An absolute params path: as given when absolute or present in the cwd, else relative to :data:`CODE_ROOT`."""
    path = Path(params_file)
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (CODE_ROOT / path).resolve()


# ---------------------------------------------------------------------------
# change detection


def input_fingerprint(params_file: str | os.PathLike) -> dict[str, Any]:
    """What a scheduled run depends on: base hash, data digests, params sha256 (and the combined digest)."""
    from pipeline import params as PP

    p = PP.load(params_file)
    tasks = list(dict.fromkeys(p.finetune.tasks + p.edit.eval_tasks()))
    parts = {"base_hash": PP.base_hash(p), "data": PP.data_digests(p, tasks), "params_sha256": PP.params_hash(params_file)}
    parts["digest"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def _registry(params_file: str | os.PathLike):
    from pipeline import params as PP
    from pipeline.ops import tracking
    from pipeline.ops.promotion import mlflow_client

    p = PP.load(params_file)
    return mlflow_client(tracking.resolve_tracking_uri(p)), p.mlflow.registered_model


def last_fingerprint(client, model: str) -> tuple[str | None, str | None]:
    """(digest, version) recorded by the last scheduled registration, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        raw = (client.get_registered_model(model).tags or {}).get(FINGERPRINT_TAG)
    except MlflowException:
        return None, None
    if not raw:
        return None, None
    rec = json.loads(raw)
    try:
        client.get_model_version(model, rec["version"])
    except MlflowException:
        return None, None  # the version is gone: rebuild
    return rec.get("digest"), rec.get("version")


@flow(name="scheduled-edit")
def scheduled_edit(params_file: str = "params.yaml", register_model: bool = True, force: bool = False) -> dict:
    """Re-run the edit pipeline if (and only as far as) its inputs changed; see the module docstring."""
    import time

    logger = get_run_logger()
    t0 = time.perf_counter()
    params_file = str(resolve_params(params_file))
    fp = input_fingerprint(params_file)
    client, model = _registry(params_file)
    digest, version = last_fingerprint(client, model)
    if digest == fp["digest"] and not force:
        logger.info("inputs unchanged since version %s (%s): nothing to do", version, digest[:12])
        return {"status": "unchanged", "version": version, "fingerprint": fp["digest"], "seconds": round(time.perf_counter() - t0, 3)}
    logger.info("inputs changed (%s -> %s): running the edit flow", (digest or "none")[:12], fp["digest"][:12])
    summary = edit_flow(params_file)(params_file=params_file, register_model=register_model)
    reg = (summary or {}).get("registered")
    if reg:
        client.set_registered_model_tag(model, FINGERPRINT_TAG, json.dumps({"digest": fp["digest"], "version": reg["version"], "parts": fp}, sort_keys=True)[:99_000])
    return {"status": "ran", "registered": reg, "fingerprint": fp["digest"], "states": (summary or {}).get("states"), "seconds": round(time.perf_counter() - t0, 3)}


def serve(params_file: str = "params.yaml") -> None:
    """``flow.serve`` alternative to prefect.yaml: a long-running process that runs the cron schedule."""
    cfg = schedule_config(params_file)
    from prefect.schedules import Cron

    scheduled_edit.serve(name=cfg["name"], schedule=Cron(cfg["cron"], timezone=cfg["timezone"]), parameters=cfg["parameters"])


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if args and args[0] == "serve":
        serve(args[1] if len(args) > 1 else "params.yaml")
    else:
        print(json.dumps(scheduled_edit(params_file=args[0] if args else "params.yaml"), indent=2, default=str))
