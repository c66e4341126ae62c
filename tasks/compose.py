"""Prefect task: compose the edit vector (``pipeline.steps.compose``)."""

from __future__ import annotations

import time

from prefect import task

from pipeline.steps import compose
from tasks.common import cache_key, step_tags, tracker_for, transient, with_outputs_hash


@task(name="compose", retries=1, retry_delay_seconds=2, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True)
def compose_task(params_file: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    t0 = time.perf_counter()
    result = with_outputs_hash(compose.main(params_file), params_file, "compose")
    result["step_seconds"] = round(time.perf_counter() - t0, 3)
    if parent_run_id:
        with tracker_for(params_file).run("compose", parent=parent_run_id, tags=step_tags("compose", inputs), seconds=result["step_seconds"]) as run:
            run.params({"edit": inputs.get("edit"), "inputs": [f"{i['task']}:{i['sign']:+g}:{i['sha256']}" for i in result["inputs"]]})
            run.tags({"taskvec.vector_sha256": result["sha256"]})
            run.artifact(result["record"], "edit")
    return result
