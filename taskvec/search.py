"""Search the scaling coefficient λ of a task-vector composition.

The edited model is ``θ(λ) = θ_base + λ·τ`` (addition) or ``θ_base − λ·τ``
(negation), where ``τ = Σ wᵢ·τᵢ`` and ``wᵢ`` is the weight given to vector
``i`` (``VEC:W``, default 1). The model is loaded once; :class:`WeightEditor`
rewrites the covered tensors *in place* per candidate λ from a float32 copy of
the base values and restores the base bit-for-bit afterwards — no reload per
candidate.

Objectives (the paper's, §3/§4 of Ilharco et al.):

* ``addition`` maximises the mean *normalised* accuracy over the tasks,
  accuracy / that task's fine-tuned accuracy;
* ``negation`` minimises the mean target accuracy subject to every control
  task keeping ≥ ``threshold`` (0.95) × its base accuracy; infeasible λ are
  excluded (they rank below every feasible λ).

Strategies, over the lattice ``linspace(lambda_min, lambda_max, grid_points)``
(the paper's 21 points on [0, 1]):

* ``grid`` evaluates every point;
* ``golden`` (default) is golden-section search on the lattice indices,
  reusing one probe per step, then sweeping the last ≤ 4 candidates. For a
  unimodal curve it returns exactly the grid's best point; on 21 points it
  needs at most 7 evaluations (8 with negation's base evaluation). It never
  exceeds ``max_evals``. Ties prefer the smaller λ (the smaller edit).

Evaluations are cached by λ. The evaluation callable is injectable
(``λ -> {task: accuracy}``), so tests search known synthetic curves. Outputs:
``curve.csv``, ``curve.png`` and ``search.json`` in the output folder.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from taskvec.config import Params, SearchSpec
from taskvec.data import load_split
from taskvec.errors import HomologyError, TaskvecError
from taskvec.evaluate import EvalSet, score
from taskvec.heads import EncoderClassifier, build_head, device_of, load_encoder
from taskvec.io import atomic_dir

Evaluate = Callable[[float], dict[str, float]]
INV_PHI = (math.sqrt(5) - 1) / 2


class WeightEditor:
    """Set ``module``'s covered tensors to ``base + λ·τ`` in place; restore ``base`` exactly.

    ``tau`` is keyed by ``module.state_dict()`` names. A float32 copy of the
    base values of the covered tensors is kept; each :meth:`apply` writes
    ``(base + λ·τ)`` cast to the tensor's own dtype. Use as a context manager
    to restore the base on exit.
    """

    def __init__(self, module: nn.Module, tau: Mapping[str, torch.Tensor]):
        state = module.state_dict()
        unknown = [name for name in tau if name not in state]
        if unknown:
            raise HomologyError(f"vector tensor {unknown[0]!r} is not in the model ({len(unknown)} unknown in all)")
        self._targets: dict[str, torch.Tensor] = {}
        self._base: dict[str, torch.Tensor] = {}
        self._tau: dict[str, torch.Tensor] = {}
        for name, delta in tau.items():
            target = state[name]
            if tuple(delta.shape) != tuple(target.shape):
                raise HomologyError(f"vector tensor {name!r} has shape {tuple(delta.shape)}, the model's has {tuple(target.shape)}")
            if not target.is_floating_point():
                raise HomologyError(f"vector tensor {name!r} targets a non-floating tensor ({target.dtype})")
            self._targets[name] = target
            self._base[name] = target.detach().float().clone()
            self._tau[name] = delta.detach().to(device=target.device, dtype=torch.float32)
        self.lam = 0.0

    @torch.no_grad()
    def apply(self, lam: float) -> None:
        """Write ``base + lam·τ`` into the module's tensors."""
        for name, target in self._targets.items():
            if target.dtype == torch.float32:  # write straight into the parameter, no temporary
                torch.add(self._base[name], self._tau[name], alpha=lam, out=target)
            else:
                target.copy_(torch.add(self._base[name], self._tau[name], alpha=lam))
        self.lam = float(lam)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved base values back (exact: float32 holds every float16/bfloat16/float32 value)."""
        for name, target in self._targets.items():
            target.copy_(self._base[name])
        self.lam = 0.0

    def __enter__(self) -> WeightEditor:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def compose(vectors: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """``Σ wᵢ·τᵢ`` in float32; every vector must cover the same tensors."""
    if not vectors:
        raise TaskvecError("no task vector given")
    names = set(vectors[0][0])
    total: dict[str, torch.Tensor] = {}
    for tensors, weight in vectors:
        if set(tensors) != names:
            raise HomologyError("task vectors cover different tensors")
        for name, delta in tensors.items():
            term = delta.float() * weight
            total[name] = total[name] + term if name in total else term
    return total


@dataclass(frozen=True)
class Objective:
    """How a λ is scored from per-task accuracies.

    ``value`` is the natural quantity (mean normalised accuracy, or mean target
    accuracy); ``maximize`` says which way is better; ``feasible`` applies the
    control constraint.
    """

    name: str
    value: Callable[[Mapping[str, float]], float]
    maximize: bool
    feasible: Callable[[Mapping[str, float]], bool] = lambda metrics: True
    describe: dict = field(default_factory=dict)

    def key(self, metrics: Mapping[str, float]) -> float:
        """Higher is better; infeasible λ rank below everything."""
        if not self.feasible(metrics):
            return -math.inf
        value = self.value(metrics)
        return value if self.maximize else -value


def addition_objective(tasks: Sequence[str], reference: Mapping[str, float]) -> Objective:
    """Mean over ``tasks`` of accuracy / ``reference[task]`` (the task's fine-tuned accuracy)."""
    missing = [task for task in tasks if not reference.get(task)]
    if missing:
        raise TaskvecError(f"addition needs a positive fine-tuned reference accuracy for task {missing[0]}")
    tasks = list(tasks)
    return Objective(
        "addition",
        lambda m: float(np.mean([m[t] / reference[t] for t in tasks])),
        maximize=True,
        describe={"tasks": tasks, "reference": dict(reference)},
    )


def negation_objective(targets: Sequence[str], controls: Sequence[str], base: Mapping[str, float], threshold: float = 0.95) -> Objective:
    """Mean target accuracy (minimised), feasible iff each control ≥ ``threshold`` × its base accuracy."""
    if not targets or not controls:
        raise TaskvecError("negation needs at least one target task and one control task")
    targets, floors = list(targets), {c: threshold * base[c] for c in controls}
    return Objective(
        "negation",
        lambda m: float(np.mean([m[t] for t in targets])),
        maximize=False,
        feasible=lambda m: all(m[c] >= floor for c, floor in floors.items()),
        describe={"targets": targets, "controls": list(controls), "base": dict(base), "control_floor": floors, "threshold": threshold},
    )


class CachedEvaluator:
    """Memoise an evaluation callable by λ and record the order of evaluations."""

    def __init__(self, evaluate: Evaluate, progress: tqdm | None = None):
        self._evaluate = evaluate
        self._progress = progress
        self.cache: dict[float, dict[str, float]] = {}

    def __contains__(self, lam: float) -> bool:
        return round(float(lam), 12) in self.cache

    def __call__(self, lam: float) -> dict[str, float]:
        lam = round(float(lam), 12)
        if lam not in self.cache:
            self.cache[lam] = dict(self._evaluate(lam))
            if self._progress is not None:
                self._progress.update(1)
                self._progress.set_postfix(lam=f"{lam:.3g}")
        return self.cache[lam]


@dataclass
class SearchResult:
    """Best λ, its score and every evaluation (in evaluation order)."""

    strategy: str
    objective: str
    best_lambda: float
    best_score: float
    best_metrics: dict[str, float]
    evaluations: list[dict]
    seconds: float
    budget_exhausted: bool = False
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "objective": self.objective,
            "best_lambda": self.best_lambda,
            "best_score": self.best_score,
            "best_metrics": self.best_metrics,
            "n_evals": len(self.evaluations),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "budget_exhausted": self.budget_exhausted,
            **self.details,
        }


