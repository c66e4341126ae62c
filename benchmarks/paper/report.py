"""The results table (markdown) and bar plots of the paper experiments."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(d: dict, key: str, *, scale: float = 100) -> str:
    """``mean ± half-width`` of ``d[key]`` (its ``_ci95`` sibling), in points."""
    x = d.get(key)
    if x is None:
        return "–"
    half = d.get(key + "_ci95")
    return f"{scale * x:.1f}" + (f" ± {scale * half:.1f}" if half is not None else "")


def _lam(row: dict) -> str:
    if row.get("steps") is not None:
        lr = row["lr"]
        lr = lr if isinstance(lr, list) else [lr]
        return f"lr {', '.join('– (base kept)' if v is None else f'{v:g}' for v in lr)}, {_ci(row, 'steps', scale=1)} steps"
    lam = row.get("lambda")
    if lam is None:
        return "–"
    if isinstance(lam, list):
        return ", ".join(f"{v:g}" for v in lam)
    return _ci(row, "lambda", scale=1) if isinstance(lam, float) else str(lam)


def _control_rows(meta: dict) -> str:
    """The negation control's rows: a cap (or all) of which splits."""
    cap = meta["eval_rows"].get("control_validation")
    splits = meta["search"].get("control_splits") or ["validation"]
    return f"{'all' if cap is None else f'≤ {cap}'} rows of {' + '.join(splits)}"


def _wall(meta: dict) -> str:
    """The run's wall time; for a summary of seed runs (``--aggregate``), each seed's."""
    per_seed = meta.get("seconds_per_seed")
    if per_seed:
        return "per seed " + ", ".join(f"{seed}: {sec / 60:.1f} min" for seed, sec in per_seed.items())
    return f"{meta['seconds'] / 60:.1f} min"


def _steps_override(meta: dict) -> str:
    """``bench.steps``' per-task budgets, e.g. " (yelp_lm, amazon_lm: 600 steps)"."""
    by_steps: dict[int, list[str]] = {}
    for task, steps in (meta.get("train_steps_override") or {}).items():
        by_steps.setdefault(steps, []).append(task)
    return "".join(f" ({', '.join(tasks)}: {steps} steps)" for steps, tasks in sorted(by_steps.items()))


