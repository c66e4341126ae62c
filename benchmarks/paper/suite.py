"""The benchmark's evaluation: the core harness (:class:`taskvec.suite.Suite`) and λ search on validation."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from benchmarks.paper.spec import ExperimentParams
from taskvec.search import SearchResult
from taskvec.search_run import control_sets, search_suite, write_outputs
from taskvec.suite import Suite


def open_suite(params: ExperimentParams, tasks: Sequence[str]) -> Suite:
    """The base encoder loaded once (float32, on the harness's device), each task's frozen base head,
    validation and test eval sets, and the negation control's rows (``search.control_rows`` rows of
    ``search.control_splits``, by default validation) when the control is one of ``tasks``; keeps the base weights for :meth:`Suite.reset`.
    :func:`control_set` names the eval set the control's rows are in."""
    controls = [params.bench.negation.control] if params.bench.negation and params.bench.negation.control in tasks else []
    _, sets = control_sets(params.search, controls, "validation")
    return Suite.load(params.base, tasks, params, splits=("validation", "test"), dtype=torch.float32, keep_base=True, **sets)


def control_set(params: ExperimentParams, controls: Sequence[str]) -> str:
    """The eval-set key :func:`open_suite` loaded ``controls``' rows under ("validation" or "control")."""
    return control_sets(params.search, controls, "validation")[0]


def search(
    suite: Suite,
    params: ExperimentParams,
    tau: Mapping[str, torch.Tensor],
    objective_name: str,
    tasks: Sequence[str],
    *,
    controls: Sequence[str] = (),
    reference: Mapping[str, float] | None = None,
    sign: float = 1.0,
    curve_dir: Path | None = None,
    label: str = "",
    log: Callable[[str], None] = print,
) -> SearchResult:
    """λ search on VALIDATION with taskvec.search's objectives and golden/grid strategy."""
    started = time.perf_counter()
    result = search_suite(suite, tau, objective_name, tasks, spec=params.search, controls=controls, reference=reference, sign=sign, split="validation", control_split=control_set(params, controls))
    if curve_dir is not None:
        write_outputs(result, curve_dir)
    log(f"[search] {label}: λ = {result.best_lambda:g} (val score {result.best_score:.4f}, {len(result.evaluations)} evals, {time.perf_counter() - started:.0f}s)")
    if result.note:
        log(f"[search] {label}: control constraint: {result.note}")
    return result