def lattice(spec: SearchSpec) -> list[float]:
    """The candidate λ values: ``grid_points`` evenly spaced on [lambda_min, lambda_max]."""
    return [round(float(x), 12) for x in np.linspace(spec.lambda_min, spec.lambda_max, spec.grid_points)]


class NoFeasibleLambda(TaskvecError):
    """Every evaluated λ breaks the objective's constraint."""


class _BudgetSpent(Exception):
    """Raised when a search would need more than ``max_evals`` evaluations."""


def _golden(key: Callable[[int], float], n: int) -> None:
    """Golden-section search for the max of ``key`` over the indices 0..n-1 (unimodal ``key``)."""
    a, b, c, d = 0, n - 1, None, None
    while b - a >= 3:
        if c is None:
            c = b - round(INV_PHI * (b - a))
        if d is None:
            d = a + round(INV_PHI * (b - a))
        if c >= d:
            c, d = (a + b) // 2, (a + b) // 2 + 1
        if key(c) >= key(d):  # the max lies in [a, d-1]; c stays as the right probe
            b, d, c = d - 1, (c if a < c < d - 1 else None), None
        else:  # the max lies in [c+1, b]; d stays as the left probe
            a, c, d = c + 1, (d if c + 1 < d < b else None), None
    for index in range(a, b + 1):
        key(index)


