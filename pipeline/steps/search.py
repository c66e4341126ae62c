"""Step 4 — λ search: θ(λ) = θ₀ + λ·τ_edit scored on validation, best λ into ``outputs/search/``.

Objective (the paper's, generalised to a mixed plan), on the ``search.split``
split capped by ``eval.max_rows``:

* **learn / analogy targets** — mean *normalised* accuracy, acc(θ_λ) /
  acc(θ_ft) (the fine-tuned model of that task; a target without one is
  normalised by the base's zero-shot accuracy);
* **forget** — minus the mean accuracy relative to the base's;
* **control** — a constraint: every control task keeps at least
  ``search.control_threshold`` × its base accuracy, or λ is infeasible.

The search itself is the core's (:func:`taskvec.search.search_lambda`):
``search.strategy: grid`` scores the paper's grid of ``grid_points`` λ values
on [lambda_min, lambda_max]; ``golden`` runs golden-section search over the
same lattice with at most ``max_evals`` model evaluations. Weights are updated
in place by :class:`taskvec.search.WeightEditor` (θ₀ + λτ per covered
tensor, base restored exactly), so one encoder is loaded once.

Writes ``curve.csv`` (λ, objective, feasible, per-task accuracy),
``curve.png`` and ``best.json`` (best λ, its scores, base and fine-tuned
references); the ``lambda`` plot and the ``search`` metrics of ``dvc.yaml``.

    python -m pipeline.steps.search --params params.yaml
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path

from pipeline import params as P
from taskvec.errors import TaskvecError

CURVE = "curve.csv"
PLOT = "curve.png"
BEST = "best.json"


class Scorer:
    """Encoder loaded once; heads and tokenised eval sets per task."""

    def __init__(self, p: P.PipelineParams, tasks: list[str], split: str):
        import torch

        from taskvec.data import load_split
        from taskvec.evaluate import EvalSet
        from taskvec.heads import build_head, load_encoder

        self.torch = torch
        self.encoder, self.tokenizer, _ = load_encoder(p.base, dtype=torch.float32)
        self.encoder.eval()
        self.heads = {}
        self.sets = {}
        self.lineage = {}
        for t in tasks:
            spec = p.task(t)
            self.heads[t] = build_head(self.encoder, self.tokenizer, t, spec.labels, spec.head_texts, max_length=p.eval.max_length)
            data = load_split(spec, p.data_root(), split, max_rows=p.eval.max_rows.get(split), seed=p.eval.seed)
            self.sets[t] = EvalSet.build(data, self.tokenizer, batch_size=p.eval.batch_size, max_length=p.eval.max_length)
            self.lineage[t] = data.lineage()

    def score(self, encoder=None, tasks: list[str] | None = None) -> dict[str, float]:
        from taskvec.evaluate import score
        from taskvec.heads import EncoderClassifier

        enc = encoder or self.encoder
        return {t: score(EncoderClassifier(enc, self.heads[t]), s)["accuracy"] for t, s in self.sets.items() if tasks is None or t in tasks}

    def score_model(self, folder: Path, tasks: list[str] | None = None) -> dict[str, float]:
        from taskvec.heads import load_encoder

        enc, _, _ = load_encoder(folder, dtype=self.torch.float32)
        enc.eval()
        return self.score(enc, tasks)


def load_tau(path: Path, encoder) -> dict:
    """The composed vector as {state_dict name: float32 tensor}; names must be the encoder's."""
    from taskvec.vector import VectorFile

    state = encoder.state_dict()
    with VectorFile(path) as vf:
        missing = [n for n in vf.names if n not in state]
        if missing:
            raise TaskvecError(f"vector {path} has tensor {missing[0]!r} that the base encoder does not have")
        return {n: vf.read(n) for n in vf.names}


