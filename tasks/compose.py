"""Prefect task: compose the edit vector (``pipeline.steps.compose``)."""

from __future__ import annotations

from pipeline.steps import compose
from tasks.common import step_task


def _track(run, result: dict, inputs: dict, _task=None) -> None:
    run.params({"edit": inputs.get("edit"), "inputs": [f"{i['task']}:{i['sign']:+g}:{i['sha256']}" for i in result["inputs"]]})
    run.tags({"taskvec.vector_sha256": result["sha256"]})
    run.artifact(result["record"], "edit")


@step_task("compose", _track)
def compose_task(params_file: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    return compose.main(params_file)
