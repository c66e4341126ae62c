"""Step 6 — register: the edited model as a new MLflow registered-model version (alias ``challenger``).

Logs ``outputs/model`` as the serving pyfunc (:func:`pipeline.ops.registry.register_model`,
the same registration rollback uses; model class in :mod:`pipeline.ops.serving`) —
``register.weights: thin`` (default) logs the ledger, heads and card and stores the
task vectors once in the content-addressed vector store, ``full`` the whole folder —
and registers a version carrying the reproducibility
tags (ledger, git commit, dvc.lock hashes, params hash, dataset digests,
Prefect flow-run id). Writes ``outputs/registry/registered.json``.

Inside the Prefect flow it runs as a nested run of the flow's parent run;
run alone (``dvc repro``'s ``register`` stage) it opens its own parent run
and logs the pipeline's params, metrics, λ curve, results table and dataset
inputs there.

    python -m pipeline.steps.register --params params.yaml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline import params as P
from taskvec.errors import TaskvecError

RECORD = "registered.json"
VOLATILE = ("run_id", "parent_run_id", "model_id", "source")  # per registration: not in the DVC-tracked record


def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS, *, flow_run_id: str | None = None, parent_run_id: str | None = None) -> dict:
    from taskvec.io import atomic_path

    from pipeline.ops import registry, tracking
    from pipeline.ops.services import executor
    from pipeline.portable import uri
    from pipeline.steps.compose import RECORD as COMPOSE_RECORD
    from pipeline.steps.evaluate import METRICS

    p = P.load(params_file)
    model = P.model_dir(p)
    ledger_file = model / "taskvec.json"
    metrics_file = P.metrics_dir(p) / METRICS
    compose_file = P.edit_dir(p) / COMPOSE_RECORD
    for f, step in ((ledger_file, "evaluate"), (metrics_file, "evaluate"), (compose_file, "compose")):
        if not f.is_file():
            raise TaskvecError(f"{f} not found (run the {step} step first)")
    ledger = json.loads(ledger_file.read_text())
    metrics = json.loads(metrics_file.read_text())
    composition = json.loads(compose_file.read_text())
    flow_run_id = flow_run_id or os.environ.get("TASKVEC_FLOW_RUN_ID")
    used = list(dict.fromkeys(p.finetune.tasks + p.edit.eval_tasks()))
    digests = P.data_digests(p, used)
    dvc_hashes, dvc_sha = registry.dvc_lock_hashes(p.root)
    tags = registry.version_tags(
        ledger=ledger,
        composition={"vector_sha256": composition["sha256"], "inputs": [{k: i[k] for k in ("task", "sha256", "sign")} for i in composition["inputs"]], "options": composition["options"], **({"recipe": composition["recipe"]} if composition.get("recipe") else {})},
        git=P.git_commit(p.root),
        dvc_hashes=dvc_hashes,
        dvc_sha=dvc_sha,
        params_sha=P.params_hash(Path(params_file)),
        digests=digests,
        flow_run_id=flow_run_id,
        summary=metrics["summary"],
    )
    thin = p.register.weights == "thin"
    vectors = list(dict.fromkeys(p.root / i["path"] if (p.root / i["path"]).is_file() else P.vector_path(p, i["task"]) for i in composition["inputs"])) if thin or p.register.log_vectors else []
    if composition.get("recipe") and (thin or p.register.log_vectors):  # the ledger applies the composed vector itself
        vectors.append(p.root / composition["vector"])
    if thin or p.register.log_vectors:  # AdaMerging's per-layer-scaled vectors are what the ledger lists
        from pipeline.steps.search_coeffs import scaled_vector_paths

        vectors += scaled_vector_paths(p)
    tracker = tracking.Tracker(p)
    own_parent = parent_run_id is None
    parent = parent_run_id or tracker.start("edit (dvc repro)" if not flow_run_id else "edit", tags={"taskvec.runner": "dvc" if not flow_run_id else "prefect", "prefect.flow_run_id": str(flow_run_id or "none")})
    status = "FAILED"
    try:
        if own_parent:
            log_summary(tracker, parent, p, metrics, digests)
        with tracker.run("register", parent=parent, tags={"taskvec.step": "register", "taskvec.worker": executor()}) as step:
            step.params({"registered_model": p.mlflow.registered_model, "alias": p.register.alias, "weights": p.register.weights, "compress": json.dumps(p.register.compress.model_dump() if p.register.compress else None), "tracking_uri": uri(p, tracker.safe_uri)})
            step.metrics(metrics["summary"])
            result = registry.register(
                tracker, step, model,
                name=p.mlflow.registered_model, alias=p.register.alias, tags=tags, vectors=vectors, description=p.register.description, weights=p.register.weights,
                compress=p.register.compress.model_dump() if p.register.compress else None,
            )
        status = "FINISHED"
    finally:
        if own_parent:
            tracker.end(parent, status)
    result = {"step": "register", **result, "parent_run_id": parent, "output_hash": ledger["output_hash"], "tracking_uri": uri(p, tracker.safe_uri)}
    out = P.registry_dir(p) / RECORD
    with atomic_path(out) as tmp:
        # the registration's MLflow ids (run, parent run, logged model) stay in MLflow and the returned result:
        # this DVC-tracked record holds only what a fresh clone's run writes again byte for byte
        tmp.write_text(json.dumps({k: v for k, v in result.items() if k not in VOLATILE}, indent=2, sort_keys=True) + "\n")
    result["path"] = str(out)
    return result


def log_summary(tracker, parent: str, p: P.PipelineParams, metrics: dict, digests: dict) -> None:
    """Parent-run logging when the steps ran without the flow (DVC): params, metrics, curve, table, inputs."""
    from pipeline.ops import tracking
    from pipeline.portable import rel
    from pipeline.steps.evaluate import TABLE, results_markdown
    from pipeline.steps.search import BEST, CURVE, PLOT

    run = tracking.StepRun(tracker, parent)
    run.params(pipeline_params(p))
    run.metrics(metrics["summary"])
    run.metrics({f"test.{t}.{k}": v for t, r in metrics["tasks"].items() for k, v in r.items() if isinstance(v, float)})
    for f, where in ((P.search_dir(p) / CURVE, "search"), (P.search_dir(p) / PLOT, "search"), (P.search_dir(p) / BEST, "search"), (P.metrics_dir(p) / TABLE, "results")):
        if f.is_file():
            run.artifact(f, where)
    run.text(results_markdown(metrics), "results/results.md")
    with tempfile_dir() as d:
        run.artifact(tracking.plot_accuracy(metrics, Path(d) / "accuracy.png"), "results")
    run.datasets({k: {"task": k.split("/")[0], "split": k.split("/")[1], "sha256": v, "origin": rel(p, P.data_folder(p, k.split("/")[0]) + "/" + k.split("/")[1] + ".csv")} for k, v in digests.items()}, context="pipeline")


def pipeline_params(p: P.PipelineParams) -> dict:
    """The params worth logging (flattened by the tracker)."""
    dump = p.model_dump(mode="json")
    return {
        "base": dump["base"],
        "edit": dump["edit"],
        "train": dump["train"],
        "eval": dump["eval"],
        "search": dump["search"],
        "finetune.tasks": ",".join(p.finetune.tasks),
        "extract": dump["extract"],
    }


class tempfile_dir:
    def __enter__(self) -> str:
        import tempfile

        self._d = tempfile.TemporaryDirectory(prefix="taskvec-")
        return self._d.name

    def __exit__(self, *exc) -> None:
        self._d.cleanup()


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0])
