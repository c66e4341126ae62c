"""Step 1 — fine-tune: ``outputs/finetuned/<task>/`` (encoder in the base's format + frozen head).

Entry point of the ``finetune@<task>`` DVC stage and of the Prefect
``finetune`` task (which runs it in a subprocess, so concurrent fine-tunes
keep their own RNG and thread pools)::

    python -m pipeline.steps.finetune --params params.yaml --task sst2

The torch thread count is part of what determines the weights (reduction
order), so it is fixed here, for every path that runs this entry point
(``dvc repro``, ``taskvec run``'s subprocess, a direct call): ``THREADS``,
whatever the machine's core count, the flow's concurrency or
``OMP_NUM_THREADS``/``TASKVEC_TORCH_THREADS`` say. Changing it changes this
file, hence the DVC stage's deps and the Prefect cache key.
"""

from __future__ import annotations

import os
import sys

from pipeline import params as P
from pipeline.steps import pinned_threads
from taskvec.errors import TaskvecError

#: torch intra-op threads of every fine-tune (see the module docstring)
THREADS = 1


def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS, task: str = "") -> dict:
    """Fine-tune ``task``; returns the output folder, its weights' content hash and the data lineage."""
    from taskvec.io import TensorSource
    from taskvec.train import finetune

    p = P.load(params_file)
    if task not in p.finetune.tasks:
        listed = ", ".join(p.finetune.tasks) or "none"
        raise TaskvecError(f"task {task!r} is not in finetune.tasks ({listed})")
    out = P.finetuned_dir(p, task)
    result = pinned_threads(THREADS)(finetune)(task, p, out, progress=p.finetune.progress)
    with TensorSource(out) as src:
        content_hash = src.content_hash()
    head = out / "heads" / f"{task}.safetensors"
    return {
        "step": "finetune",
        "task": task,
        "path": str(out),
        "content_hash": content_hash,
        "head": str(head) if head.is_file() else None,
        "data": result.manifest.get("data", {}),
        "seconds": round(result.seconds, 2),
        "losses": result.losses,
    }


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0], task=True)
