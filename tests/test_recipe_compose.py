"""The pipeline's compose step with ``edit.recipe`` (a mergekit YAML): same bits as ``taskvec merge --config``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from taskvec.errors import TaskvecError
from tests.conftest_pipeline import make_tiny_encoder, pipeline_env, write_project  # noqa: F401

RECIPE = {
    "merge_method": "ties",
    "base_model": None,  # filled in: the project's base
    "models": [{"model": "senti", "parameters": {"weight": 0.7, "density": 0.3}}, {"model": "topic", "parameters": {"weight": 0.5, "density": 0.5}}],
    "parameters": {"normalize": True, "lambda": 0.9},
    "dtype": "float32",
}


@pytest.fixture
def project(pipeline_env):
    """A tiny project whose two fine-tunes are random perturbations of the base, with their vectors extracted."""
    from pipeline import params as P
    from taskvec.engine import extract

    root = write_project(pipeline_env / "project")
    p = P.load(root / "params.yaml")
    for i, task in enumerate(p.finetune.tasks):
        ft = P.finetuned_dir(p, task)
        make_tiny_encoder(ft, seed=0)
        weights = load_file(ft / "model.safetensors")
        gen = torch.Generator().manual_seed(100 + i)
        from safetensors.torch import save_file

        save_file({k: (v + 0.01 * torch.randn(v.shape, generator=gen)).contiguous() if v.is_floating_point() else v for k, v in weights.items()}, ft / "model.safetensors", metadata={"format": "pt"})
        extract(p.base, ft, P.vector_path(p, task))
    (root / "recipes").mkdir()
    return root


def use_recipe(root, recipe: dict, name: str = "ties.yml", **edit) -> str:
    params = yaml.safe_load((root / "params.yaml").read_text())
    path = root / "recipes" / name
    path.write_text(yaml.safe_dump({**recipe, "base_model": recipe.get("base_model") or params["base"]}, sort_keys=False))
    params["edit"].update({"recipe": f"recipes/{name}", **edit})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return str(root / "params.yaml")


def test_compose_with_a_recipe_equals_taskvec_merge_config(project):
    from pipeline import params as P
    from pipeline.steps import compose
    from taskvec.engine import apply
    from taskvec.io import TensorSource
    from taskvec.recipes import run_recipe

    pf = use_recipe(project, RECIPE)
    p = P.load(pf)
    result = compose.main(pf)
    record = json.loads((P.edit_dir(p) / compose.RECORD).read_text())
    assert record["recipe"]["path"] == "recipes/ties.yml" and record["recipe"]["merge_method"] == "ties"
    assert [(i["task"], i["weight"], i["sign"]) for i in record["inputs"]] == [("senti", 0.7, 1.0), ("topic", 0.5, 1.0)]
    assert record["options"]["method"] == "mergekit:ties" and record["options"]["densities"] == [0.3, 0.5]

    # base + 1·(composed vector) is bit for bit what `taskvec merge --config` makes of the same recipe on the folders
    applied = apply(p.base, [(result["path"], 1.0)], project / "applied")
    folders = {**RECIPE, "base_model": p.base, "models": [{**m, "model": str(P.finetuned_dir(p, m["model"]))} for m in RECIPE["models"]]}
    (project / "direct.yml").write_text(yaml.safe_dump(folders))
    merged = run_recipe(project / "direct.yml", project / "merged")
    assert applied["output_hash"] == merged["output_hash"]
    with TensorSource(project / "applied") as a, TensorSource(p.base) as b:
        assert a.content_hash(use_cache=False) != b.content_hash(use_cache=False)  # the edit did something

    # a different recipe file is a different composed vector (the Prefect cache key has the recipe's sha256)
    from pipeline.recipe import recipe_sha256

    before = recipe_sha256(p)
    use_recipe(project, {**RECIPE, "merge_method": "task_arithmetic", "models": [{"model": "senti", "parameters": {"weight": 0.7}}, {"model": "topic", "parameters": {"weight": 0.5}}], "parameters": {"lambda": 0.9}})
    assert recipe_sha256(P.load(pf)) != before
    assert compose.main(pf)["sha256"] != result["sha256"]


@pytest.mark.parametrize(
    "recipe,edit,message",
    [
        ({**RECIPE, "slices": []}, {}, "'slices': layer slices are not supported"),
        ({**RECIPE, "tokenizer": {}}, {}, "'tokenizer': tokenizer surgery is not supported"),
        ({**RECIPE, "extra": 1}, {}, "unknown key 'extra'"),
        ({**RECIPE, "parameters": {"epsilon": 0.1}}, {}, "unknown parameter 'epsilon' for ties"),
        ({**RECIPE, "merge_method": "slerp"}, {}, "merge_method 'slerp' is not supported"),
        ({**RECIPE, "out_dtype": "float16"}, {}, "out_dtype is not supported in the pipeline"),
        ({**RECIPE, "base_model": "some/other-model"}, {}, "is not the pipeline's base"),
        ({**RECIPE, "models": [{"model": "spam", "parameters": {"weight": 1.0}}]}, {}, "'spam' is not a fine-tuned task"),
        ({**RECIPE, "models": RECIPE["models"][:1]}, {}, "must be exactly edit.learn + edit.forget"),
        ({**RECIPE, "models": [RECIPE["models"][0], {"model": "topic", "parameters": {"weight": -0.5}}]}, {}, "topic is learned (edit.learn), so its weight must be positive"),
    ],
)
def test_compose_refuses_what_the_recipe_cannot_mean_here(project, recipe, edit, message):
    from pipeline.steps import compose

    pf = use_recipe(project, recipe, **edit)
    with pytest.raises(TaskvecError) as err:
        compose.main(pf)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (project / "outputs" / "edit").exists()


def test_recipe_params_refusals_are_one_line(project):
    from pipeline import params as P

    pf = use_recipe(project, RECIPE, method="ties")
    with pytest.raises(TaskvecError, match=r"edit.recipe says how to merge: leave edit.method at its default"):
        P.load(pf)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["edit"].update(method="sum", recipe="../elsewhere.yml")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    from pipeline.steps import compose

    with pytest.raises(TaskvecError, match=r"must be a file under recipes/"):
        compose.main(pf)
    # the step's command line: one `error:` line, exit status 2, nothing written
    proc = subprocess.run([sys.executable, "-m", "pipeline.steps.compose", "--params", pf], cwd=project, capture_output=True, text=True)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: edit.recipe '../elsewhere.yml' must be a file under recipes/"), proc.stderr
    assert not (project / "outputs" / "edit").exists()
