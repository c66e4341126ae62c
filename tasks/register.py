"""Prefect task: register the edited model (``pipeline.steps.register``) as a nested run of the flow's run."""

from __future__ import annotations

from pipeline.steps import register
from tasks.common import step_task


@step_task("register", retries=2, retry_delay_seconds=3)
def register_task(params_file: str, inputs: dict, parent_run_id: str | None = None, flow_run_id: str | None = None) -> dict:
    return register.main(params_file, flow_run_id=flow_run_id, parent_run_id=parent_run_id)
