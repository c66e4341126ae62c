"""Experiment 3, analogy: τ_target ≈ τ_source + (τ_target_lm − τ_source_lm)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from benchmarks.paper.spec import ExperimentParams
from benchmarks.paper.suite import search
from taskvec.suite import Suite


def run_analogy(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    a = params.bench.analogy
    assert a is not None
    t = a.target
    analog = {k: taus[a.source][k] + taus[a.target_lm][k] - taus[a.source_lm][k] for k in taus[a.source]}
    ft_val = suite.at(taus[t], 1.0, "validation", [t])
    rows = {
        "base (zero-shot)": {"lambda": None, "validation": suite.accuracies("validation", [t]), "test": suite.accuracies("test", [t])},
        f"supervised {t} fine-tune (τ_{t})": {"lambda": 1.0, "validation": ft_val, "test": suite.at(taus[t], 1.0, "test", [t])},
    }
    searches = {}
    for name, tau in ((f"τ_{a.source} only", taus[a.source]), (f"analogy τ_{a.source} + (τ_{a.target_lm} − τ_{a.source_lm})", analog)):
        slug = "source-only" if "only" in name else "analogy"
        res = search(suite, params, tau, "addition", [t], reference=ft_val, curve_dir=out / "curves" / f"analogy-{slug}", label=f"analogy {slug}", log=log)
        rows[name] = {"lambda": res.best_lambda, "validation": res.best_metrics, "test": suite.at(tau, res.best_lambda, "test", [t])}
        searches[slug] = res.to_dict()
    return {"target": t, "rows": rows, "searches": searches}
