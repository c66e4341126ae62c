"""mergekit YAML recipes, run by the streaming engine with mergekit's semantics.

``taskvec merge --config recipe.yml -o OUT`` reads a mergekit (0.1.5) merge
configuration for one of the generalized task-arithmetic methods and runs it
through :func:`taskvec.engine.merge` (one streaming pass, float32 arithmetic,
output stored in the base's dtype) with a per-tensor combiner that follows
mergekit's definitions:

* ``δ_t = θ_t − θ_base``; sparsify each δ_t with its own ``density``
  (``ties``: top-k by magnitude, ``k = max(1, ⌊density·numel⌋)`` — the same
  count as ``taskvec --density``; ``breadcrumbs``: drop the ``gamma`` fraction
  of largest magnitudes, then the smallest, keeping ``⌊density·numel⌋``;
  ``dare_*``: keep each entry with probability ``density``); with
  ``rescale`` the kept entries are scaled to the L1 norm of δ_t (mergekit's
  DARE rescale, default on for ``dare_*``).
* multiply by the per-model ``weight``;
* ``*_ties``: elect the sign of ``Σ_t w_t δ_t`` (a zero sum elects ``+``),
  keep the entries that agree; the divisor is the sum of the weights of the
  agreeing models at each entry (of all weights without consensus);
* ``normalize`` (default true for ``ties`` only) divides by that divisor;
  then ``lambda`` scales the merged delta; ``θ = θ_base + λ·merged``.

For the deterministic methods (``task_arithmetic``, ``ties``, ``breadcrumbs``,
``breadcrumbs_ties``) the weights equal mergekit 0.1.5's bit for bit when it
computes in float32 (``dtype: float32`` or float32 checkpoints):
``benchmarks/bench_recipes.py`` checks it against mergekit itself. The DARE
methods draw their keep mask from taskvec's generator, seeded per tensor by
``(--seed, model position, tensor name)`` (:func:`taskvec.algebra.tensor_seed`;
the mask equals ``taskvec --method dare --drop 1−density`` with the same seed),
not from torch's global RNG as mergekit does, so they are reproducible but not
bit-identical to mergekit.

Model references are folders (relative to the working directory, as for
mergekit) or hub ids. Anything else a mergekit config may say (slices, modules, gradients or
filtered parameter values, other merge methods, tokenizer surgery, LoRA
``model+adapter`` references, an ``out_dtype`` other than the base's) is
refused with one line, never ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from taskvec import algebra
from taskvec.errors import TaskvecError

# method -> (sign consensus, sparsification, default normalize, default rescale)
METHODS: dict[str, tuple[bool, str | None, bool, bool]] = {
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
    "breadcrumbs": (False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": (True, "magnitude_outliers", False, False),
}
DETERMINISTIC = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
REFUSED_TOP = {
    "slices": "layer slices are not supported (use models:)",
    "modules": "per-module definitions are not supported (use models:)",
    "tokenizer": "tokenizer surgery is not supported (the base's tokenizer files are copied)",
    "chat_template": "chat_template is not supported (the base's tokenizer files are copied)",
}
SHARED = ("int8_mask", "normalize", "rescale", "lambda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _per_model(method: str) -> tuple[str, ...]:
    return ("weight", "density", "gamma") if METHODS[method][1] == "magnitude_outliers" else ("weight", "density")


@dataclass
class ModelEntry:
    model: str
    weight: float
    density: float = 1.0
    gamma: float = 0.01


@dataclass
class Recipe:
    method: str
    base_model: str
    models: list[ModelEntry]
    normalize: bool
    rescale: bool
    lam: float = 1.0
    int8_mask: bool = False
    dtype: str | None = None
    out_dtype: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def pairs(self) -> list[tuple[str, float]]:
        return [(m.model, m.weight) for m in self.models]


def _where(src: str) -> str:
    return f"{src}: " if src else ""


def _scalar(value, key: str, kind: type, where: str):
    """One scalar parameter value; gradients (lists) and filtered values are refused."""
    if isinstance(value, (list, dict)):
        raise TaskvecError(f"{where}parameter {key!r}: gradients and filtered values are not supported, give one number")
    if kind is bool:
        if not isinstance(value, bool):
            raise TaskvecError(f"{where}parameter {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TaskvecError(f"{where}parameter {key!r} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise TaskvecError(f"{where}parameter {key!r} must be finite, got {value!r}")
    return float(value)


def _model_ref(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TaskvecError(f"{where}a model must be a path or hub id (string), got {value!r}")
    if "+" in value and not Path(value).exists():
        raise TaskvecError(f"{where}model {value!r}: mergekit 'model+lora' references are not supported (extract the adapter with taskvec extract)")
    if "@" in value and not Path(value).exists():
        raise TaskvecError(f"{where}model {value!r}: '@revision' references are not supported")
    return value


def parse_recipe(data, source: str = "") -> Recipe:
    """Validate a mergekit configuration (already loaded from YAML) into a :class:`Recipe`."""
    where = _where(source)
    if not isinstance(data, dict):
        raise TaskvecError(f"{where}a mergekit recipe is a YAML mapping (merge_method, base_model, models…)")
    for key in data:
        if key in REFUSED_TOP:
            raise TaskvecError(f"{where}{key!r}: {REFUSED_TOP[key]}")
        if key not in TOP_KEYS:
            raise TaskvecError(f"{where}unknown key {key!r} (supported: {', '.join(sorted(TOP_KEYS))})")
    method = data.get("merge_method")
    if method not in METHODS:
        raise TaskvecError(f"{where}merge_method {method!r} is not supported: choose one of {', '.join(METHODS)}")
    consensus, sparsify, default_normalize, default_rescale = METHODS[method]
    if not data.get("base_model"):
        raise TaskvecError(f"{where}{method} needs a base_model")
    base = _model_ref(data["base_model"], where)
    per_model = _per_model(method)
    allowed = SHARED + per_model

    glob = data.get("parameters") or {}
    if not isinstance(glob, dict):
        raise TaskvecError(f"{where}parameters must be a mapping")
    for key in glob:
        if key not in allowed:
            raise TaskvecError(f"{where}unknown parameter {key!r} for {method} (allowed: {', '.join(allowed)})")
    shared = {
        "normalize": _scalar(glob.get("normalize", default_normalize), "normalize", bool, where),
        "rescale": _scalar(glob.get("rescale", default_rescale), "rescale", bool, where),
        "int8_mask": _scalar(glob.get("int8_mask", False), "int8_mask", bool, where),
        "lam": algebra.check_lambda(_scalar(glob.get("lambda", 1.0), "lambda", float, where)),
    }

    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise TaskvecError(f"{where}models: give a list of {{model: PATH, parameters: {{weight: …}}}}")
    entries: list[ModelEntry] = []
    for i, item in enumerate(models):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise TaskvecError(f"{where}models[{i}]: each entry is a mapping with a 'model' key")
        extra = set(item) - {"model", "parameters"}
        if extra:
            raise TaskvecError(f"{where}models[{i}]: unknown key {sorted(extra)[0]!r} (supported: model, parameters)")
        ref = _model_ref(item["model"], where)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise TaskvecError(f"{where}models[{i}].parameters must be a mapping")
        if ref == base:  # mergekit lets the base be listed among the models: it is not merged with itself
            continue
        for key in params:
            if key not in per_model:
                raise TaskvecError(f"{where}models[{i}]: unknown parameter {key!r} for {method} (per-model: {', '.join(per_model)})")
        value = {k: params.get(k, glob.get(k)) for k in per_model}
        if value["weight"] is None:
            raise TaskvecError(f"{where}models[{i}] ({ref}): missing required parameter 'weight' for {method}")
        entry = ModelEntry(model=ref, weight=algebra.check_lambda(_scalar(value["weight"], "weight", float, where)))
        if value["density"] is not None:
            entry.density = _scalar(value["density"], "density", float, where)
            if not 0.0 <= entry.density <= 1.0:
                raise TaskvecError(f"{where}models[{i}] ({ref}): density must be in [0, 1], got {entry.density:g}")
        if value.get("gamma") is not None:
            entry.gamma = _scalar(value["gamma"], "gamma", float, where)
            if not 0.0 <= entry.gamma <= 1.0:
                raise TaskvecError(f"{where}models[{i}] ({ref}): gamma must be in [0, 1], got {entry.gamma:g}")
        if sparsify is None and value["density"] not in (None, 1, 1.0):
            raise TaskvecError(f"{where}models[{i}] ({ref}): density has no effect with {method} (use ties, dare_* or breadcrumbs)")
        entries.append(entry)
    if not entries:
        raise TaskvecError(f"{where}no model to merge besides the base")

    notes = []
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise TaskvecError(f"{where}dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    if dtype in ("float16", "bfloat16"):
        notes.append(f"dtype {dtype}: taskvec computes in float32 (stored in the base's dtype), so the weights can differ from mergekit's in the last bits")
    out_dtype = data.get("out_dtype")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TaskvecError(f"{where}out_dtype {out_dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        raise TaskvecError(f"{where}tokenizer_source {tok!r} is not supported (the base's tokenizer files are copied, i.e. 'base')")
    return Recipe(method=method, base_model=base, models=entries, dtype=dtype, out_dtype=out_dtype, source=source, notes=notes, **shared)


def load_recipe(path: str | os.PathLike) -> Recipe:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TaskvecError(f"recipe not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise TaskvecError(f"{path}: not valid YAML{at}") from None
    return parse_recipe(data, str(path))


# ---------------------------------------------------------------------------
# Per-tensor arithmetic (mergekit's definitions, written for one tensor)


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _mask_like(delta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[index] = 1
    return mask.reshape(delta.shape)


def sparsify(delta: torch.Tensor, entry: ModelEntry, method: str, rescale: bool, seed: int) -> torch.Tensor:
    """One model's delta, sparsified as ``method`` prescribes (float32 in, float32 out)."""
    if entry.density >= 1 or method is None:
        return delta
    n = delta.numel()
    if method == "magnitude":
        if entry.density <= 0 or n == 0:
            return torch.zeros_like(delta)
        k = algebra.topk_count(n, entry.density)
        # descending argsort of |δ|: the same selection (ties included) as mergekit's
        order = torch.argsort(delta.abs().reshape(-1), descending=True)
        kept = delta * _mask_like(delta, order[:k])
    elif method == "magnitude_outliers":
        target = int(entry.density * n)
        top = int(entry.gamma * n)
        bottom = max(0, n - target - top)
        order = torch.sort(delta.abs().reshape(-1), descending=False).indices
        kept = delta * _mask_like(delta, order[bottom : bottom + target])
    elif method == "random":
        if entry.density <= 0:
            mask = torch.zeros_like(delta)
        else:
            mask = algebra.dare_keep_mask(delta.shape, 1.0 - entry.density, seed).to(delta.dtype)
        kept = delta * mask
    else:  # pragma: no cover - METHODS lists every sparsifier
        raise ValueError(method)
    return _rescale_l1(delta, kept) if rescale else kept


