"""Configuration of the paper experiments: :class:`ExperimentParams` = :class:`Params` plus a ``bench`` section."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from taskvec.config import AdaMergingSpec, MergeMethod, MergeSpec, Params, SearchSpec, TrainSpec, _Strict, control_splits_conflict, load_params


class GradientAscentSpec(_Strict):
    lrs: list[float] = Field(default_factory=lambda: [1e-5, 3e-5])
    steps: int = Field(default=40, ge=1)
    checkpoints: list[int] = Field(default_factory=lambda: [5, 10, 20, 30, 40])
    batch_size: int = Field(default=16, ge=1)


class NegationSpec(_Strict):
    targets: list[str] = Field(default_factory=lambda: ["offensive", "sst2"])
    control: str = "agnews"
    random_norm: Literal["per_tensor", "global"] = "per_tensor"
    gradient_ascent: GradientAscentSpec = Field(default_factory=GradientAscentSpec)


class MethodSpec(MergeSpec):
    """A named merge method and its options, checked by the registry in taskvec.methods (as the engine checks them)."""

    name: str
    method: MergeMethod


class AdditionSpec(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["sst2", "agnews", "sms_spam", "offensive"])
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [
            MethodSpec(name="sum", method="sum"),
            MethodSpec(name="ties", method="ties", density=0.2),
            MethodSpec(name="dare", method="dare", drop=0.5),
            MethodSpec(name="dare_ties", method="dare_ties", drop=0.5),
        ]
    )
    # learned coefficients (benchmarks/paper/learned.py): per_task (one λ per vector), adamerging (per layer and task)
    learned: list[Literal["per_task", "adamerging"]] = Field(default_factory=list)
    per_task_max_evals: int = Field(default=24, ge=2)
    adamerging: AdaMergingSpec = Field(default_factory=AdaMergingSpec)
    adamerging_init_from_sum: bool = True  # per_task and adamerging start from task arithmetic's searched λ


class AnalogySpec(_Strict):
    """τ_target ≈ τ_source + (τ_target_lm − τ_source_lm): the target's vector from its unlabelled text's."""

    target: str = "yelp"
    source: str = "amazon"
    target_lm: str = "yelp_lm"
    source_lm: str = "amazon_lm"
    # how the domain difference τ_target_lm − τ_source_lm is built (benchmarks/paper/domain.py)
    domain_objective: Literal["mlm", "simcse"] = "mlm"
    lm_tensors: Literal["all", "layers"] = "all"
    lm_norm: Literal["none", "source"] = "source"

    def tasks(self) -> list[str]:
        """The four tasks fine-tuned for the analogy."""
        return [self.target, self.source, self.target_lm, self.source_lm]


class QuickSpec(_Strict):
    steps: int = 6
    validation_rows: int = 48
    test_rows: int = 64
    ga_steps: int = 4
    max_evals: int = 4
    control_rows: int = Field(default=200, ge=1)  # the negation control's rows (the full run: search.control_rows of search.control_splits)


class BenchSpec(_Strict):
    # every number is the mean over these seeds (fine-tuning seed, row sampling of capped splits, random vectors, DARE masks);
    # ``seed`` is the one a single run uses (set per seed by :func:`seed_params`)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    seed: int = 0
    threads: int = Field(default=0, ge=0)  # torch intra-op threads; 0 = torch's default
    steps: dict[str, int] = Field(default_factory=dict)  # per-task override of train.steps
    negation: NegationSpec | None = Field(default_factory=NegationSpec)
    addition: AdditionSpec | None = Field(default_factory=AdditionSpec)
    analogy: AnalogySpec | None = Field(default_factory=AnalogySpec)
    quick: QuickSpec = Field(default_factory=QuickSpec)


class ExperimentParams(Params):
    bench: BenchSpec = Field(default_factory=BenchSpec)

    @model_validator(mode="after")
    def _unique_seeds(self) -> ExperimentParams:
        if len(set(self.bench.seeds)) != len(self.bench.seeds):
            raise ValueError(f"bench.seeds must be distinct, got {self.bench.seeds}")
        neg = self.bench.negation
        conflict = neg and control_splits_conflict(self.search, [neg.control], neg.targets)
        if conflict:
            raise ValueError(conflict)
        return self


def load_experiment_params(path: str | Path, overrides: list[str] | None = None) -> ExperimentParams:
    """The experiment config, with ``-S key.path=value`` overrides (e.g. a smaller budget)."""
    return load_params(path, model=ExperimentParams, overrides=overrides)


def seed_params(params: ExperimentParams, seed: int) -> ExperimentParams:
    """The run of one seed: the fine-tuning seed, the row sampling of capped splits and the benchmark's own seed."""
    p = copy.deepcopy(params)
    p.train = TrainSpec.model_validate(p.train.model_dump() | {"seed": seed})
    p.eval.seed = seed
    p.bench.seed = seed
    return p


def quick_params(params: ExperimentParams) -> ExperimentParams:
    """The same experiments with smoke-test budgets (``--quick``)."""
    p = copy.deepcopy(params)
    q = p.bench.quick
    p.train = TrainSpec.model_validate(p.train.model_dump() | {"steps": q.steps})
    p.bench.steps = {}
    p.eval.max_rows.validation = q.validation_rows
    p.eval.max_rows.test = q.test_rows
    p.search = SearchSpec.model_validate(p.search.model_dump() | {"max_evals": q.max_evals, "control_rows": q.control_rows})
    if p.bench.addition is not None:
        p.bench.addition.per_task_max_evals = min(p.bench.addition.per_task_max_evals, 2 * q.max_evals)
        p.bench.addition.adamerging.steps = min(p.bench.addition.adamerging.steps, q.ga_steps)
    if p.bench.negation is not None:
        ga = p.bench.negation.gradient_ascent
        ga.steps = q.ga_steps
        ga.checkpoints = sorted({max(1, q.ga_steps // 2), q.ga_steps})
        ga.lrs = ga.lrs[:1]
    return p


def needed_tasks(params: ExperimentParams) -> tuple[list[str], list[str]]:
    """(tasks to fine-tune, classification tasks to score)."""
    b = params.bench
    ft: list[str] = []
    scored: list[str] = []
    if b.negation:
        ft += b.negation.targets
        scored += [*b.negation.targets, b.negation.control]
    if b.addition:
        ft += b.addition.tasks
        scored += b.addition.tasks
    if b.analogy:
        a = b.analogy
        ft += a.tasks()
        scored += [a.target]
    ft = list(dict.fromkeys(ft))
    scored = list(dict.fromkeys(scored))
    for name in [*ft, *scored]:
        params.task(name)
    return ft, scored
