"""Step 3 — compose: the edit plan's vectors merged into ``outputs/edit/vector.safetensors``.

``merge(+τ_learn…, −τ_forget…, +τ_c +τ_b −τ_a per analogy)`` by the plan's
method (sum / ties / dare / dare_ties / magnitude), or by the mergekit recipe of
``edit.recipe`` (:mod:`pipeline.recipe`); ``outputs/edit/compose.json``
records the ordered inputs (task, vector sha256, sign[, recipe weight]), the merge
options and the recipe's path and sha256. The λ search then scales this one vector.

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

    from pipeline.recipe import load_edit_recipe

    p = P.load(params_file)
    recipe = load_edit_recipe(p)
    if recipe:  # the recipe's models, in its order, with its weights (their signs are the plan's roles)
        from taskvec.recipes import RecipeOptions

        signed, options = recipe.tasks, RecipeOptions(recipe.recipe, seed=p.edit.seed)
    else:
        signed, options = p.edit.signed_tasks(), p.edit.merge_options()
    inputs = []
    for task, weight in signed:
        path = P.vector_path(p, task)
        if not path.is_file():
            raise TaskvecError(f"task vector of {task} not found: {path} (run the extract step first)")
        with VectorFile(path) as vf:
            inputs.append({"task": task, "path": rel(p, path), "sha256": vf.sha256, "sign": weight if not recipe else (1.0 if weight > 0 else -1.0), **({"weight": weight} if recipe else {})})
    out_dir = P.edit_dir(p)
    res = combine([(p.root / i["path"], i.get("weight", i["sign"])) for i in inputs], out_dir / VECTOR, options=options)
    record = {
        **({"recipe": recipe.record()} if recipe else {}),
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
    return {"step": "compose", "path": str(res.path), "sha256": res.sha256, "record": str(out_dir / RECORD), "inputs": inputs, "options": options.record(), **({"recipe": recipe.record()} if recipe else {})}


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0])
