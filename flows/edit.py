"""The ``edit`` flow: params.yaml → fine-tune ∥ → extract → compose → search λ → evaluate → (dvc) → register.

::

    params.yaml ─┬─ finetune(sst2) ──> extract(sst2) ──┐
                 └─ finetune(agnews) ─> extract(agnews) ┴─> compose ─> search λ ─> evaluate ─> dvc commit/push ─> register

Fine-tunes run concurrently on Prefect's thread-pool task runner (each in its
own subprocess with the step's fixed torch thread count, as under ``dvc
repro``); every other step runs in-process. Tasks exchange paths and content
hashes only. Each task's cache key is built from the content hashes of what
it reads (base weights, data files, upstream outputs, its parameter slice,
its code), so re-running an unchanged flow recomputes nothing; a step whose
output is missing on disk is recomputed (``refresh_cache``).

Cache coherence: every task result records ``outputs_sha256``, the hash of
the outputs that run wrote. A cache hit is only taken while the outputs on
disk still have that hash (file hashes from taskvec's stat-keyed hash
cache, so the check is cheap); otherwise (outputs rewritten by ``dvc exp
run``, a ``git checkout``, a hand edit…) the step runs again. Nothing is
printed, committed to DVC or registered that this run did not verify.

Overrides (``taskvec run -S key=value``): the flow validates params file +
overrides, writes the effective params to ``.taskvec-run-params.yaml``
beside the params file (``params.yaml`` is never modified) and runs on that
file, so every step, cache key, MLflow param and the registry's params hash
see the effective values; the overrides are an MLflow tag. Such a run does
not ``dvc commit``: dvc.lock describes ``params.yaml``, and must not claim
it produced these outputs. (The same holds for any params file other than
the project's ``params.yaml``.)

MLflow: one parent run per flow run, nested runs per step that ran (cached
steps are listed in the parent's tag ``taskvec.cached_steps``, so a fully
cached re-run records one run). Prefect: a
markdown artifact ``edit-summary`` and a table artifact ``edit-results``.
Runs without a server (Prefect's ephemeral mode) or against
``PREFECT_API_URL``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import params as P
from pipeline.params import EFFECTIVE_PARAMS, effective_params  # noqa: F401 - re-exported for callers of the flow
from pipeline.recipe import recipe_sha256
from tasks.common import outputs_hash, result_storage, step_outputs
from tasks.compose import compose_task
from tasks.evaluate import evaluate_task
from tasks.extract import extract_task
from tasks.finetune import finetune_task
from tasks.register import register_task
from tasks.search import search_task
from taskvec.data import validate_tasks


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001
        return None


def _opts(task, storage: Path, out: Path | list[Path]):
    """Persist results beside the outputs; recompute when an output is missing."""
    outs = out if isinstance(out, list) else [out]
    return task.with_options(result_storage=storage, refresh_cache=not all(o.exists() for o in outs))


def _verified(p, storage: Path, task, step: str, name: str | None, future, args: tuple, logger) -> tuple[dict, str]:
    """The future's result if it vouches for the outputs on disk; else the step re-run (``refresh_cache``).

    A cached result records ``outputs_sha256`` (the outputs that run wrote);
    when the files now on disk hash differently, the cache entry is stale for
    them, and the step runs again (which rewrites the outputs and the entry).
    """
    result, state = future.result(), _state_name(future)
    outs = step_outputs(p, step, name)
    if result.get("outputs_sha256") and result["outputs_sha256"] == outputs_hash(p.root, outs):
        return result, state
    logger.warning("%s: the outputs on disk are not those of the cached result; running the step again", step + (f"/{name}" if name else ""))
    future = task.with_options(result_storage=storage, refresh_cache=True).submit(*args)
    result, state = future.result(), _state_name(future)
    if result.get("outputs_sha256") != outputs_hash(p.root, outs):
        raise RuntimeError(f"{step}: outputs changed on disk while the step ran")
    return result, state


def finetune_placement(p):
    """``dask.annotate(resources=runner.finetune_resources)`` (e.g. ``{GPU: 1}``), so Dask runs fine-tunes only on
    workers started with those resources (``dask worker --resources GPU=1``); a no-op context without any."""
    import contextlib

    resources = dict(p.runner.finetune_resources)
    if not resources:
        return contextlib.nullcontext()
    try:
        import dask
    except ImportError:
        from taskvec.errors import TaskvecError

        raise TaskvecError("runner.finetune_resources needs Dask (pip install 'prefect-dask==0.3.7')") from None
    return dask.annotate(resources=resources)


def _state_name(future) -> str:
    try:
        return future.state.name
    except Exception:  # noqa: BLE001
        return "?"


@flow(name="edit", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def edit(params_file: str = "params.yaml", register_model: bool = True, dvc_sync: bool | None = None, finetune_concurrency: int = 2, overrides: list[str] | None = None) -> dict:
    """Run the whole edit chain described by ``params_file`` (+ ``-S`` overrides); returns the registered version and metrics."""
    from pipeline.ops import tracking

    logger = get_run_logger()
    started = time.perf_counter()
    overrides = list(overrides or [])
    params_file = str(Path(effective_params(params_file, overrides)).resolve())
    p = P.load(params_file)
    validate_tasks(p, p.finetune.tasks + p.edit.eval_tasks())  # every task's data, before any training
    if Path(params_file).name != P.DEFAULT_PARAMS:
        dvc_sync = False
        logger.info("not committing to DVC: %s", "run with -S overrides" if overrides else f"{Path(params_file).name} is not the dvc.yaml's {P.DEFAULT_PARAMS}")
    root = p.root
    os.chdir(root)  # vector recipes record paths relative to the project root, as under `dvc repro`
    storage = result_storage(root)
    flow_run_id = _flow_run_id()
    tracker = tracking.Tracker(p)
    logger.info("MLflow: %s (experiment %s)", tracker.safe_uri, p.mlflow.experiment)
    swept = tracker.sweep_orphans()  # runs a killed flow left RUNNING -> FAILED
    if swept:
        logger.warning("marked %d orphaned MLflow run(s) of killed flows FAILED: %s", len(swept), ", ".join(swept))
    parent = tracker.start("edit", tags={"taskvec.runner": "prefect", "prefect.flow_run_id": str(flow_run_id), "taskvec.params_sha256": P.params_hash(params_file), **({"taskvec.overrides": "\n".join(overrides)} if overrides else {})})
    timings: dict[str, float] = {}
    status = "FAILED"
    try:
        from pipeline.steps.register import pipeline_params

        tracking.StepRun(tracker, parent).params(pipeline_params(p))
        t0 = time.perf_counter()
        base_hash = P.base_hash(p)
        digests = P.data_digests(p, list(dict.fromkeys(p.finetune.tasks + p.edit.eval_tasks())))
        timings["hash_inputs"] = time.perf_counter() - t0
        plan = p.edit
        dump = p.model_dump(mode="json")
        conc = max(1, min(finetune_concurrency, len(p.finetune.tasks)))

        # -- fine-tune ∥ then extract (each extract waits only for its own fine-tune)
        ft_futures, ft_args = {}, {}
        for t in p.finetune.tasks:
            inputs = {"task": t, "base": p.base, "base_hash": base_hash, "data": {k: v for k, v in digests.items() if k.startswith(f"{t}/")}, "spec": dump["tasks"][t], "train": dump["train"]}
            earlier = list(ft_futures.values())
            wait = [earlier[-conc]] if len(earlier) >= conc else []  # at most `conc` fine-tunes at once
            ft_args[t] = (params_file, t, inputs, parent)
            with finetune_placement(p):
                ft_futures[t] = _opts(finetune_task, storage, P.finetuned_dir(p, t)).submit(*ft_args[t], wait_for=wait)
        t0 = time.perf_counter()
        states: dict[str, str] = {}
        ft_results = {}
        for t, f in ft_futures.items():
            ft_results[t], states[f"finetune/{t}"] = _verified(p, storage, finetune_task, "finetune", t, f, ft_args[t], logger)
        vec_futures, vec_args = {}, {}
        for t, ft in ft_results.items():
            inputs = {"task": t, "base_hash": base_hash, "finetuned_hash": ft["content_hash"], "extract": dump["extract"], "base": p.base}
            vec_args[t] = (params_file, t, inputs, parent)
            vec_futures[t] = _opts(extract_task, storage, P.vector_path(p, t)).submit(*vec_args[t])
        vectors = {}
        for t, f in vec_futures.items():
            vectors[t], states[f"extract/{t}"] = _verified(p, storage, extract_task, "extract", t, f, vec_args[t], logger)
        timings["finetune_extract"] = time.perf_counter() - t0

        # -- compose → search → evaluate
        t0 = time.perf_counter()
        inputs = {"vectors": [(t, s, vectors[t]["sha256"]) for t, s in plan.signed_tasks()], "edit": dump["edit"], "recipe_sha256": recipe_sha256(p)}
        args = (params_file, inputs, parent)
        fut = _opts(compose_task, storage, [P.edit_dir(p) / "vector.safetensors", P.edit_dir(p) / "compose.json"]).submit(*args)
        composed, states["compose"] = _verified(p, storage, compose_task, "compose", None, fut, args, logger)
        timings["compose"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        eval_digests = {k: v for k, v in digests.items() if k.split("/")[0] in plan.eval_tasks()}
        ft_hashes = {t: r["content_hash"] for t, r in ft_results.items() if t in plan.target_tasks()}
        inputs = {"vector_sha256": composed["sha256"], "base_hash": base_hash, "finetuned": ft_hashes, "search": dump["search"], "eval": dump["eval"], "edit": dump["edit"], "data": eval_digests, "tasks": {t: dump["tasks"][t] for t in plan.eval_tasks()}}
        args = (params_file, inputs, parent)
        fut = _opts(search_task, storage, P.search_dir(p) / "best.json").submit(*args)
        best, states["search"] = _verified(p, storage, search_task, "search", None, fut, args, logger)
        timings["search"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        inputs = {**inputs, "lambda": best["lambda"], "vectors": [(t, s, vectors[t]["sha256"]) for t, s in plan.signed_tasks()]}
        args = (params_file, inputs, parent)
        fut = _opts(evaluate_task, storage, [P.model_dir(p) / "taskvec.json", P.metrics_dir(p) / "evaluate.json"]).submit(*args)
        evaluated, states["evaluate"] = _verified(p, storage, evaluate_task, "evaluate", None, fut, args, logger)
        timings["evaluate"] = time.perf_counter() - t0

        # -- DVC: record what the flow produced in dvc.lock and push it to the remote
        t0 = time.perf_counter()
        dvc_report = dvc_commit_push(p, enabled=dvc_sync, targets=["evaluate"], push=False, logger=logger)
        timings["dvc"] = time.perf_counter() - t0

        registered = None
        if register_model:
            t0 = time.perf_counter()
            rec = P.registry_dir(p) / "registered.json"
            reg_inputs = {"output_hash": evaluated["output_hash"], "params_sha256": P.params_hash(params_file), "mlflow": dump["mlflow"], "register": dump["register"], "tracking_uri": tracking.redact(tracker.uri)}
            opts = _opts(register_task, storage, rec)
            if rec.exists() and not _version_exists(tracker, rec):
                opts = opts.with_options(refresh_cache=True)
            args = (params_file, reg_inputs, parent, flow_run_id)
            fut = opts.submit(*args)
            registered, states["register"] = _verified(p, storage, register_task, "register", None, fut, args, logger)
            timings["register"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dvc_report["final"] = dvc_commit_push(p, enabled=dvc_sync, targets=["register"] if register_model else ["evaluate"], push=p.dvc.push, logger=logger)
        timings["dvc"] += time.perf_counter() - t0

        _log_cached(tracker, parent, states)
        run = tracking.StepRun(tracker, parent)
        metrics = _read_metrics(p)
        run.metrics(metrics["summary"])
        run.metrics({f"time.{k}": v for k, v in timings.items()})
        run.tags({"taskvec.output_hash": evaluated["output_hash"], **({"taskvec.registered": f"{registered['model']}/{registered['version']}"} if registered else {})})
        summary = {
            "flow_run_id": flow_run_id,
            "mlflow_run_id": parent,
            "tracking_uri": tracker.safe_uri,
            "model_dir": str(P.model_dir(p)),
            "params_file": params_file,
            "overrides": overrides,
            "output_hash": evaluated["output_hash"],
            "lambda": best["lambda"],
            "metrics": metrics,
            "registered": registered,
            "states": states,
            "timings": timings,
            "step_seconds": {**{f"finetune/{t}": r.get("step_seconds", 0.0) for t, r in ft_results.items()}, **{f"extract/{t}": r.get("step_seconds", 0.0) for t, r in vectors.items()}, "compose": composed.get("step_seconds", 0.0), "search": best.get("step_seconds", 0.0), "evaluate": evaluated.get("step_seconds", 0.0), **({"register": registered.get("step_seconds", 0.0)} if registered else {})},
            "mlflow_seconds": round(tracking.LOCK.seconds, 3),
            "dvc": dvc_report,
            "seconds": round(time.perf_counter() - started, 2),
        }
        publish_artifacts(p, summary, evaluated["ledger"])
        status = "FINISHED"
        return summary
    except BaseException as exc:
        if not isinstance(exc, Exception):  # SIGTERM (Prefect's TerminationSignal), Ctrl-C: kill the fine-tunes
            from pipeline.ops.services import stop_children  # now, or unwinding waits for them to finish

            stop_children()
        raise
    finally:
        tracker.end(parent, status)


def _version_exists(tracker, rec: Path) -> bool:
    import json

    try:
        info = json.loads(rec.read_text())
        mv = tracker.client.get_model_version(info["model"], info["version"])
        return (mv.tags or {}).get("taskvec.output_hash") == info.get("output_hash")
    except Exception:  # noqa: BLE001 - another store, deleted version...
        return False


def _read_metrics(p) -> dict:
    import json

    from pipeline.steps.evaluate import METRICS

    return json.loads((P.metrics_dir(p) / METRICS).read_text())


def _log_cached(tracker, parent: str, states: dict[str, str]) -> None:
    """Cached steps get no run of their own: the flow's run lists them (tag ``taskvec.cached_steps``)."""
    cached = [k for k, v in states.items() if v == "Cached"]
    if cached:
        from pipeline.ops import tracking

        tracking.StepRun(tracker, parent).tags({"taskvec.cached_steps": ",".join(cached)})


