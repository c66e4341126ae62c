"""Prefect task: λ search (``pipeline.steps.search``); logs the λ curve (metric history, CSV, PNG)."""

from __future__ import annotations

import csv

from pipeline.steps import search
from tasks.common import step_task


def _track(run, result: dict, inputs: dict, _task=None) -> None:
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


@step_task("search", _track)
def search_task(params_file: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    return search.main(params_file)
