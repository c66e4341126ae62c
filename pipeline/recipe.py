"""``edit.recipe``: the compose step runs a mergekit YAML recipe over the pipeline's task vectors.

A recipe (``taskvec/recipes.py``: ``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties`` with mergekit 0.1.5's semantics)
names the fine-tuned models it merges; in the pipeline each ``models[].model`` is a task
of ``finetune.tasks`` (or its folder, ``outputs/finetuned/<task>``), and ``base_model`` is
the params' ``base``. mergekit's δ_t = θ_t − θ_base is exactly the task's vector τ_t, so
the composed vector is the recipe's merged delta (per-model weights, densities, sign
consensus, ``normalize`` and ``lambda`` included); the λ search then scales it as a whole
(θ = θ₀ + λ·merged) and the ledger records that one vector.

The recipe lives under the project's ``recipes/`` folder, which the compose stage of
``dvc.yaml`` depends on (and its sha256 is part of the compose step's Prefect cache key).
Its models must be exactly the plan's vectors — learned tasks with a positive weight,
forgotten ones with a negative weight, no analogies — and ``edit.method``/``density``/
``drop`` stay at their defaults (the recipe says how to merge). Anything else, and
anything :func:`taskvec.recipes.parse_recipe` refuses, is one ``error:`` line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipeline import params as P
from pipeline.portable import rel
from taskvec.errors import TaskvecError

RECIPES_DIR = "recipes"


@dataclass
class EditRecipe:
    recipe: object  # taskvec.recipes.Recipe
    path: Path
    rel: str
    sha256: str
    tasks: list[tuple[str, float]]  # (task, weight) in the recipe's order

    def record(self) -> dict:
        return {"path": self.rel, "sha256": self.sha256, "merge_method": self.recipe.method}


def recipe_path(p) -> Path | None:
    """The recipe file of ``edit.recipe`` (checked to lie under ``recipes/``), or None."""
    if not p.edit.recipe:
        return None
    folder = (p.root / RECIPES_DIR).resolve()
    path = (p.root / p.edit.recipe).resolve()
    if folder not in path.parents:
        raise TaskvecError(f"edit.recipe {p.edit.recipe!r} must be a file under {RECIPES_DIR}/ (the compose stage of dvc.yaml depends on that folder)")
    if not path.is_file():
        raise TaskvecError(f"edit.recipe: recipe not found: {rel(p, path)}")
    return path


def recipe_sha256(p) -> str | None:
    path = recipe_path(p)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else None


def _task_of(p, ref: str, where: str) -> str:
    if ref in p.finetune.tasks:
        return ref
    for task in p.finetune.tasks:
        if (p.root / ref).resolve() == P.finetuned_dir(p, task).resolve():
            return task
    raise TaskvecError(f"{where}model {ref!r} is not a fine-tuned task of this pipeline (name one of {', '.join(p.finetune.tasks)}, or its folder {P.OUTPUTS}/finetuned/<task>)")


def _same_base(p, ref: str) -> bool:
    if ref == p.base:
        return True
    mine, theirs = Path(p.base), Path(ref)
    return (mine.is_absolute() or (p.root / mine).exists()) and (p.root / theirs).resolve() == (p.root / mine).resolve()


def load_edit_recipe(p) -> EditRecipe | None:
    """The plan's recipe, validated against the pipeline (None when ``edit.recipe`` is not set)."""
    import yaml

    from taskvec.recipes import parse_recipe

    path = recipe_path(p)
    if path is None:
        return None
    source = rel(p, path)
    where = f"{source}: "
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TaskvecError(f"{where}not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    recipe = parse_recipe(data, source)
    if not _same_base(p, recipe.base_model):
        raise TaskvecError(f"{where}base_model {recipe.base_model!r} is not the pipeline's base {p.base!r}")
    if recipe.out_dtype is not None:
        raise TaskvecError(f"{where}out_dtype is not supported in the pipeline (the edited model keeps the base's dtype)")
    tasks = [(_task_of(p, m.model, where), m.weight) for m in recipe.models]
    names = [t for t, _ in tasks]
    if len(set(names)) != len(names):
        raise TaskvecError(f"{where}a task is listed twice among the models")
    plan = p.edit
    if set(names) != set(plan.learn) | set(plan.forget):
        raise TaskvecError(f"{where}the models ({', '.join(names)}) must be exactly edit.learn + edit.forget ({', '.join(plan.learn + plan.forget)})")
    for task, weight in tasks:
        if (weight > 0) != (task in plan.learn):
            role = "learned" if task in plan.learn else "forgotten"
            raise TaskvecError(f"{where}{task} is {role} (edit.{'learn' if task in plan.learn else 'forget'}), so its weight must be {'positive' if task in plan.learn else 'negative'}, got {weight:g}")
    return EditRecipe(recipe, path, source, hashlib.sha256(path.read_bytes()).hexdigest(), tasks)