def dvc_commit_push(p, *, enabled: bool | None, targets: list[str], push: bool, logger=None) -> dict:
    """``dvc commit -f -d TARGETS`` (record the flow's outputs in dvc.lock and the cache), then ``dvc push``.

    Before registering, the flow commits up to ``evaluate`` so the registry
    tags see the dvc.lock hashes of the model's inputs; after it, ``register``
    too, and pushes.

    Skipped, with a note, outside a DVC project or when disabled.
    """
    import subprocess
    import sys

    if enabled is False or (enabled is None and not p.dvc.commit):
        return {"skipped": "disabled"}
    if not (p.root / "dvc.yaml").is_file() or not (p.root / ".dvc").is_dir():
        return {"skipped": "not a DVC project"}
    dvc = [sys.executable, "-m", "dvc"]
    report: dict = {}
    proc = subprocess.run([*dvc, "commit", "--force", "--with-deps", *targets], cwd=p.root, capture_output=True, text=True)
    report["commit"] = proc.returncode
    if proc.returncode != 0:
        if logger:
            logger.warning("dvc commit failed: %s", (proc.stderr.strip() or proc.stdout.strip())[-500:])
        report["commit_error"] = (proc.stderr.strip() or proc.stdout.strip())[-500:]
        return report
    if push:
        cmd = [*dvc, "push", "--quiet"] + (["--remote", p.dvc.remote] if p.dvc.remote else [])
        proc = subprocess.run(cmd, cwd=p.root, capture_output=True, text=True)
        report["push"] = proc.returncode
        if proc.returncode != 0:
            report["push_error"] = proc.stderr.strip()[-500:]
            if logger:
                logger.warning("dvc push failed: %s", proc.stderr.strip()[-500:])
    return report


