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

import torch
from tqdm.auto import tqdm

from taskvec.config import Params, SearchSpec
from taskvec.errors import HomologyError, TaskvecError
from taskvec.io import atomic_dir
from taskvec.search import CachedEvaluator, SearchResult, addition_objective, negation_objective, search_lambda
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
    strategy: str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Search λ for ``θ + λ·sign·τ`` on ``suite`` (its ``split``), scoring ``tasks`` and ``controls``.

    ``addition`` needs ``reference`` (each task's fine-tuned accuracy);
    ``negation``'s control floors come from the base (λ = 0) evaluation.
    """
    scored = list(dict.fromkeys([*tasks, *controls]))
    total = spec.grid_points if (strategy or spec.strategy) == "grid" else spec.max_evals
    signed = {k: sign * v for k, v in tau.items()}
    with suite.editor(signed) as editor, tqdm(total=total, desc="λ search", unit="eval", disable=not progress) as bar:

        def evaluate(lam: float) -> dict[str, float]:
            editor.apply(lam)
            return suite.accuracies(split, scored)

        cached = CachedEvaluator(evaluate, bar)
        if objective == "addition":
            goal = addition_objective(tasks, reference or {})
        else:
            goal = negation_objective(tasks, controls, cached(0.0), spec.control_threshold)
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
    suite = Suite.load(base, [*tasks, *controls], params, splits=(spec.split,))
    tau = compose(vectors)
    if objective == "addition" and reference is None:
        reference = {task: suite.at(tensors, weight, tasks=[task])[task] for task, (tensors, weight) in zip(tasks, vectors, strict=True)}
    sign = 1.0 if objective == "addition" else -1.0
    result = search_suite(suite, tau, objective, tasks, controls=controls, reference=reference, sign=sign, strategy=strategy, spec=spec, progress=progress)
    result.details["data"] = suite.lineage(spec.split)
    result.details["device"] = str(device_of(suite.encoder))
    return result


def write_outputs(result: SearchResult, out_dir: str | Path) -> Path:
    """Write ``curve.csv``, ``curve.png`` and ``search.json`` into ``out_dir`` (atomically)."""
    with atomic_dir(out_dir) as tmp:
        write_curve(tmp, result)
        (tmp / "search.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return Path(out_dir)
