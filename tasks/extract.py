"""Prefect task: extract one task vector (``pipeline.steps.extract``)."""

from __future__ import annotations

from pipeline.steps import extract
from tasks.common import step_task


def _track(run, result: dict, inputs: dict, task_name: str) -> None:
    run.params({"task": task_name, "finetuned_hash": inputs.get("finetuned_hash"), "include": inputs.get("extract", {}).get("include"), "exclude": inputs.get("extract", {}).get("exclude")})
    run.metrics({"param_count": result["param_count"], "tensors": result["tensors"]})
    run.tags({"taskvec.vector_sha256": result["sha256"], "taskvec.base_hash": result["base_hash"]})


@step_task("extract", _track)
def extract_task(params_file: str, task_name: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    return extract.main(params_file, task=task_name)