def publish_artifacts(p, summary: dict, ledger: dict) -> None:
    """Prefect markdown + table artifacts summarising the edit."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.steps.evaluate import _edit_lines, results_markdown
    from pipeline.ops.tracking import redact

    metrics = summary["metrics"]
    reg = summary["registered"]
    plan = p.edit
    md = "\n".join([
        f"# taskvec edit of `{ledger['base_model']}`",
        "",
        f"learn **{', '.join(plan.learn) or '–'}**, forget **{', '.join(plan.forget) or '–'}**, analogies **{len(plan.analogies)}**, "
        f"controls **{', '.join(plan.control) or '–'}**, method **{plan.method}**, λ = **{summary['lambda']:g}**",
        "",
        "## Results (test split)",
        results_markdown(metrics),
        "",
        "## Edit ledger",
        f"base hash `{ledger['base_hash']}` → output hash `{ledger['output_hash']}`",
        "",
        *_edit_lines(ledger),
        "",
        "## Registry",
        (f"`{reg['model']}` version **{reg['version']}** (alias `{reg['alias']}`), run `{reg.get('run_id', '–')}`, tracking `{redact(summary['tracking_uri'])}`" if reg else "not registered"),
        "",
        "## Steps",
        "| step | state |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in summary["states"].items()],
    ])
    create_markdown_artifact(md, key="edit-summary", description="taskvec edit: ledger, results and registry version")
    rows = [{"task": t, "role": r["role"], "base": round(r["base"], 4), "finetuned": round(r["finetuned"], 4) if "finetuned" in r else None, "edited": round(r["edited"], 4)} for t, r in metrics["tasks"].items()]
    create_table_artifact(rows, key="edit-results", description="test accuracy: base (zero-shot), fine-tuned, edited")


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(edit(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"), indent=2, default=str))
