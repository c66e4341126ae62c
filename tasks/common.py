"""Shared plumbing of the Prefect tasks: cache keys on content hashes, retries, MLflow step runs.

Every task takes ``inputs``: a JSON-able dict of the content hashes (and
parameter slices) its step reads. The cache key is the sha256 of the task
name, ``inputs`` and the source of the code the step runs (derived by :mod:`pipeline.deps`
from the entry point's imports; the same files are ``dvc.yaml``'s code deps), so an unchanged step is a cache
hit and a changed input, parameter or code file recomputes it. The flow
passes ``refresh_cache=True`` when a step's output is missing on disk.

Results (small dicts of paths and hashes, never tensors) are persisted under
``outputs/.prefect`` (see :func:`result_storage`), so the cache lives and
dies with the outputs it describes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path

from taskvec.errors import TaskvecError

ROOT = Path(__file__).resolve().parent.parent


def code_hash(step: str) -> str:
    """sha256 of the code the step runs: its entry point's derived import closure (:mod:`pipeline.deps`)."""
    from pipeline.deps import code_hash as derived

    return derived(step, ROOT)


def cache_key(context, parameters: dict) -> str:
    """Prefect ``cache_key_fn``: sha256(step, inputs, code)."""
    step = context.task.name
    body = json.dumps({"step": step, "inputs": parameters.get("inputs"), "code": code_hash(step)}, sort_keys=True, default=str)
    return f"taskvec-{step}-{hashlib.sha256(body.encode()).hexdigest()}"


def transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is a user error (TaskvecError)."""
    try:
        state.result(raise_on_failure=True)
    except TaskvecError:
        return False
    except Exception:  # noqa: BLE001 - anything else (I/O, a killed subprocess, a locked DB) may pass
        return True
    return True


def step_task(step: str, log: Callable | None = None, *, retries: int = 1, retry_delay_seconds: float = 2):
    """Decorator: ``fn`` (``params_file``, [``task_name``,] ``inputs``, ``parent_run_id``, … -> result dict) as the Prefect task of ``step``.

    The task is retried unless the failure is a user error (:func:`transient`),
    cached on :func:`cache_key` with its result persisted, and named
    ``step-<task_name>`` when it runs per task. Its result gets
    ``step_seconds`` and ``outputs_sha256`` (:func:`with_outputs_hash`); with
    a ``parent_run_id``, ``log(run, result, inputs, task_name)`` records it in
    a nested MLflow run of the flow's run (``step`` or ``step/<task_name>``).
    """
    from prefect import task

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        per_task = "task_name" in signature.parameters

        @functools.wraps(fn)
        def run(*args, **kwargs) -> dict:
            a = signature.bind(*args, **kwargs).arguments
            task_name, parent = a.get("task_name"), a.get("parent_run_id")
            t0 = time.perf_counter()
            result = with_outputs_hash(fn(*args, **kwargs), a["params_file"], step, task_name)
            result["step_seconds"] = round(time.perf_counter() - t0, 3)
            if log is not None and parent:
                name = f"{step}/{task_name}" if per_task else step
                with tracker_for(a["params_file"]).run(name, parent=parent, tags=step_tags(step, a["inputs"]), seconds=result["step_seconds"]) as mlrun:
                    log(mlrun, result, a["inputs"], task_name)
            return result

        naming = {"task_run_name": f"{step}-{{task_name}}"} if per_task else {}
        return task(name=step, retries=retries, retry_delay_seconds=retry_delay_seconds, retry_condition_fn=transient, cache_key_fn=cache_key, persist_result=True, **naming)(run)

    return decorate


def result_storage(root: str | Path) -> Path:
    path = Path(root) / "outputs" / ".prefect"
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracker_for(params_file: str):
    """A :class:`pipeline.ops.tracking.Tracker` for the params file (None when tracking is off)."""
    from pipeline import params as P
    from pipeline.ops import tracking

    return tracking.Tracker(P.load(params_file))


def step_tags(step: str, inputs: dict) -> dict[str, str]:
    from pipeline.ops.services import executor

    return {"taskvec.step": step, "taskvec.worker": executor(), "taskvec.cache_key_inputs": hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()}


# ---------------------------------------------------------------------------
# Cache coherence: a cached result is only used while the outputs on disk are
# the very bytes it recorded (see flows/edit.py, `_verified`).


def step_outputs(p, step: str, task: str | None = None) -> list[Path]:
    """The files/folders a step writes (its DVC outs), whose bytes its cached result vouches for."""
    from pipeline import params as P

    return {
        "finetune": lambda: [P.finetuned_dir(p, task)],
        "extract": lambda: [P.vector_path(p, task)],
        "compose": lambda: [P.edit_dir(p)],
        "search": lambda: [P.search_dir(p)],
        "evaluate": lambda: [P.model_dir(p), P.metrics_dir(p)],
        "register": lambda: [P.registry_dir(p)],
    }[step]()


def outputs_hash(root: str | Path, paths: list[Path]) -> str | None:
    """sha256 over (path relative to ``root``, file sha256) of every file under ``paths``; None if one is missing.

    File hashes come from taskvec's hash cache (keyed by path, size, mtime,
    inode), so re-checking unchanged outputs costs a few ``stat`` calls.
    """
    from taskvec.io import file_sha256

    root = Path(root).resolve()
    h = hashlib.sha256()
    for base in paths:
        base = Path(base)
        if not base.exists():
            return None
        files = sorted(f for f in ([base] if base.is_file() else base.rglob("*")) if f.is_file())
        for f in files:
            h.update(f"{f.resolve().relative_to(root).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def with_outputs_hash(result: dict, params_file: str, step: str, task: str | None = None) -> dict:
    """``result`` plus ``outputs_sha256``: the hash of the outputs this run just wrote (what a cache hit must find)."""
    from pipeline import params as P

    p = P.load(params_file)
    result["outputs_sha256"] = outputs_hash(p.root, step_outputs(p, step, task))
    return result
