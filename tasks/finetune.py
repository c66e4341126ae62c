"""Prefect task: fine-tune one task (``pipeline.steps.finetune``), in a subprocess.

Run as ``python -m pipeline.steps.finetune`` — the very command of the DVC stage —
so that concurrent fine-tunes each have their own torch RNG, deterministic
mode and thread pool. The thread count is the step's own fixed
``pipeline.steps.finetune.THREADS`` — never the machine's or the flow's
concurrency — so ``taskvec run`` and ``dvc repro`` give the same bits. Exit
status 2 is a user error (:class:`TaskvecError`, never retried); anything
else is retried.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import task

from taskvec.errors import TaskvecError
from tasks.common import ROOT, cache_key, step_tags, tracker_for, transient, with_outputs_hash


@task(name="finetune", retries=1, retry_delay_seconds=5, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True, task_run_name="finetune-{task_name}")
def finetune_task(params_file: str, task_name: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="taskvec-ft-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "pipeline.steps.finetune", "--params", str(params_file), "--task", task_name, "--json-out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=Path(params_file).resolve().parent, env=env, capture_output=True, text=True)
        if proc.returncode == 2:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
            raise TaskvecError(lines[-1].removeprefix("error: ") if lines else f"finetune {task_name} failed")
        if proc.returncode != 0:
            raise RuntimeError(f"finetune {task_name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        result = json.loads(out.read_text())
        result["step_seconds"] = round(time.perf_counter() - t0, 3)
    with_outputs_hash(result, params_file, "finetune", task_name)
    if parent_run_id:
        tracker = tracker_for(params_file)
        with tracker.run(f"finetune/{task_name}", parent=parent_run_id, tags=step_tags("finetune", inputs)) as run:
            run.params({"task": task_name, "train": inputs.get("train"), "base_hash": inputs.get("base_hash")})
            run.metrics({"seconds": result["seconds"], "final_loss": result["losses"][-1][1] if result["losses"] else float("nan")})
            run.series("train_loss", [tuple(x) for x in result["losses"]])
            run.tags({"taskvec.content_hash": result["content_hash"]})
            data = result.get("data") or {}
            if data.get("sha256"):
                run.datasets({"train": data}, context="training")
    return result
