"""Prefect task: fine-tune one task (``pipeline.steps.finetune``), in a subprocess.

Run as ``python -m pipeline.steps.finetune`` — the very command of the DVC stage —
so that concurrent fine-tunes each have their own torch RNG, deterministic
mode and thread pool. The thread count is the step's own fixed
``pipeline.steps.finetune.THREADS`` — never the machine's or the flow's
concurrency — so ``taskvec run`` and ``dvc repro`` give the same bits. Exit
status 2 is a user error (:class:`TaskvecError`, never retried); anything
else is retried. The command is wrapped by :mod:`pipeline.ops.child`, so the
fine-tune dies with this process (even on SIGKILL) and prints progress
lines, relayed (throttled) to the flow's log on the console.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.ops.services import child_command
from taskvec.errors import TaskvecError
from tasks.common import ROOT, step_task


PROGRESS_EVERY_S = float(os.environ.get("TASKVEC_PROGRESS_EVERY_S", "10"))


def _log(message: str) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - outside a run context
        import sys

        print(message, file=sys.stderr, flush=True)


def run_child(cmd: list[str], *, cwd, env: dict, label: str) -> tuple[int, str]:
    """Run a fine-tune child; relay its progress lines (at most one per ``PROGRESS_EVERY_S``, plus the last).

    The child is a :func:`pipeline.ops.services.child_command`: it gets SIGKILL
    if this process dies, so a killed ``taskvec run`` leaves no fine-tune
    behind to swap its output into ``outputs/`` later. Returns (exit status,
    stderr without the progress lines).
    """
    from pipeline.ops import services

    if services.STOPPING.is_set():
        raise TaskvecError(f"{label}: not started, the run is stopping")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    services.adopt(proc)
    kept: list[str] = []
    last = 0.0
    pending = None
    try:
        for line in proc.stderr:
            if line.startswith("taskvec-progress "):
                pending = line.removeprefix("taskvec-progress ").strip()
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY_S or pending.endswith("done"):
                    _log(f"{label}: {pending}")
                    last, pending = now, None
            elif "\r" not in line:  # tqdm bars (progress: true) are not worth keeping
                kept.append(line)
                del kept[:-200]
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        services.release(proc)
    if services.STOPPING.is_set():
        raise TaskvecError(f"{label}: stopped (the run was interrupted)")
    return proc.returncode, "".join(kept)


def _track(run, result: dict, inputs: dict, task_name: str) -> None:
    run.params({"task": task_name, "train": inputs.get("train"), "base_hash": inputs.get("base_hash")})
    run.metrics({"seconds": result["seconds"], "final_loss": result["losses"][-1][1] if result["losses"] else float("nan")})
    run.series("train_loss", [tuple(x) for x in result["losses"]])
    run.tags({"taskvec.content_hash": result["content_hash"]})
    data = result.get("data") or {}
    if data.get("sha256"):
        run.datasets({"train": data}, context="training")


@step_task("finetune", _track, retry_delay_seconds=5)
def finetune_task(params_file: str, task_name: str, inputs: dict, parent_run_id: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TASKVEC_FINETUNE_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory(prefix="taskvec-ft-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = child_command("pipeline.steps.finetune", "--params", str(params_file), "--task", task_name, "--json-out", str(out))
        returncode, stderr = run_child(cmd, cwd=Path(params_file).resolve().parent, env=env, label=f"finetune {task_name}")
        if returncode == 2:
            lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
            raise TaskvecError(lines[-1].removeprefix("error: ") if lines else f"finetune {task_name} failed")
        if returncode != 0:
            raise RuntimeError(f"finetune {task_name} exited {returncode}: {stderr.strip()[-2000:]}")
        return json.loads(out.read_text())
