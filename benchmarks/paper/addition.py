"""Experiment 2, addition: four task vectors merged by task arithmetic, TIES, DARE and DARE-TIES."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from benchmarks.paper.learned import run_learned
from benchmarks.paper.spec import ExperimentParams
from benchmarks.paper.suite import search
from benchmarks.paper.vectors import global_norm, merge_vectors
from taskvec.suite import Suite


def run_addition(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    add = params.bench.addition
    assert add is not None
    tasks = add.tasks
    base_val, base_test = suite.accuracies("validation", tasks), suite.accuracies("test", tasks)
    ft_val, ft_test = {}, {}
    for t in tasks:
        ft_val[t] = suite.at(taus[t], 1.0, "validation", [t])[t]
        ft_test[t] = suite.at(taus[t], 1.0, "test", [t])[t]
    rows = {
        "base (zero-shot)": {"lambda": None, "validation": base_val, "test": base_test},
        "individual fine-tunes": {"lambda": 1.0, "validation": ft_val, "test": ft_test},
    }
    searches = {}
    for m in add.methods:
        started = time.perf_counter()
        merged = merge_vectors([taus[t] for t in tasks], m, params.bench.seed)
        log(f"[merge] {m.name} built in {time.perf_counter() - started:.1f}s (‖τ‖ = {global_norm(merged):.3f})")
        res = search(suite, params, merged, "addition", tasks, reference=ft_val, curve_dir=out / "curves" / f"addition-{m.name}", label=f"addition {m.name}", log=log)
        rows[m.name] = {"lambda": res.best_lambda, "method": m.model_dump(), "validation": res.best_metrics, "test": suite.at(merged, res.best_lambda, "test", tasks)}
        searches[m.name] = res.to_dict()
    if add.learned:
        learned_rows, learned_searches = run_learned(suite, [taus[t] for t in tasks], tasks, ft_val, params, rows, log)
        rows |= learned_rows
        searches |= learned_searches
    for row in rows.values():
        row["normalized_test"] = {t: row["test"][t] / ft_test[t] for t in tasks}
        row["mean_test"] = float(np.mean([row["test"][t] for t in tasks]))
        row["mean_normalized_test"] = float(np.mean(list(row["normalized_test"].values())))
    return {"tasks": tasks, "rows": rows, "searches": searches}
