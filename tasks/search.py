"""Prefect task: λ search (``pipeline.steps.search``); logs the λ curve (metric history, CSV, PNG)."""

from __future__ import annotations

import time

import csv

from prefect import task

from pipeline.steps import search
from tasks.common import cache_key, step_tags, tracker_for, transient, with_outputs_hash


@task(name="search", retries=1, retry_delay_seconds=2, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True)
def search_task(params_file: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    t0 = time.perf_counter()
    result = with_outputs_hash(search.main(params_file), params_file, "search")
    result["step_seconds"] = round(time.perf_counter() - t0, 3)
    if parent_run_id:
        with tracker_for(params_file).run("search", parent=parent_run_id, tags=step_tags("search", inputs), seconds=result["step_seconds"]) as run:
            run.params({"search": inputs.get("search"), "eval": inputs.get("eval"), "vector_sha256": inputs.get("vector_sha256")})
            run.metrics({"best_lambda": result["lambda"], "best_objective": result["objective"], "evaluations": result["evaluations"], "seconds": result["seconds"]})
            run.metrics({f"val.{t}.edited": a for t, a in result["accuracy"].items()} | {f"val.{t}.base": a for t, a in result["base_accuracy"].items()} | {f"val.{t}.finetuned": a for t, a in result["finetuned_accuracy"].items()})
            with open(result["curve"]) as f:
                rows = list(csv.DictReader(f))
            # the λ curve with λ on the x-axis: MLflow metric steps are integers, so the curve is a table
            # artifact (search/lambda_curve.json, one row per λ: chart it by the `lambda` column in the UI),
            # plus the metric histories (step = grid index) and the param `lambda_grid` giving
            # the λ of each index; curve.png plots it against λ too.
            run.table({k: [float(r[k]) if k != "feasible" else r[k] for r in rows] for k in (rows[0] if rows else {})}, "search/lambda_curve.json")
            run.params({"lambda_grid": [float(r["lambda"]) for r in rows]})
            for i, row in enumerate(rows):
                run.metrics({k.replace("/", "."): float(v) for k, v in row.items() if k != "feasible"}, step=i)
            for key in ("curve", "plot", "best"):
                run.artifact(result[key], "search")
            run.datasets(result["data"], context="validation")
    return result
