"""The λ search on real task data: one :class:`taskvec.suite.Suite`, in-place edits, outputs.

``τ = Σ wᵢ·τᵢ`` (:func:`compose`, ``wᵢ`` the weight of vector ``i``, ``VEC:W``,
default 1). The base model is loaded once by the harness; a
:class:`~taskvec.suite.WeightEditor` rewrites the covered tensors in place per
candidate λ and restores the base bit-for-bit afterwards — no reload per
candidate. The algorithm (lattice, golden/grid, objectives) is
:mod:`taskvec.search`. Outputs: ``curve.csv``, ``curve.png`` (the harness's
:func:`~taskvec.suite.write_curve`) and ``search.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from taskvec.config import Params, SearchSpec
from taskvec.errors import HomologyError, TaskvecError
from taskvec.io import atomic_dir
from taskvec.evaluate import predict
from taskvec.search import CachedEvaluator, SearchResult, addition_objective, drop_se_key, negation_objective, paired_drop_se, search_lambda
from taskvec.heads import device_of
from taskvec.suite import Suite, write_curve


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


class SuiteMetrics:
    """The metrics a λ search scores on ``suite``'s ``split``: each task's accuracy and, for each control,
    the paired standard error of its drop against the rows' base predictions (:func:`taskvec.search.paired_drop_se`).

    Construct it while the suite holds the *base* weights: it records which
    control rows the base gets right. :attr:`base` holds the base accuracies.
    Controls are scored on eval set ``control_split`` (default ``split``; see :func:`control_sets`).
    """

    def __init__(self, suite: Suite, split: str | None, tasks: Sequence[str], controls: Sequence[str] = (), *, control_split: str | None = None):
        self.suite, self.split = suite, suite._split(split)
        self.control_split = suite._split(control_split or self.split)
        self.controls = list(dict.fromkeys(controls))
        self.tasks = [t for t in dict.fromkeys(tasks) if t not in self.controls]
        self._base_correct = {c: self._correct(c) for c in self.controls}
        self.base = {**suite.accuracies(self.split, self.tasks), **{c: float(v.mean()) for c, v in self._base_correct.items()}}

    def at_base(self) -> dict[str, float]:
        """The metrics of the base weights (λ = 0): no drop, no uncertainty."""
        return {**self.base, **{drop_se_key(c): 0.0 for c in self.controls}}

    def _correct(self, control: str) -> np.ndarray:
        evalset = self.suite.sets[self.control_split][control]
        return predict(self.suite.models[control], evalset, place=self.suite.policy.batch) == evalset.labels

    def __call__(self) -> dict[str, float]:
        """The metrics of the encoder as it is now."""
        out = self.suite.accuracies(self.split, self.tasks) if self.tasks else {}
        for c in self.controls:
            correct = self._correct(c)
            out[c] = float(correct.mean())
            out[drop_se_key(c)] = paired_drop_se(self._base_correct[c], correct)
        return out


CONTROL_SET = "control"


def control_sets(spec: SearchSpec, controls: Sequence[str], split: str | None = None) -> tuple[str, dict]:
    """Where a search scores its controls: ``(eval-set key, Suite.load keyword arguments)``.

    Without ``search.control_splits`` the controls get ``search.control_rows``
    rows of the search split (key: that split). With it they get that many
    rows of those splits, as eval set ``"control"``, apart from any target's
    validation rows (a benchmark's control may be another experiment's target).
    """
    split = split or spec.split
    rows = {c: spec.control_rows for c in controls}
    if not spec.control_splits or not controls:
        return split, {"task_rows": {split: rows}}
    return CONTROL_SET, {"task_rows": {CONTROL_SET: rows}, "task_splits": {CONTROL_SET: {c: tuple(spec.control_splits) for c in controls}}}


def search_suite(
    suite: Suite,
    tau: Mapping[str, torch.Tensor],
    objective: str,
    tasks: Sequence[str],
    *,
    spec: SearchSpec,
    controls: Sequence[str] = (),
    reference: Mapping[str, float] | None = None,
    sign: float = 1.0,
    split: str | None = None,
    control_split: str | None = None,
    strategy: str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Search λ for ``θ + λ·sign·τ`` on ``suite`` (its ``split``), scoring ``tasks`` and ``controls``.

    ``addition`` needs ``reference`` (each task's fine-tuned accuracy);
    controls (required for ``negation``, optional for ``addition``) are held
    to ``spec.max_control_drop`` points against the base, with their paired
    uncertainty (:class:`SuiteMetrics`, on eval set ``control_split``: see
    :func:`control_sets`); the suite must hold the base weights.
    """
    total = spec.grid_points if (strategy or spec.strategy) == "grid" else spec.max_evals
    signed = {k: sign * v for k, v in tau.items()}
    measure = SuiteMetrics(suite, split, tasks, controls, control_split=control_split)
    with suite.editor(signed) as editor, tqdm(total=total, desc="λ search", unit="eval", disable=not progress) as bar:

        def evaluate(lam: float) -> dict[str, float]:
            editor.apply(lam)
            return measure()

        cached = CachedEvaluator(evaluate, bar)
        if controls:
            cached.cache[0.0] = measure.at_base()  # measured above on the base weights (= θ + 0·τ)
        limits = {"max_control_drop": spec.max_control_drop, "confidence": spec.control_confidence}
        if objective == "addition":
            goal = addition_objective(tasks, reference or {}, controls=controls, base=measure.base, **limits) if controls else addition_objective(tasks, reference or {})
        else:
            goal = negation_objective(tasks, controls, measure.base, **limits)
        return search_lambda(cached, goal, spec, strategy=strategy)


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
    """Load ``base`` once, then search λ for ``vectors`` on ``params.search.split`` of real task data.

    For ``addition`` without ``reference``, vector ``i`` is paired with task
    ``i`` and its fine-tuned accuracy is measured in place as
    ``θ_base + wᵢ·τᵢ`` (not counted as a search evaluation).
    """
    if objective not in ("addition", "negation"):
        raise TaskvecError(f"unknown objective {objective!r} (addition | negation)")
    if objective == "addition" and reference is None and len(vectors) != len(tasks):
        raise TaskvecError(f"addition pairs vectors with tasks: got {len(vectors)} vectors for {len(tasks)} tasks (or pass reference accuracies)")
    for name in dict.fromkeys([*tasks, *controls]):
        kind = params.task(name).kind
        if kind != "classification":
            raise TaskvecError(f"task {name} is an {kind} task; the search scores classification tasks only")
    spec = params.search
    where, sets = control_sets(spec, controls)
    suite = Suite.load(base, [*tasks, *controls], params, splits=(spec.split,), **sets)
    tau = compose(vectors)
    if objective == "addition" and reference is None:
        reference = {task: suite.at(tensors, weight, tasks=[task])[task] for task, (tensors, weight) in zip(tasks, vectors, strict=True)}
    sign = 1.0 if objective == "addition" else -1.0
    result = search_suite(suite, tau, objective, tasks, controls=controls, reference=reference, sign=sign, control_split=where, strategy=strategy, spec=spec, progress=progress)
    result.details["data"] = suite.lineage(spec.split) | suite.lineage(where)
    result.details["device"] = str(device_of(suite.encoder))
    return result


def write_outputs(result: SearchResult, out_dir: str | Path) -> Path:
    """Write ``curve.csv``, ``curve.png`` and ``search.json`` into ``out_dir`` (atomically)."""
    with atomic_dir(out_dir) as tmp:
        write_curve(tmp, result)
        (tmp / "search.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return Path(out_dir)