def search_lambda(evaluate: Evaluate, objective: Objective, spec: SearchSpec, *, strategy: str | None = None) -> SearchResult:
    """Search λ on the lattice with ``strategy`` (default ``spec.strategy``).

    ``golden`` stops early (``budget_exhausted``) rather than exceed
    ``spec.max_evals`` distinct evaluations; ``grid`` evaluates every point.
    """
    strategy = strategy or spec.strategy
    if strategy not in ("golden", "grid"):
        raise TaskvecError(f"unknown search strategy {strategy!r} (golden | grid)")
    cached = evaluate if isinstance(evaluate, CachedEvaluator) else CachedEvaluator(evaluate)
    points = lattice(spec)
    started = time.perf_counter()

    def key(index: int) -> float:
        lam = points[index]
        if strategy == "golden" and lam not in cached and len(cached.cache) >= spec.max_evals:
            raise _BudgetSpent
        return objective.key(cached(lam))

    complete = True
    try:
        if strategy == "grid":
            for index in range(len(points)):
                key(index)
        else:
            _golden(key, len(points))
    except _BudgetSpent:
        complete = False
    seconds = time.perf_counter() - started

    ranked = sorted(cached.cache, key=lambda lam: (-objective.key(cached.cache[lam]), lam))
    best = ranked[0]
    if objective.key(cached.cache[best]) == -math.inf:
        raise NoFeasibleLambda(f"no feasible λ: every evaluated λ breaks the {objective.name} constraint")
    evaluations = [
        {
            "lambda": lam,
            "score": objective.value(metrics),
            "feasible": bool(objective.feasible(metrics)),
            "metrics": metrics,
        }
        for lam, metrics in cached.cache.items()
    ]
    return SearchResult(
        strategy=strategy,
        objective=objective.name,
        best_lambda=best,
        best_score=objective.value(cached.cache[best]),
        best_metrics=cached.cache[best],
        evaluations=evaluations,
        seconds=seconds,
        budget_exhausted=not complete,
        details={"objective_details": objective.describe},
    )


