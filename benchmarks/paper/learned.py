"""Addition with learned coefficients: one λ per task (``per_task``) and layer-wise AdaMerging (``adamerging``).

Hooked into :func:`benchmarks.paper.addition.run_addition` by the ``learned``
list of the addition spec. With ``adamerging_init_from_sum`` (and the
task-arithmetic sum in the methods) both start from its searched λ. Per-task
λ: compass search from there (else: its own diagonal golden search first),
``per_task_max_evals`` evaluations in all, maximising mean normalised
**validation** accuracy. AdaMerging: every coefficient starts there and is trained on the prediction entropy of the unlabelled
validation texts. Both are scored once on test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from benchmarks.paper.spec import ExperimentParams
from benchmarks.paper.stats import ADAMERGING, PER_TASK
from taskvec.adamerging import adamerge_suite, edit_delta
from taskvec.coefficients import per_task_search, suite_evaluator
from taskvec.search import addition_objective
from taskvec.suite import Suite


def run_learned(
    suite: Suite,
    taus: Sequence[Mapping],
    tasks: Sequence[str],
    ft_val: Mapping[str, float],
    params: ExperimentParams,
    rows: Mapping[str, dict],
    log: Callable[[str], None],
) -> tuple[dict, dict]:
    """Rows (``lambda``, ``validation``, ``test``, details) and search records for each ``learned`` entry."""
    add = params.bench.addition
    out_rows: dict = {}
    records: dict = {}
    start = (rows.get("sum") or {}).get("lambda")
    for name in add.learned:
        started = time.perf_counter()
        if name == "per_task":
            spec = params.search.model_copy(update={"max_evals": add.per_task_max_evals})
            objective = addition_objective(tasks, ft_val)
            origin = start if add.adamerging_init_from_sum else None
            res = per_task_search(suite_evaluator(suite, taus, "validation", tasks), len(taus), objective, spec, labels=list(tasks), start=origin)
            lambdas = res.details["lambdas"]
            test = suite_evaluator(suite, taus, "test", tasks)(tuple(lambdas[t] for t in tasks))
            out_rows[PER_TASK] = {"lambda": res.best_lambda, "lambdas": lambdas, "validation": res.best_metrics, "test": test}
            records["per_task"] = res.to_dict()
            log(f"[learned] per-task λ {lambdas} (val score {res.best_score:.4f}, test {test}, {len(res.evaluations)} evals, {time.perf_counter() - started:.0f}s)")
        else:
            spec = add.adamerging.model_copy(update={"init": start}) if start is not None and add.adamerging_init_from_sum else add.adamerging
            res = adamerge_suite(suite, taus, tasks, spec, split="validation", log=log)
            with suite.editor(edit_delta(taus, res.coefficients, res.groups, spec.granularity)) as editor:
                editor.apply(1.0)
                val, test = suite.accuracies("validation", tasks), suite.accuracies("test", tasks)
            out_rows[ADAMERGING[spec.granularity]] = {
                "lambda": float(res.coefficients.mean()),
                "coefficients": res.table(),
                "validation": val,
                "test": test,
            }
            records["adamerging"] = res.to_dict()
            log(f"[learned] AdaMerging entropy {res.initial_entropy:.4f} → {res.final_entropy:.4f}, mean λ {float(res.coefficients.mean()):.3f} ({res.seconds:.0f}s)")
        last = next(reversed(out_rows.values()))
        last["mean_validation_normalized"] = float(np.mean([last["validation"][t] / ft_val[t] for t in tasks]))
    return out_rows, records
