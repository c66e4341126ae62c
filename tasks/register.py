"""Prefect task: register the edited model (``pipeline.steps.register``) as a nested run of the flow's run."""

from __future__ import annotations

import time

from prefect import task

from pipeline.steps import register
from tasks.common import cache_key, transient, with_outputs_hash


@task(name="register", retries=2, retry_delay_seconds=3, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True)
def register_task(params_file: str, inputs: dict, parent_run_id: str | None = None, flow_run_id: str | None = None) -> dict:
    t0 = time.perf_counter()
    result = with_outputs_hash(register.main(params_file, flow_run_id=flow_run_id, parent_run_id=parent_run_id), params_file, "register")
    result["step_seconds"] = round(time.perf_counter() - t0, 3)
    return result
