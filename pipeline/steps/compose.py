"""Step 3 — compose: the edit plan's vectors merged into ``outputs/edit/vector.safetensors``.

``merge(+τ_learn…, −τ_forget…, +τ_c +τ_b −τ_a per analogy)`` by the plan's
method (sum / ties / dare / dare_ties / magnitude); ``outputs/edit/compose.json``
records the ordered inputs (task, vector sha256, sign) and the merge options.
The λ search then scales this one vector.

    python -m pipeline.steps.compose --params params.yaml
"""

from __future__ import annotations

import json
import os
import sys

from pipeline import params as P
from pipeline.portable import rel
from taskvec.errors import TaskvecError

VECTOR = "vector.safetensors"
RECORD = "compose.json"


def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS) -> dict:
    from taskvec.engine import combine
    from taskvec.io import atomic_path
    from taskvec.vector import VectorFile

    p = P.load(params_file)
    signed = p.edit.signed_tasks()
    inputs = []
    for task, sign in signed:
        path = P.vector_path(p, task)
        if not path.is_file():
            raise TaskvecError(f"task vector of {task} not found: {path} (run the extract step first)")
        with VectorFile(path) as vf:
            inputs.append({"task": task, "path": rel(p, path), "sha256": vf.sha256, "sign": sign})
    options = p.edit.merge_options()
    out_dir = P.edit_dir(p)
    res = combine([(p.root / i["path"], i["sign"]) for i in inputs], out_dir / VECTOR, options=options)
    record = {
        "vector": rel(p, res.path),
        "sha256": res.sha256,
        "base_model": p.base,
        "base_hash": res.base_hash,
        "inputs": inputs,
        "options": options.record(),
        "param_count": res.param_count,
    }
    with atomic_path(out_dir / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {"step": "compose", "path": str(res.path), "sha256": res.sha256, "record": str(out_dir / RECORD), "inputs": inputs, "options": options.record()}


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0])
