"""Prefect task: apply the edit and evaluate it (``pipeline.steps.evaluate``); logs the results table and plot."""

from __future__ import annotations

import time

import json
import tempfile
from pathlib import Path

from prefect import task

from pipeline.steps import evaluate
from tasks.common import cache_key, step_tags, tracker_for, transient, with_outputs_hash


@task(name="evaluate", retries=1, retry_delay_seconds=2, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True)
def evaluate_task(params_file: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    t0 = time.perf_counter()
    result = with_outputs_hash(evaluate.main(params_file), params_file, "evaluate")
    result["step_seconds"] = round(time.perf_counter() - t0, 3)
    if parent_run_id:
        from pipeline.ops import tracking

        metrics = json.loads(Path(result["metrics"]).read_text())
        with tracker_for(params_file).run("evaluate", parent=parent_run_id, tags=step_tags("evaluate", inputs), seconds=result["step_seconds"]) as run:
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
    return result
