"""Step 2 — extract: τ_task = θ_ft − θ_base into ``outputs/vectors/<task>.safetensors``.

    python -m pipeline.steps.extract --params params.yaml --task sst2
"""

from __future__ import annotations

import os
import sys

from pipeline import params as P
from taskvec.errors import TaskvecError


def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS, task: str = "") -> dict:
    """Extract the task vector of ``task``; returns its path and sha256 (the vector's identity)."""
    from taskvec.engine import extract

    p = P.load(params_file)
    if task not in p.finetune.tasks:
        raise TaskvecError(f"task {task!r} is not in finetune.tasks ({', '.join(p.finetune.tasks) or 'none'})")
    ft = P.finetuned_dir(p, task)
    if not ft.is_dir():
        raise TaskvecError(f"fine-tuned model of {task} not found: {ft} (run the finetune step first)")
    res = extract(p.base, ft, P.vector_path(p, task), include=p.extract.include, exclude=p.extract.exclude)
    return {
        "step": "extract",
        "task": task,
        "path": str(res.path),
        "sha256": res.sha256,
        "base_hash": res.base_hash,
        "param_count": res.param_count,
        "tensors": res.tensors,
    }


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0], task=True)
