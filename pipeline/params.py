"""Pipeline parameters: ``params.yaml`` = the core :class:`taskvec.config.Params` plus pipeline sections.

``params.yaml`` is grouped so that each DVC stage depends on exactly the
sections it reads (``dvc.yaml`` lists them under ``params:``)::

    base, data_dir, tasks     shared by every stage (tasks.<name> per fine-tune)
    train                     finetune stage   (core TrainSpec)
    finetune                  finetune stage   (which tasks get a fine-tune: the foreach list)
    extract                   extract stage    (include / exclude globs)
    edit                      compose, search, evaluate (the edit plan and merge method)
    search, eval              search, evaluate (core SearchSpec, EvalSpec)
    register, mlflow, dvc     register stage   (registry, tracking, remote)

Every section refuses unknown keys (``extra="forbid"``), like the core ones.
Cross-section rules (every task named by the plan is declared under
``tasks``; every task the plan edits with is fine-tuned; no task has two roles
in the plan) are checked at load time and reported as one line.

There is one way to read the file: :func:`load` (= ``taskvec.config.load_params``
with :class:`PipelineParams`, memoised per process); every section is read as
a typed attribute of the result, e.g. ``load(path).promotion``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from taskvec import methods
from taskvec.config import MergeSpec, Params, _Strict, control_splits_conflict, load_params, merge_option
from taskvec.errors import TaskvecError

DEFAULT_PARAMS = "params.yaml"
OUTPUTS = "outputs"


class Analogy(_Strict):
    """``τ_c + (τ_b − τ_a)``: "a is to b as c is to target" (e.g. yelp_lm : amazon_lm :: yelp : amazon)."""

    a: str
    b: str
    c: str
    target: str | None = None  # task evaluated for this analogy (needs no fine-tune)


class EditPlan(MergeSpec):
    """What the edit does: learn (add), forget (negate), analogies, merge method, controls.

    The composed vector is ``merge(+τ_learn…, −τ_forget…, +τ_c, +τ_b, −τ_a…)``
    with ``method``; the λ search then scales it as a whole (θ = θ₀ + λ·τ).
    """

    learn: list[str] = Field(default_factory=list)
    forget: list[str] = Field(default_factory=list)
    analogies: list[Analogy] = Field(default_factory=list)
    control: list[str] = Field(default_factory=list)
    # the merge method and its options (MergeSpec's, plus DARE's seed): range-checked and matched to the method by taskvec.methods
    seed: merge_option("seed") = methods.OPTIONS["seed"].default
    # a mergekit YAML under recipes/ that says how to merge the learn/forget vectors (pipeline/recipe.py)
    recipe: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EditPlan:
        if not (self.learn or self.forget or self.analogies):
            raise ValueError("the edit plan is empty: give edit.learn, edit.forget or edit.analogies")
        if self.recipe:
            changed = [k for k in ("method", "density", "drop") if getattr(self, k) != (methods.OPTIONS[k].default if k != "method" else "sum")]
            if changed:
                raise ValueError(f"edit.recipe says how to merge: leave edit.{changed[0]} at its default (or drop edit.recipe)")
            if self.analogies:
                raise ValueError("edit.recipe merges edit.learn and edit.forget: analogies are not supported with a recipe")
        self._check_roles()
        self.check_merge()
        return self

    def _check_roles(self) -> None:
        """A task has one role (learned, forgotten or a control) and appears once in its list.

        An analogy's target may also be learned (both raise its accuracy) but
        not forgotten or a control.
        """
        seen: dict[str, str] = {}
        for role, tasks in (("learn", self.learn), ("forget", self.forget), ("control", self.control)):
            for task in tasks:
                if task in seen:
                    where = f"twice in edit.{role}" if seen[task] == role else f"in both edit.{seen[task]} and edit.{role}"
                    raise ValueError(f"task {task!r} is listed {where}: give each task one role, once")
                seen[task] = role
        for i, an in enumerate(self.analogies):
            if an.target and seen.get(an.target) in ("forget", "control"):
                raise ValueError(f"task {an.target!r} is listed in both edit.{seen[an.target]} and edit.analogies[{i}].target: give each task one role, once")

    def signed_tasks(self) -> list[tuple[str, float]]:
        """The ordered (task, sign) list the composed vector is made of."""
        out = [(t, 1.0) for t in self.learn] + [(t, -1.0) for t in self.forget]
        for an in self.analogies:
            out += [(an.c, 1.0), (an.b, 1.0), (an.a, -1.0)]
        return out

    def vector_tasks(self) -> list[str]:
        """Tasks whose vector the edit uses, each once, in first-use order."""
        return list(dict.fromkeys(t for t, _ in self.signed_tasks()))

    def target_tasks(self) -> list[str]:
        """Tasks whose accuracy the edit should raise."""
        return list(dict.fromkeys(self.learn + [a.target for a in self.analogies if a.target]))

    def eval_tasks(self) -> list[str]:
        """Every labelled task evaluated: targets, forgotten tasks and controls."""
        return list(dict.fromkeys(self.target_tasks() + self.forget + self.control))

    def merge_options(self):
        from taskvec.engine import MergeOptions

        return MergeOptions(method=self.method, density=self.density, drop=self.drop, seed=self.seed)


class FinetuneSection(_Strict):
    """``tasks``: the tasks fine-tuned (DVC's ``foreach`` list); must cover the plan's vectors."""

    tasks: list[str] = Field(default_factory=list)
    progress: bool = False


class ExtractSection(_Strict):
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)


class CompressSpec(_Strict):
    """How a thin version stores its vectors lossy (``register.compress``; null = exact).

    ``dtype``: the stored entries' dtype; ``density``: the top-k (by
    magnitude) kept fraction of each tensor in (0, 1], TIES's trim (null =
    keep every entry). The version then serves base + Σλτ̂; the manifest
    records each vector's error and the measured max |θ̂ − θ|.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    density: float | None = Field(default=None, gt=0, le=1)


