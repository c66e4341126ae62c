"""Prefect task: apply the edit and evaluate it (``pipeline.steps.evaluate``); logs the results table and plot."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.steps import evaluate
from tasks.common import step_task


def _track(run, result: dict, inputs: dict, _task=None) -> None:
    from pipeline.ops import tracking

    metrics = json.loads(Path(result["metrics"]).read_text())
    run.params({"lambda": inputs.get("lambda"), "method": inputs.get("edit", {}).get("method")})
    run.metrics(metrics["summary"])
    run.metrics({f"test.{t}.{k}": v for t, r in metrics["tasks"].items() for k, v in r.items() if isinstance(v, float)})
    run.tags({"taskvec.output_hash": result["output_hash"]})
    run.dict(result["ledger"], "model/taskvec.json")
    run.artifact(result["table"], "results")
    run.artifact(Path(result["path"]) / "README.md", "model")
    run.text(evaluate.results_markdown(metrics), "results/results.md")
    with tempfile.TemporaryDirectory(prefix="taskvec-") as d:
        run.artifact(tracking.plot_accuracy(metrics, Path(d) / "accuracy.png"), "results")
    prov = json.loads((Path(result["metrics"]).parent / "provenance.json").read_text())
    run.datasets(prov["data"], context="test")


@step_task("evaluate", _track)
def evaluate_task(params_file: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    return evaluate.main(params_file)
