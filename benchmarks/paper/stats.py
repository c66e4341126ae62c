"""Statistics over seeds: means with 95 % t-intervals, and the ``paper.json`` summary.

Every reported number is the mean over the benchmark's seeds (each seed
re-runs the fine-tunes, the row sampling of capped splits, the random vectors
and the DARE masks) with the half-width of a two-sided 95 % Student-t
interval over the seeds: ``t(0.975, n − 1) · sd / √n`` (sample sd, ddof = 1).
It describes the spread between independent repetitions of the whole
experiment; with 3 seeds t = 4.30, so intervals are wide by construction.

:func:`paper_summary` turns one seed's results (``benchmarks.paper.experiments``)
into the flat ``paper.json`` schema (accuracies as fractions of the *test*
split); :func:`mean_tree` averages such summaries leaf by leaf, writing each
numeric leaf ``x`` as its mean and a sibling ``x_ci95``. Differences (a
target's drop, a control's drop, a merge method's advantage over ``sum``, the
analogy's recovered fraction) are computed per seed first, so their intervals
are paired over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

CI_SUFFIX = "_ci95"
INTERVAL = "95% Student-t interval over seeds: mean ± t(0.975, n−1)·sd/√n (sample sd)"


#: The addition's rows with learned coefficients (benchmarks/paper/learned.py), for the goal they answer.
PER_TASK = "per-task λ"
ADAMERGING = {"layer": "AdaMerging (layer-wise)", "task": "AdaMerging (task-wise)"}
LEARNED_METHODS = (PER_TASK, *ADAMERGING.values())


def ci95(values: Sequence[float]) -> float | None:
    """Half-width of the two-sided 95 % t-interval of the mean of ``values`` (None for fewer than 2 values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    return float(stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_tree(trees: Sequence[object]) -> object:
    """The leaf-by-leaf mean of structurally equal trees (dicts of dicts / lists / leaves).

    A numeric leaf becomes its mean, with its interval under ``<key>_ci95`` in
    the enclosing dict; equal non-numeric leaves stay as they are; differing
    ones (e.g. a boolean per seed) become the list of per-seed values; a key
    missing in some tree is dropped.
    """
    first = trees[0]
    if isinstance(first, Mapping):
        keys = [k for k in first if all(isinstance(t, Mapping) and k in t for t in trees)]
        out: dict = {}
        for key in keys:
            values = [t[key] for t in trees]
            out[key] = mean_tree(values)
            if all(_is_number(v) for v in values):
                out[f"{key}{CI_SUFFIX}"] = ci95(values)
        return out
    if all(_is_number(t) for t in trees):
        return float(np.mean(trees))
    if isinstance(first, list) and all(isinstance(t, list) and len(t) == len(first) for t in trees):
        if all(isinstance(item, Mapping) for t in trees for item in t):
            return [mean_tree([t[i] for t in trees]) for i in range(len(first))]
    return first if all(t == first for t in trees) else list(trees)


# ---------------------------------------------------------------------------
# paper.json: one seed's summary


def _negation(res: Mapping, target: str, chance: float) -> dict:
    c = res["control"]
    rows = res["rows"]
    base = rows["base"]["test"]

    def entry(row: Mapping, **extra) -> dict:
        acc = row["test"]
        return {
            "target": acc[target],
            "control": acc[c],
            "target_drop": base[target] - acc[target],
            "control_drop": base[c] - acc[c],
            **extra,
        }

    neg, rnd, ga = rows["negated task vector (−λτ)"], rows["random vector, same norm (−λr)"], rows["gradient ascent"]
    searches = res.get("searches", {})
    constraint = searches.get("task_vector", {}).get("constraint", {})
    return {
        "target": target,
        "control": c,
        "chance": chance,
        "base": {"target": base[target], "control": base[c]},
        "fine_tuned": entry(rows["fine-tuned (+τ)"]),
        "negated": entry(neg, **{"lambda": neg["lambda"], "control_feasible": bool(constraint.get("feasible_found", True))}),
        "random": entry(rnd, **{"lambda": rnd["lambda"]}),
        "gradient_ascent": entry(ga, lr=ga["lr"], steps=ga["steps"]),
    }


def _addition(add: Mapping) -> dict:
    tasks = add["tasks"]
    rows = add["rows"]
    fixed = {"base (zero-shot)": "base", "individual fine-tunes": "fine_tuned"}

    def entry(row: Mapping) -> dict:
        out = {
            "mean_normalized": row["mean_normalized_test"],
            "mean_abs": row["mean_test"],
            "accuracy": {t: row["test"][t] for t in tasks},
            "normalized": {t: row["normalized_test"][t] for t in tasks},
        }
        if _is_number(row.get("lambda")):
            out["lambda"] = row["lambda"]
        return out

    methods = {name: entry(row) for name, row in rows.items() if name not in fixed}
    out = {"tasks": list(tasks), **{key: entry(rows[name]) for name, key in fixed.items() if name in rows}, "methods": methods}
    if "sum" in methods:
        ref = methods["sum"]["mean_normalized"]
        out["advantage_over_sum"] = {name: m["mean_normalized"] - ref for name, m in methods.items() if name != "sum"}
    return out


def _analogy(an: Mapping) -> dict:
    t = an["target"]
    names = list(an["rows"])
    acc = {name: row["test"][t] for name, row in an["rows"].items()}
    base, supervised = acc[names[0]], acc[names[1]]
    source_name = next(n for n in names if n.endswith(" only"))
    analogies = [n for n in names if n.startswith("analogy")]
    analogy_name = analogies[-1]  # the benchmark's default recipe comes last (analogy.py); an earlier one is the raw MLM comparison
    gain = supervised - base
    out = {
        "target": t,
        "base": base,
        "supervised": supervised,
        "source_only": acc[source_name],
        "analogy": acc[analogy_name],
        "lambda_source_only": an["rows"][source_name]["lambda"],
        "lambda_analogy": an["rows"][analogy_name]["lambda"],
        "recovered_fraction": (acc[analogy_name] - base) / gain if gain else None,
        "source_only_recovered_fraction": (acc[source_name] - base) / gain if gain else None,
        **({"analogy_raw": acc[analogies[0]]} if len(analogies) > 1 else {}),
    }
    return out


def paper_summary(results: Mapping, chance: Mapping[str, float]) -> dict:
    """One seed's results (as :func:`benchmarks.paper.experiments.run_seed` returns them) in the paper.json schema."""
    out: dict = {}
    if "negation" in results:
        out["negation"] = [_negation(res, target, chance[target]) for target, res in results["negation"].items()]
    if "addition" in results:
        out["addition"] = _addition(results["addition"])
    if "analogy" in results:
        out["analogy"] = _analogy(results["analogy"])
    return out


# ---------------------------------------------------------------------------
# Goals, judged on the means (and their intervals)


def goals(paper: Mapping, *, max_control_drop: float) -> dict:
    """The issue's goals, each with the measured value and whether the mean meets it."""
    out: dict = {}
    for entry in paper.get("negation", []):
        neg = entry["negated"]
        drop, near_chance = neg["target_drop"], neg["target"] - entry["chance"]
        out[f"negation/{entry['target']}"] = {
            "goal": f"target down ≥ 20 points or within 5 points of chance, control loses ≤ {max_control_drop:g} point (test, mean over seeds)",
            "target_drop": drop,
            "target_drop_ci95": neg.get("target_drop_ci95"),
            "target_above_chance": near_chance,
            "control_drop": neg["control_drop"],
            "control_drop_ci95": neg.get("control_drop_ci95"),
            "met": bool((drop >= 0.20 or near_chance <= 0.05) and neg["control_drop"] <= max_control_drop / 100 + 1e-12),
        }
    add = paper.get("addition")
    if add and "sum" in add["methods"]:
        s = add["methods"]["sum"]
        out["addition/sum"] = {"goal": "task arithmetic keeps ≥ 90% normalised accuracy", "mean_normalized": s["mean_normalized"], "mean_normalized_ci95": s.get("mean_normalized_ci95"), "met": bool(s["mean_normalized"] >= 0.90)}
        adv = add.get("advantage_over_sum", {})
        if adv:
            best = max((k for k in adv if not k.endswith(CI_SUFFIX)), key=lambda k: adv[k])
            half = adv.get(best + CI_SUFFIX)
            out["addition/best_variant"] = {
                "goal": "the best variant's advantage over task arithmetic, with its interval",
                "method": best,
                "advantage": adv[best],
                "advantage_ci95": half,
                "significant": bool(half is not None and adv[best] - half > 0),
            }
            learned = [k for k in LEARNED_METHODS if k in adv]
            if learned:
                top = max(learned, key=lambda k: adv[k])
                out["addition/learned"] = {
                    "goal": "learned coefficients beat one global λ by ≥ 2 points normalised (else the README says they do not)",
                    "method": top,
                    "advantage": adv[top],
                    "advantage_ci95": adv.get(top + CI_SUFFIX),
                    "met": bool(adv[top] >= 0.02),
                }
    an = paper.get("analogy")
    if an and _is_number(an.get("recovered_fraction")):  # undefined (a list with None) when a seed's supervised gain is 0
        out["analogy"] = {"goal": "the analogy recovers ≥ 50% of the supervised gain", "recovered_fraction": an["recovered_fraction"], "recovered_fraction_ci95": an.get("recovered_fraction_ci95"), "met": bool(an["recovered_fraction"] >= 0.5)}
    return out