def edit_objective(p: P.PipelineParams, base: dict[str, float], ft: dict[str, float]):
    """The plan's objective: normalised target accuracy − relative forget accuracy; controls as a constraint."""
    from taskvec.search import Objective

    plan = p.edit
    targets = plan.target_tasks()
    floors = {c: p.search.control_threshold * base[c] for c in plan.control}

    def value(acc) -> float:
        parts = []
        if targets:
            parts.append(sum(acc[t] / max(ft.get(t, base[t]), 1e-9) for t in targets) / len(targets))
        if plan.forget:
            parts.append(-sum(acc[t] / max(base[t], 1e-9) for t in plan.forget) / len(plan.forget))
        return sum(parts)

    return Objective(
        "edit",
        value,
        maximize=True,
        feasible=lambda acc: all(acc[c] >= floor for c, floor in floors.items()),
        describe={"targets": targets, "forget": list(plan.forget), "control_floor": floors},
    )


def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS) -> dict:
    from taskvec.io import atomic_dir
    from taskvec.search import NoFeasibleLambda, WeightEditor, search_lambda

    from pipeline.steps.compose import VECTOR

    started = time.perf_counter()
    p = P.load(params_file)
    vector = P.edit_dir(p) / VECTOR
    if not vector.is_file():
        raise TaskvecError(f"composed vector not found: {vector} (run the compose step first)")
    plan = p.edit
    tasks = plan.eval_tasks()
    split = p.search.split
    scorer = Scorer(p, tasks, split)
    tau = load_tau(vector, scorer.encoder)
    base_acc = scorer.score()
    ft_acc: dict[str, float] = {}
    for t in plan.target_tasks():
        folder = P.finetuned_dir(p, t)
        if folder.is_dir():
            ft_acc[t] = scorer.score_model(folder, [t])[t]
    objective = edit_objective(p, base_acc, ft_acc)

    def evaluate(lam: float) -> dict[str, float]:
        editor.apply(lam)
        return scorer.score()

    with WeightEditor(scorer.encoder, tau) as editor:
        try:
            found = search_lambda(evaluate, objective, p.search)
        except NoFeasibleLambda:
            raise TaskvecError(
                f"no λ in [{p.search.lambda_min}, {p.search.lambda_max}] keeps every control task above "
                f"{p.search.control_threshold:.0%} of its base accuracy; lower search.control_threshold or widen the range"
            ) from None
    curve = sorted(
        ({"lambda": e["lambda"], "objective": e["score"], "feasible": e["feasible"], **{f"acc/{t}": a for t, a in e["metrics"].items()}} for e in found.evaluations),
        key=lambda r: r["lambda"],
    )
    best = {"lambda": found.best_lambda, "objective": found.best_score, **{f"acc/{t}": a for t, a in found.best_metrics.items()}}
    result = {
        "lambda": best["lambda"],
        "objective": best["objective"],
        "accuracy": {t: best[f"acc/{t}"] for t in tasks},
        "base_accuracy": base_acc,
        "finetuned_accuracy": ft_acc,
        "evaluations": len(found.evaluations),
        "strategy": p.search.strategy,
        "split": split,
        "vector_sha256": _sha(vector),
        "data": scorer.lineage,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = P.search_dir(p)
    with atomic_dir(out) as tmp:
        _write_curve(tmp / CURVE, curve, tasks)
        _plot(tmp / PLOT, curve, tasks, best["lambda"])
        (tmp / BEST).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return {"step": "search", "path": str(out), "best": str(out / BEST), "curve": str(out / CURVE), "plot": str(out / PLOT), **result}


def _sha(path: Path) -> str:
    from taskvec.io import file_sha256

    return file_sha256(path)


def _write_curve(path: Path, curve: list[dict], tasks: list[str]) -> None:
    cols = ["lambda", "objective", "feasible"] + [f"acc/{t}" for t in tasks]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in curve:
        w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else int(r[k]) if isinstance(r[k], bool) else r[k]) for k in cols})
    path.write_text(buf.getvalue())


def _plot(path: Path, curve: list[dict], tasks: list[str], best: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["lambda"] for r in curve]
    for t in tasks:
        ax.plot(xs, [r[f"acc/{t}"] for r in curve], marker="o", label=t)
    ax.axvline(best, color="grey", linestyle="--", label=f"best λ={best:g}")
    ax.set_xlabel("λ")
    ax.set_ylabel("validation accuracy")
    ax.set_title("λ search: θ₀ + λ·τ_edit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0])