def render_markdown(results: dict, paper: dict | None = None) -> str:
    """The results table: every number a mean over seeds ± its 95% t-interval (test accuracy, %)."""
    lines: list[str] = []
    meta = results["meta"]
    seeds = meta.get("seeds", [meta.get("seed")])
    lines += [
        "# Task arithmetic on all-MiniLM-L6-v2 — paper experiments",
        "",
        f"Base `{meta['base']}`; fine-tunes: {meta['train']['steps']} steps × batch {meta['train']['batch_size']}, lr {meta['train']['lr']:g}, max_length {meta['train']['max_length']}"
        f"{_steps_override(meta)}; "
        f"rows: validation ≤ {meta['eval_rows']['validation']} (control: {_control_rows(meta)}), test ≤ {meta['eval_rows']['test']} per task. "
        f"λ on linspace({meta['search']['lambda_min']:g}, {meta['search']['lambda_max']:g}, {meta['search']['grid_points']}) by {meta['search']['strategy']} search on **validation**; "
        f"all numbers below are **test** accuracy (%), the mean over seeds {seeds} ± the half-width of a 95% Student-t interval over seeds. "
        f"Wall time {_wall(meta)}{' (--quick smoke budget: numbers are not meaningful)' if meta['quick'] else ''}.",
        "",
    ]
    if "negation" in results:
        drop = meta["search"].get("max_control_drop")
        lines += ["## 1. Negation (forgetting a task)", "",
                  f"λ / gradient-ascent checkpoint minimise target validation accuracy subject to the control losing ≤ {drop:g} point "
                  f"(the {meta['search'].get('control_confidence', 0.95):.0%} upper bound of its paired validation drop).", ""]
        for target, res in results["negation"].items():
            c = res["control"]
            lines += [f"### Target `{target}`, control `{c}`", "",
                      f"| method | λ / budget | {target} acc ↓ | {c} acc | {target} val | {c} val |",
                      "| --- | --- | ---: | ---: | ---: | ---: |"]
            for name, row in res["rows"].items():
                lines.append(f"| {name} | {_lam(row)} | {_ci(row['test'], target)} | {_ci(row['test'], c)} | {_ci(row['validation'], target)} | {_ci(row['validation'], c)} |")
            lines.append("")
    if "addition" in results:
        add = results["addition"]
        tasks = add["tasks"]
        lines += ["## 2. Addition (one model for " + ", ".join(f"`{t}`" for t in tasks) + ")", "",
                  "Absolute test accuracy (%); normalised accuracy = accuracy / the task's own fine-tuned test accuracy. "
                  "λ maximises mean normalised **validation** accuracy.", "",
                  "| method | λ | " + " | ".join(tasks) + " | mean abs | mean norm |",
                  "| --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
        for name, row in add["rows"].items():
            m = row.get("method") or {}
            extra = f" (density {m['density']:g})" if m.get("method") == "ties" else (f" (p = {m['drop']:g})" if m.get("method") in ("dare", "dare_ties") else "")
            cells = " | ".join(_ci(row["test"], t) for t in tasks)
            lines.append(f"| {name}{extra} | {_lam(row)} | {cells} | {_ci(row, 'mean_test')} | {_ci(row, 'mean_normalized_test')} |")
        lines.append("")
    if "analogy" in results:
        an = results["analogy"]
        t = an["target"]
        lines += ["## 3. Analogy (τ_yelp ≈ τ_amazon + (τ_yelp_lm − τ_amazon_lm))", "",
                  f"λ maximises `{t}` **validation** accuracy; no labelled `{t}` data is used by the analogy vector.", "",
                  f"| model | λ | {t} test acc | {t} val acc |", "| --- | --- | ---: | ---: |"]
        for name, row in an["rows"].items():
            lines.append(f"| {name} | {_lam(row)} | {_ci(row['test'], t)} | {_ci(row['validation'], t)} |")
        lines.append("")
    if paper and paper.get("goals"):
        lines += ["## Goals (means over seeds, test)", "", "| goal | measured | met |", "| --- | --- | --- |"]
        for key, g in paper["goals"].items():
            measured = ", ".join(f"{k} {_ci(g, k) if isinstance(g[k], float) else g[k]}" for k in g if k not in ("goal", "met", "significant") and not k.endswith("_ci95"))
            if "met" in g:
                verdict = "yes" if g["met"] else "no"
            else:  # a goal that asks for a statement: it is made; say whether the difference is beyond its interval
                verdict = "stated: " + ("significant" if g.get("significant") else "not significant")
            lines.append(f"| {key}: {g['goal']} | {measured} | {verdict} |")
        lines.append("")
    lines += ["Regenerate: `make paper` (`taskvec benchmark --config benchmarks/experiments.yaml --out benchmarks/out/paper --paper-json benchmarks/results/paper.json`); "
              "fine-tunes and vectors are cached under `<out>/cache`, each seed's run is under `<out>/seed-<s>/`.", ""]
    return "\n".join(lines)


def plot_bars(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    if "negation" in results:
        items = list(results["negation"].items())
        fig, axes = plt.subplots(1, len(items), figsize=(6 * len(items), 4), squeeze=False)
        for ax, (target, res) in zip(axes[0], items):
            c = res["control"]
            names = list(res["rows"])
            x = np.arange(len(names))
            ax.bar(x - 0.2, [100 * res["rows"][n]["test"][target] for n in names], 0.4, label=f"{target} (target)")
            ax.bar(x + 0.2, [100 * res["rows"][n]["test"][c] for n in names], 0.4, label=f"{c} (control)")
            ax.set_xticks(x, [n.split(" (")[0] for n in names], rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"negation: {target}")
            ax.legend(fontsize=8)
        save(fig, "negation.png")
    if "addition" in results:
        add = results["addition"]
        names = [n for n in add["rows"] if n != "individual fine-tunes"]
        tasks = add["tasks"]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(names)
        x = np.arange(len(tasks) + 1)
        for i, n in enumerate(names):
            row = add["rows"][n]
            vals = [100 * row["normalized_test"][t] for t in tasks] + [100 * row["mean_normalized_test"]]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=n)
        ax.axhline(100, color="grey", lw=1)
        ax.set_xticks(x, [*tasks, "mean"])
        ax.set_ylabel("normalised test accuracy (%)")
        ax.set_title("addition of 4 task vectors")
        ax.legend(fontsize=8)
        save(fig, "addition.png")
    if "analogy" in results:
        an = results["analogy"]
        names = list(an["rows"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(names)), [100 * an["rows"][n]["test"][an["target"]] for n in names], color="tab:green")
        ax.set_xticks(range(len(names)), [n.split(" (")[0][:40] for n in names], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(f"{an['target']} test accuracy (%)")
        ax.set_title("task analogy")
        save(fig, "analogy.png")
    return written