def combine(recipe: Recipe, name: str, deltas: Sequence[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """The merged delta for one tensor (to be added to the base)."""
    consensus, method, _, _ = METHODS[recipe.method]
    stacked = torch.stack(
        [sparsify(d, e, method, recipe.rescale, algebra.tensor_seed(seed, i, name)) for i, (d, e) in enumerate(zip(deltas, recipe.models))]
    )
    weights = torch.tensor([e.weight for e in recipe.models], dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
    stacked.mul_(weights)
    if consensus:
        majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1  # a zero total elects +
        agree = stacked.sign() == majority
        merged = (stacked * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = stacked.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if recipe.normalize:
        merged /= divisor
    if recipe.lam != 1:
        merged *= recipe.lam
    return merged


@dataclass
class RecipeOptions:
    """Merge options for :func:`taskvec.engine.merge` that run a mergekit recipe.

    Quacks like :class:`taskvec.engine.MergeOptions` (``method``, ``record``,
    ``combine``); the engine passes the per-model weights as the λ.
    """

    recipe: Recipe
    seed: int = 0

    @property
    def method(self) -> str:
        return f"mergekit:{self.recipe.method}"

    def record(self) -> dict:
        r = self.recipe
        out: dict = {"method": self.method, "normalize": r.normalize, "lambda_global": r.lam, "recipe": r.source or None}
        if METHODS[r.method][1]:
            out["densities"] = [m.density for m in r.models]
            out["rescale"] = r.rescale
        if METHODS[r.method][1] == "magnitude_outliers":
            out["gammas"] = [m.gamma for m in r.models]
        if METHODS[r.method][1] == "random":
            out["seed"] = self.seed
        return out

    def combine(self, name: str, taus: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
        if list(lambdas) != [m.weight for m in self.recipe.models]:  # the engine passes the weights back
            raise ValueError("recipe weights and λ disagree")
        return combine(self.recipe, name, taus, self.seed)


def _check_out_dtype(recipe: Recipe) -> None:
    if recipe.out_dtype is None:
        return
    from taskvec.io import TensorSource, resolve_model, torch_dtype

    with TensorSource(resolve_model(recipe.base_model)) as src:
        kinds = {torch_dtype(i.dtype) for i in src.infos().values() if i.is_float}
    if kinds != {DTYPES[recipe.out_dtype]}:
        have = ", ".join(sorted(str(k).removeprefix("torch.") for k in kinds))
        raise TaskvecError(f"{_where(recipe.source)}out_dtype {recipe.out_dtype}: taskvec stores the base's dtype ({have}); drop out_dtype or convert the base")


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_shard_bytes: int | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    warn=None,
) -> dict:
    """Run a recipe (or a recipe file) with :func:`taskvec.engine.merge`; returns the ledger."""
    from taskvec import engine
    from taskvec.io import DEFAULT_SHARD_BYTES

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    _check_out_dtype(recipe)
    for note in recipe.notes:
        if warn:
            warn(f"note: {note}")
    return engine.merge(
        recipe.base_model,
        recipe.pairs(),
        out,
        options=RecipeOptions(recipe, seed),
        include=include,
        exclude=exclude,
        max_shard_bytes=DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
        allow_pickle=allow_pickle,
        progress=progress,
    )
