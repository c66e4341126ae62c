"""mergekit recipes (``taskvec merge --config``): parsing, refusals, hand-computed arithmetic, CLI parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taskvec import algebra, engine
from taskvec.engine import MergeOptions
from taskvec.errors import TaskvecError
from taskvec.recipes import ModelEntry, Recipe, combine, parse_recipe, sparsify
from tests.test_engine import run_cli, weights


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def recipe(method: str, entries: list[tuple[float, float]], **kw) -> Recipe:
    defaults = {"ties": (True, False), "task_arithmetic": (False, False), "dare_linear": (False, True), "breadcrumbs": (False, False)}[method]
    return Recipe(method=method, base_model="b", models=[ModelEntry(f"m{i}", w, d) for i, (w, d) in enumerate(entries)],
                  normalize=kw.pop("normalize", defaults[0]), rescale=kw.pop("rescale", defaults[1]), **kw)


# ---------------------------------------------------------------------------
# the top-k count: ⌊k·n⌋ (at least one), as mergekit and the TIES code


def test_topk_count_is_floor_with_at_least_one():
    assert algebra.topk_count(10, 0.25) == 2  # ceil would keep 3
    assert algebra.topk_count(3, 0.5) == 1  # ceil would keep 2
    assert algebra.topk_count(100, 0.29) == 28  # 0.29 * 100 = 28.999999999999996 in binary, as int() in mergekit
    assert algebra.topk_count(5, 0.01) == 1  # never empty
    assert algebra.topk_count(7, 1.0) == 7


def test_ties_hand_computed_with_floor_count():
    # density 0.5 of 3 entries -> k = 1 per vector:
    #   τ1 [3,-1,.5] -> [3,0,0];  τ2 [-1,2,1] -> [0,2,0];  τ3 [-4,1,0] -> [-4,0,0]
    #   elect: sum [-1,2,0] -> [-,+,0];  disjoint mean [-4, 2, 0]
    # (with ceil, k = 2, this would be [-2.5, 1.5, 0])
    taus = [t(3.0, -1.0, 0.5), t(-1.0, 2.0, 1.0), t(-4.0, 1.0, 0.0)]
    assert torch.equal(algebra.ties(taus, [1, 1, 1], 0.5), t(-4.0, 2.0, 0.0))
    assert torch.equal(algebra.magnitude_prune(t(1.0, -3.0, 2.0, -0.5, 0.25), 0.5), t(0.0, -3.0, 2.0, 0.0, 0.0))


# ---------------------------------------------------------------------------
# mergekit's arithmetic, per tensor


def test_recipe_ties_weighted_mean_over_agreeing_weights():
    # deltas, density 0.5 (k = 2 of 4): d1 [3,-1,.5,-2] -> [3,0,0,-2]; d2 [-1,2,1,-3] -> [0,2,0,-3]
    # weights 2, 1: [6,0,0,-4], [0,2,0,-3]; sum [6,2,0,-7] elects [+,+,+,-] (a zero sum elects +)
    # agreeing mass [6, 2, 0, -7]; divisor = agreeing weights [2, 1, 0->1, 3]
    r = recipe("ties", [(2.0, 0.5), (1.0, 0.5)])
    out = combine(r, "w", [t(3.0, -1.0, 0.5, -2.0), t(-1.0, 2.0, 1.0, -3.0)])
    assert torch.equal(out, torch.stack([t(6.0) / 2, t(2.0), t(0.0), t(-7.0) / 3]).reshape(-1))
    # lambda scales after normalising; normalize false leaves the weighted sum
    assert torch.equal(combine(recipe("ties", [(2.0, 0.5), (1.0, 0.5)], lam=0.5), "w", [t(3.0, -1.0, 0.5, -2.0), t(-1.0, 2.0, 1.0, -3.0)]), torch.stack([t(3.0) * 0.5, t(1.0), t(0.0), t(-7.0) / 3 * 0.5]).reshape(-1))
    assert torch.equal(combine(recipe("ties", [(2.0, 0.5), (1.0, 0.5)], normalize=False), "w", [t(3.0, -1.0, 0.5, -2.0), t(-1.0, 2.0, 1.0, -3.0)]), t(6.0, 2.0, 0.0, -7.0))


def test_recipe_ties_zero_sum_elects_plus_unlike_the_cli():
    r = recipe("ties", [(1.0, 1.0), (1.0, 1.0)])
    assert torch.equal(combine(r, "w", [t(1.0, 2.0), t(-1.0, 1.0)]), t(1.0, 1.5))
    assert torch.equal(algebra.ties([t(1.0, 2.0), t(-1.0, 1.0)], [1, 1], 1.0), t(0.0, 1.5))  # taskvec's rule: sign 0 -> 0


def test_recipe_task_arithmetic_normalize_and_lambda():
    assert torch.equal(combine(recipe("task_arithmetic", [(0.5, 1.0), (1.5, 1.0)], lam=2.0), "w", [t(2.0), t(4.0)]), t(14.0))
    assert torch.equal(combine(recipe("task_arithmetic", [(0.5, 1.0), (1.5, 1.0)], normalize=True, lam=2.0), "w", [t(2.0), t(4.0)]), t(7.0))  # (1+6)/2*2


def test_breadcrumbs_drops_outliers_then_smallest():
    # n = 10, density 0.5 -> keep 5; gamma 0.1 -> drop the 1 largest; so drop the 4 smallest
    d = t(5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.1, -0.05, 0.01, 0.0)
    kept = sparsify(d, ModelEntry("m", 1.0, 0.5, 0.1), "magnitude_outliers", False, 0)
    assert torch.equal(kept, t(0.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0))


def test_dare_recipe_mask_is_the_cli_mask_and_rescale_is_l1():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(64, 8, generator=gen)
    seed = algebra.tensor_seed(7, 0, "w")
    plain = sparsify(d, ModelEntry("m", 1.0, 0.7), "random", False, seed)
    cli = algebra.dare(d, 0.3, seed)  # same generator and seed: the same entries survive (scaled by 1/0.7)
    assert torch.equal(plain != 0, cli != 0)
    assert torch.equal(plain, torch.where(cli != 0, d, torch.zeros(())))
    l1 = sparsify(d, ModelEntry("m", 1.0, 0.7), "random", True, seed)
    assert torch.allclose(l1.abs().sum(), d.abs().sum(), rtol=1e-5)
    assert torch.equal(l1 != 0, plain != 0)


# ---------------------------------------------------------------------------
# parsing and refusals


GOOD = {"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.5, "lambda": 0.8}, "models": [{"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 0.5, "density": 0.3}}], "dtype": "float32"}


def test_parse_global_defaults_and_per_model_overrides():
    r = parse_recipe(GOOD)
    assert (r.method, r.base_model, r.normalize, r.rescale, r.lam) == ("ties", "b", True, False, 0.8)
    assert [(m.model, m.weight, m.density) for m in r.models] == [("m1", 1.0, 0.5), ("m2", 0.5, 0.3)]
    # the base may be listed among the models (mergekit allows it): it is not merged with itself
    r = parse_recipe({**GOOD, "models": [{"model": "b"}] + GOOD["models"]})
    assert [m.model for m in r.models] == ["m1", "m2"]
    assert parse_recipe({**GOOD, "merge_method": "dare_ties"}).rescale is True
    assert parse_recipe({**GOOD, "merge_method": "dare_ties"}).normalize is False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "slerp"}, "merge_method 'slerp' is not supported"),
        ({"slices": []}, "'slices': layer slices are not supported"),
        ({"tokenizer": {}}, "tokenizer surgery is not supported"),
        ({"mystery": 1}, "unknown key 'mystery'"),
        ({"parameters": {"density": [0.2, 0.8]}}, "gradients and filtered values are not supported"),
        ({"parameters": {"density": {"filter": "mlp", "value": 0.5}}}, "gradients and filtered values are not supported"),
        ({"parameters": {"epsilon": 0.1}}, "unknown parameter 'epsilon' for ties"),
        ({"models": [{"model": "m1", "parameters": {"lambda": 2}}]}, "unknown parameter 'lambda' for ties (per-model: weight, density)"),
        ({"models": [{"model": "m1"}]}, "missing required parameter 'weight'"),
        ({"models": [{"model": "m1+lora", "parameters": {"weight": 1}}]}, "'model+lora' references are not supported"),
        ({"models": [{"model": "m1", "parameters": {"weight": 1, "density": 1.5}}]}, "density must be in [0, 1]"),
        ({"merge_method": "task_arithmetic"}, "density has no effect with task_arithmetic"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"tokenizer_source": "union"}, "tokenizer_source 'union' is not supported"),
        ({"base_model": None}, "ties needs a base_model"),
        ({"parameters": {"normalize": "yes"}}, "parameter 'normalize' must be true or false"),
    ],
)
def test_parse_refusals_are_one_clear_line(change, message):
    with pytest.raises(TaskvecError) as exc:
        parse_recipe({**GOOD, **change}, "r.yml")
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith("r.yml: ")


# ---------------------------------------------------------------------------
# end to end through the CLI


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_equals_the_equivalent_merge_command(tiny_models, tmp_path, capsys):
    base, ft1, ft2 = tiny_models
    cfg = write(tmp_path / "ta.yml", f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    code, out, err = run_cli(capsys, "merge", "--config", cfg, "-o", tmp_path / "r")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", base, f"{ft1}:0.5", f"{ft2}:1", "-o", tmp_path / "c")
    assert code == 0, err
    a, b = weights(tmp_path / "r"), weights(tmp_path / "c")
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embeddings.word_embeddings.weight"], weights(base)["embeddings.word_embeddings.weight"])
    ledger = json.loads((tmp_path / "r" / "taskvec.json").read_text())
    assert ledger["edits"][0]["method"] == "mergekit:task_arithmetic" and ledger["edits"][0]["recipe"] == str(cfg)


def test_ties_recipe_with_unit_weights_equals_merge_method_ties(tiny_models, tmp_path, capsys):
    # same ⌊k·n⌋ count; on these inputs no tie sits at a threshold and no sign sum is exactly 0
    base, ft1, ft2 = tiny_models
    cfg = write(tmp_path / "ties.yml", f"merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.3}}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1}}\n  - model: {ft2}\n    parameters: {{weight: 1}}\n")
    assert run_cli(capsys, "merge", "--config", cfg, "-o", tmp_path / "r")[0] == 0
    assert run_cli(capsys, "merge", base, ft1, ft2, "--method", "ties", "--density", "0.3", "-o", tmp_path / "c")[0] == 0
    a, b = weights(tmp_path / "r"), weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it really trimmed: about 30 % of each tensor moved (the union of two top-30 % sets)
    w0 = weights(base)["encoder.layer.0.attention.self.query.weight"]
    moved = float((a["encoder.layer.0.attention.self.query.weight"] != w0).float().mean())
    assert 0.3 <= moved < 0.6


def test_dare_recipe_is_reproducible_by_seed(tiny_models, tmp_path, capsys):
    base, ft1, ft2 = tiny_models
    cfg = write(tmp_path / "d.yml", f"merge_method: dare_linear\nbase_model: {base}\nparameters: {{density: 0.5, weight: 0.5}}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run_cli(capsys, "merge", "--config", cfg, "--seed", seed, "-o", tmp_path / name)[0] == 0
    a, b, c = (weights(tmp_path / n)["pooler.dense.weight"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "text, extra, message",
    [
        ("merge_method: slerp\nbase_model: B\nmodels:\n  - model: F\n    parameters: {weight: 1}\n", [], "merge_method 'slerp' is not supported"),
        ("merge_method: ties\nbase_model: B\nmodels:\n  - model: F\n    parameters: {weight: 1}\nout_dtype: bfloat16\n", [], "out_dtype bfloat16: taskvec stores the base's dtype (float32)"),
        ("merge_method: ties\nbase_model: B\nmodels:\n  - model: F\n    parameters: {weight: 1}\n", ["--method", "ties"], "--config takes the models, method and parameters from the recipe"),
        ("merge_method: ties\nbase_model: B\nmodels: [\n", [], "not valid YAML"),
    ],
)
def test_cli_refusals_write_nothing(tiny_models, tmp_path, capsys, text, extra, message):
    base, ft1, _ = tiny_models
    cfg = write(tmp_path / "r.yml", text.replace("B", str(base)).replace("F", str(ft1)))
    code, out, err = run_cli(capsys, "merge", "--config", cfg, *extra, "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_merge_without_config_still_needs_base_and_models(tiny_models, tmp_path, capsys):
    base, ft1, _ = tiny_models
    code, _, err = run_cli(capsys, "merge", base, "-o", tmp_path / "out")
    assert code == 2 and "merge needs BASE and at least one FINETUNED" in err
    code, _, err = run_cli(capsys, "merge", base, ft1, "--config", tmp_path / "none.yml", "-o", tmp_path / "out")
    assert code == 2 and "--config takes the models" in err
    code, _, err = run_cli(capsys, "merge", "--config", tmp_path / "none.yml", "-o", tmp_path / "out")
    assert code == 2 and "recipe not found" in err