class RegisterSection(_Strict):
    """``weights``: ``thin`` registers the ledger + content-addressed vectors (materialised on load), ``full`` the whole folder.

    ``log_vectors``: store the vectors (once each, in the vector store) with a
    ``full`` version too, so ``taskvec reproduce`` works from MLflow alone; a
    ``thin`` version always stores them. ``compress`` (thin only): store them
    compressed instead (:class:`CompressSpec`); the exact vectors stay in DVC.
    """

    alias: str = "challenger"
    weights: Literal["thin", "full"] = "thin"
    log_vectors: bool = True
    compress: CompressSpec | None = None
    description: str = "Task-arithmetic edit of the base model, built by the taskvec edit pipeline."

    @model_validator(mode="after")
    def _compress_needs_thin(self) -> "RegisterSection":
        if self.compress is not None and self.weights != "thin":
            raise ValueError("register.compress stores a thin version's vectors; it needs register.weights: thin")
        return self


class MlflowSection(_Strict):
    """Tracking: ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking_uri``."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "taskvec-edit"
    registered_model: str = "taskvec-edit"


class DvcSection(_Strict):
    """``remote``: the DVC remote the flow pushes to (``""`` = the repo's default remote)."""

    remote: str = ""
    push: bool = True
    commit: bool = True  # the Prefect flow records its outputs in dvc.lock (`dvc commit`)


CHAMPION = "champion"
CHALLENGER = "challenger"


class PromotionSpec(_Strict):
    """Gates and approval settings.

    ``max_control_drop`` is in accuracy *points* (1.0 = one percentage point);
    ``target_floors`` are accuracies in [0, 1]. ``targets``/``controls`` default
    to the edit plan's target and control tasks.
    """

    targets: list[str] = Field(default_factory=list)
    controls: list[str] = Field(default_factory=list)
    max_control_drop: float = Field(default=1.0, ge=0)
    target_floors: dict[str, float] = Field(default_factory=dict)
    default_target_floor: float | None = Field(default=None, ge=0, le=1)
    champion_alias: str = CHAMPION
    challenger_alias: str = CHALLENGER
    approval_timeout_s: int = Field(default=7 * 24 * 3600, gt=0)
    poll_interval_s: float = Field(default=10.0, gt=0)
    evaluator: str = "pipeline.ops.promotion:default_evaluator"


class ScheduleSection(_Strict):
    """The nightly re-edit deployment (``flows/schedule.py``, ``prefect.yaml``)."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    deployment: str = "nightly-edit"
    register_model: bool = True
    parameters: dict = Field(default_factory=dict)


class RunnerSection(_Strict):
    """Task runner: the flow's own, or Prefect's DaskTaskRunner on a local or existing Dask cluster."""

    kind: Literal["default", "dask"] = "default"
    address: str | None = None
    cluster_kwargs: dict = Field(default_factory=dict)
    # Dask worker resources each fine-tune needs, e.g. {GPU: 1}: only workers started with
    # `dask worker --resources GPU=1` run fine-tunes (dask.annotate); other steps go anywhere
    finetune_resources: dict[str, float] = Field(default_factory=dict)


with warnings.catch_warnings():
    # `register` shadows ABCMeta.register of pydantic models, which nothing here calls
    warnings.filterwarnings("ignore", message='Field name "register"')

    class _RegisterField(Params):
        register: RegisterSection = Field(default_factory=RegisterSection)


class PipelineParams(_RegisterField):
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    extract: ExtractSection = Field(default_factory=ExtractSection)
    edit: EditPlan = Field(default_factory=lambda: EditPlan(learn=["sst2"]))
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    dvc: DvcSection = Field(default_factory=DvcSection)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    runner: RunnerSection = Field(default_factory=RunnerSection)

    @model_validator(mode="after")
    def _check_plan(self) -> PipelineParams:
        declared = set(self.tasks)
        # a file without `edit:` has no plan to check (core commands such as `taskvec evaluate` need
        # none); pipeline steps refuse such a file in load(), so the default plan is never used unchecked
        has_plan = "edit" in self.model_fields_set
        plan = self.edit
        named = (plan.vector_tasks() + plan.eval_tasks() if has_plan else []) + self.finetune.tasks
        for name in named:
            if name not in declared:
                raise ValueError(f"task {name!r} is used by the edit plan or finetune.tasks but not declared under tasks")
        if not has_plan:
            return self
        if plan.recipe and self.search.strategy in ("per_task", "adamerging"):
            raise ValueError(f"search.strategy {self.search.strategy} scales each vector; edit.recipe merges them first: use grid or golden with a recipe")
        missing = [t for t in plan.vector_tasks() if t not in self.finetune.tasks]
        if missing:
            raise ValueError(f"edit uses the vector of {missing[0]!r}; add it to finetune.tasks")
        for name in plan.eval_tasks():
            if self.tasks[name].kind != "classification":
                raise ValueError(f"task {name!r} is evaluated (learn/forget/control/target) but is an mlm task")
        conflict = control_splits_conflict(self.search, plan.control, plan.vector_tasks())
        if conflict:
            raise ValueError(conflict)
        return self

    # -- paths -------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The folder of params.yaml; relative paths in the pipeline are relative to it."""
        return self._root

    def out(self, *parts: str) -> Path:
        return self._root / OUTPUTS / Path(*parts)


def load(path: str | os.PathLike = DEFAULT_PARAMS) -> PipelineParams:
    """Validate ``params.yaml`` (or another file) into :class:`PipelineParams`; one-line errors.

    Parsed and validated once per process per file content (see
    :func:`taskvec.config.load_params`); each call returns its own copy. The
    pipeline refuses a file without an ``edit`` section (core commands such as
    ``taskvec evaluate`` accept one: they need no plan).
    """
    p = load_params(path, model=PipelineParams)
    if "edit" not in p.model_fields_set:
        raise TaskvecError(f"{path}: edit: the pipeline needs an edit plan: give edit.learn, edit.forget or edit.analogies")
    return p


EFFECTIVE_PARAMS = ".taskvec-run-params.yaml"


def effective_params(params_file: str | os.PathLike, overrides: list[str] | None) -> str:
    """``params_file`` itself without overrides; else the validated params + overrides written to EFFECTIVE_PARAMS beside it."""
    if not overrides:
        load(params_file)
        return str(params_file)
    import yaml

    from taskvec.io import atomic_path

    src = Path(params_file).resolve()
    # one parse: the file's own errors first, then the overrides'; the mapping validated is the one written
    _, data = load_params(params_file, model=PipelineParams, overrides=overrides, with_mapping=True)
    head = [f"# Effective params of `taskvec run -S`: {src.name} + the overrides below (rewritten by each run; do not edit)."]
    text = "\n".join(head + [f"#   -S {o}" for o in overrides]) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    out = src.parent / EFFECTIVE_PARAMS
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return str(out)


def params_hash(path: str | os.PathLike) -> str:
    """sha256 of the params file's bytes (the registry tag ``taskvec.params_sha256``)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise TaskvecError(f"cannot read params file {path}: {exc.strerror}") from None


# ---------------------------------------------------------------------------
# Output layout (under OUTPUTS beside params.yaml; every folder is a DVC out)


def finetuned_dir(p: PipelineParams, task: str) -> Path:
    return p.out("finetuned", task)


def vector_path(p: PipelineParams, task: str) -> Path:
    return p.out("vectors", f"{task}.safetensors")


def edit_dir(p: PipelineParams) -> Path:
    return p.out("edit")


def search_dir(p: PipelineParams) -> Path:
    return p.out("search")


def model_dir(p: PipelineParams) -> Path:
    return p.out("model")


def metrics_dir(p: PipelineParams) -> Path:
    return p.out("metrics")


def registry_dir(p: PipelineParams) -> Path:
    return p.out("registry")


# ---------------------------------------------------------------------------
# Content hashes of inputs (the keys of Prefect's cache and the registry tags)


def base_hash(p: PipelineParams) -> str:
    """Content hash of the base weights (cached by file stat in taskvec's hash cache)."""
    from taskvec.io import TensorSource, resolve_model

    with TensorSource(resolve_model(p.base)) as src:
        return src.content_hash()


def data_digests(p: PipelineParams, tasks: list[str], splits: tuple[str, ...] = ("train", "validation", "test")) -> dict[str, str]:
    """``{"task/split": sha256}`` of the data files each task reads (mirror CSV bytes; hub: taskvec.data's digest)."""
    from taskvec.data import load_split, resolve_source
    from taskvec.io import file_sha256

    out: dict[str, str] = {}
    for name in tasks:
        spec = p.task(name)
        wanted = ("train",) if spec.kind == "mlm" else splits
        source = resolve_source(spec, p.data_root())
        for split in wanted:
            if source.kind == "mirror":
                path = Path(source.location) / f"{split}.csv"
                if not path.is_file():
                    raise TaskvecError(f"task {name}: missing file {path}")
                out[f"{name}/{split}"] = file_sha256(path)
            else:
                out[f"{name}/{split}"] = load_split(spec, p.data_root(), split).digest
    return out


def data_folder(p: PipelineParams, task: str) -> str:
    """Where a task's data lives (mirror folder, or ``hf://datasets/<id>``)."""
    from taskvec.data import resolve_source

    source = resolve_source(p.task(task), p.data_root())
    return source.location if source.kind == "mirror" else f"hf://datasets/{source.location}"


# ---------------------------------------------------------------------------
# Step command lines: `python -m pipeline.steps.<step> --params params.yaml [--task T]`


def step_cli(main, argv: list[str] | None, *, description: str, task: bool = False) -> None:
    """Parse argv, run ``main``, print its result as JSON; a TaskvecError is one line and exit 2."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    if task:
        parser.add_argument("--task", required=True, help="task name (a key under tasks:)")
    parser.add_argument("--json-out", default=None, help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    threads = os.environ.get("TASKVEC_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    kwargs = {"params_file": args.params}
    if task:
        kwargs["task"] = args.task
    try:
        result = main(**kwargs)
    except TaskvecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)


def git_commit(root: str | os.PathLike) -> dict[str, object]:
    """``{"commit": sha or None, "dirty": bool}`` of the git checkout holding ``root``."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status)}