def write_outputs(result: SearchResult, out_dir: str | Path) -> Path:
    """Write ``curve.csv``, ``curve.png`` and ``search.json`` into ``out_dir`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result.evaluations, key=lambda e: e["lambda"])
    tasks = sorted({task for row in rows for task in row["metrics"]})
    with atomic_dir(out_dir) as tmp:
        with (tmp / "curve.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["lambda", "score", "feasible", *tasks])
            for row in rows:
                writer.writerow([row["lambda"], row["score"], int(row["feasible"]), *(row["metrics"].get(t, "") for t in tasks)])
        fig, ax = plt.subplots(figsize=(6, 4))
        lams = [row["lambda"] for row in rows]
        for task in tasks:
            ax.plot(lams, [row["metrics"].get(task, np.nan) for row in rows], marker="o", label=f"{task} accuracy")
        ax.plot(lams, [row["score"] for row in rows], "k--", marker="s", label=f"{result.objective} score")
        bad = [row for row in rows if not row["feasible"]]
        if bad:
            ax.scatter([row["lambda"] for row in bad], [row["score"] for row in bad], marker="x", s=80, c="red", zorder=3, label="infeasible")
        ax.axvline(result.best_lambda, color="grey", lw=1, label=f"best λ = {result.best_lambda:.3g}")
        ax.set_xlabel("λ")
        ax.set_ylabel("accuracy / score")
        ax.set_title(f"λ search ({result.objective}, {result.strategy}, {len(rows)} evaluations)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(tmp / "curve.png", dpi=120)
        plt.close(fig)
        (tmp / "search.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return Path(out_dir)


@dataclass
class TaskSuite:
    """A base model loaded once, with each task's frozen head (built from the base) and tokenised split."""

    encoder: nn.Module
    models: dict[str, EncoderClassifier]
    evalsets: dict[str, EvalSet]

    @classmethod
    def load(cls, base: str | Path, names: Sequence[str], params: Params) -> TaskSuite:
        """Validate and load ``params.search.split`` of each task (capped by ``params.eval``), then the model."""
        specs = {name: params.task(name) for name in dict.fromkeys(names)}
        for name, task in specs.items():
            if task.kind != "classification":
                raise TaskvecError(f"task {name} is an {task.kind} task; the search scores classification tasks only")
        split, cap = params.search.split, params.eval.max_rows.get(params.search.split)
        splits = {name: load_split(task, params.data_root(), split, max_rows=cap, seed=params.eval.seed) for name, task in specs.items()}
        encoder, tokenizer, _ = load_encoder(base)
        if torch.cuda.is_available():
            encoder.cuda()
        length = params.eval.max_length
        models = {
            name: EncoderClassifier(encoder, build_head(encoder, tokenizer, name, task.labels, task.head_texts, max_length=length))
            for name, task in specs.items()
        }
        evalsets = {
            name: EvalSet.build(data, tokenizer, batch_size=params.eval.batch_size, max_length=length)
            for name, data in splits.items()
        }
        return cls(encoder, models, evalsets)

    def accuracies(self) -> dict[str, float]:
        """Accuracy of the encoder *as it is now* on every task."""
        return {name: score(model, self.evalsets[name])["accuracy"] for name, model in self.models.items()}


def run_search(
    base: str | Path,
    vectors: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    objective: str,
    tasks: Sequence[str],
    params: Params,
    *,
    controls: Sequence[str] = (),
    reference: Mapping[str, float] | None = None,
    strategy: str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Load ``base`` once, then search λ for ``vectors`` on real task data.

    For ``addition`` without ``reference``, vector ``i`` is paired with task
    ``i`` and its fine-tuned accuracy is measured in place as
    ``θ_base + wᵢ·τᵢ`` (not counted as a search evaluation).
    """
    if objective not in ("addition", "negation"):
        raise TaskvecError(f"unknown objective {objective!r} (addition | negation)")
    if objective == "addition" and reference is None and len(vectors) != len(tasks):
        raise TaskvecError(f"addition pairs vectors with tasks: got {len(vectors)} vectors for {len(tasks)} tasks (or pass reference accuracies)")
    spec = params.search
    suite = TaskSuite.load(base, [*tasks, *controls], params)
    tau = compose(vectors)
    if objective == "addition" and reference is None:
        reference = {}
        for task, (tensors, weight) in zip(tasks, vectors, strict=True):
            with WeightEditor(suite.encoder, tensors) as single:
                single.apply(weight)
                reference[task] = score(suite.models[task], suite.evalsets[task])["accuracy"]

    sign = 1.0 if objective == "addition" else -1.0
    total = spec.grid_points if (strategy or spec.strategy) == "grid" else spec.max_evals
    with WeightEditor(suite.encoder, {k: sign * v for k, v in tau.items()}) as editor, tqdm(total=total, desc="λ search", unit="eval", disable=not progress) as bar:

        def evaluate(lam: float) -> dict[str, float]:
            editor.apply(lam)
            return suite.accuracies()

        cached = CachedEvaluator(evaluate, bar)
        if objective == "addition":
            goal = addition_objective(tasks, reference)
        else:
            goal = negation_objective(tasks, controls, cached(0.0), spec.control_threshold)
        result = search_lambda(cached, goal, spec, strategy=strategy)
    result.details["data"] = {name: evalset.lineage for name, evalset in suite.evalsets.items()}
    result.details["device"] = str(device_of(suite.encoder))
    return result
