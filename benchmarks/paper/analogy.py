"""Experiment 3, analogy: τ_target ≈ τ_source + (τ_target_lm − τ_source_lm).

The domain difference is built as the config says (:mod:`benchmarks.paper.domain`:
objective, tensors, normalisation); when that is not the paper's raw recipe,
the raw MLM analogy is scored too, for comparison."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from benchmarks.paper.domain import domain_difference
from benchmarks.paper.spec import ExperimentParams
from benchmarks.paper.suite import search
from taskvec.suite import Suite


def run_analogy(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    a = params.bench.analogy
    assert a is not None
    t = a.target
    raw = {k: taus[a.source][k] + taus[a.target_lm][k] - taus[a.source_lm][k] for k in taus[a.source]}
    diff, how = domain_difference(a, taus, params, out / "cache", log)
    analog = {k: taus[a.source][k] + diff[k] for k in taus[a.source]}
    ft_val = suite.at(taus[t], 1.0, "validation", [t])
    rows = {
        "base (zero-shot)": {"lambda": None, "validation": suite.accuracies("validation", [t]), "test": suite.accuracies("test", [t])},
        f"supervised {t} fine-tune (τ_{t})": {"lambda": 1.0, "validation": ft_val, "test": suite.at(taus[t], 1.0, "test", [t])},
    }
    searches = {}
    variants = [("source-only", f"τ_{a.source} only", taus[a.source])]
    default = how["domain_objective"] == "mlm" and how["lm_tensors"] == "all" and how["lm_norm"] == "none"
    if not default:  # the paper's recipe on the raw MLM vectors, for comparison
        variants.append(("analogy-raw", f"analogy τ_{a.source} + (τ_{a.target_lm} − τ_{a.source_lm}), raw MLM vectors", raw))
    label = f"{how['domain_objective']}, {how['lm_tensors']} tensors" + (", difference scaled to ‖τ_source‖" if how["lm_norm"] == "source" else "")
    variants.append(("analogy", f"analogy τ_{a.source} + (τ_{a.target_lm} − τ_{a.source_lm}) ({label})", analog))
    for slug, name, tau in variants:
        res = search(suite, params, tau, "addition", [t], reference=ft_val, curve_dir=out / "curves" / f"analogy-{slug}", label=f"analogy {slug}", log=log)
        rows[name] = {"lambda": res.best_lambda, "validation": res.best_metrics, "test": suite.at(tau, res.best_lambda, "test", [t])}
        searches[slug] = res.to_dict()
    return {"target": t, "rows": rows, "searches": searches, "domain": how}
