"""Prefect task: extract one task vector (``pipeline.steps.extract``)."""

from __future__ import annotations

import time

from prefect import task

from pipeline.steps import extract
from tasks.common import cache_key, step_tags, tracker_for, transient, with_outputs_hash


@task(name="extract", retries=1, retry_delay_seconds=2, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True, task_run_name="extract-{task_name}")
def extract_task(params_file: str, task_name: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    t0 = time.perf_counter()
    result = with_outputs_hash(extract.main(params_file, task=task_name), params_file, "extract", task_name)
    result["step_seconds"] = round(time.perf_counter() - t0, 3)
    if parent_run_id:
        with tracker_for(params_file).run(f"extract/{task_name}", parent=parent_run_id, tags=step_tags("extract", inputs), seconds=result["step_seconds"]) as run:
            run.params({"task": task_name, "finetuned_hash": inputs.get("finetuned_hash"), "include": inputs.get("extract", {}).get("include"), "exclude": inputs.get("extract", {}).get("exclude")})
            run.metrics({"param_count": result["param_count"], "tensors": result["tensors"]})
            run.tags({"taskvec.vector_sha256": result["sha256"], "taskvec.base_hash": result["base_hash"]})
    return result
