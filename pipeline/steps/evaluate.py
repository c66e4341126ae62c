"""Step 5 — apply and evaluate: the edited model ``outputs/model/`` and ``outputs/metrics/``.

θ = θ₀ + merge(λ*·s_t·τ_t) by the plan's method, with λ* from the search and
s_t the signs of the composition — applied from the *task* vectors, so the
model's edit ledger (``taskvec.json``) lists each vector's sha256 and λ in
order (for ``sum``; one merge entry for TIES/DARE). Because every method is
homogeneous in a common λ, this equals θ₀ + λ*·τ_edit that the search scored.

The folder also gets the task heads (``heads/<task>.safetensors``, built from
the base encoder: task vectors never touch heads) and a model card
``README.md`` with the ledger, the test metrics and the provenance. Test-split
accuracy of the base (zero-shot), each fine-tuned model and the edited model
goes to ``outputs/metrics/evaluate.json`` (DVC metrics) and
``outputs/metrics/results.csv`` (the results table).

    python -m pipeline.steps.evaluate --params params.yaml
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
from pipeline.steps import EVAL_THREADS, pinned_threads
from taskvec.errors import TaskvecError

METRICS = "evaluate.json"
TABLE = "results.csv"
CARD = "README.md"


@pinned_threads(EVAL_THREADS)
def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS) -> dict:
    import torch

    from taskvec.engine import apply
    from taskvec.heads import save_head
    from taskvec.io import atomic_dir
    from taskvec.suite import Suite

    from pipeline.portable import lineage
    from pipeline.steps.compose import RECORD
    from pipeline.steps.search import BEST

    started = time.perf_counter()
    p = P.load(params_file)
    best_file = P.search_dir(p) / BEST
    record_file = P.edit_dir(p) / RECORD
    for f, step in ((record_file, "compose"), (best_file, "search")):
        if not f.is_file():
            raise TaskvecError(f"{f} not found (run the {step} step first)")
    best = json.loads(best_file.read_text())
    record = json.loads(record_file.read_text())
    lam = float(best["lambda"])
    from pipeline.steps.search_coeffs import edit_vectors

    vectors = edit_vectors(p, best, record)
    tasks = p.edit.eval_tasks()
    split = "test"
    suite = Suite.load(p.base, tasks, p, splits=(split,), dtype=torch.float32)
    out = P.model_dir(p)
    with atomic_dir(out) as tmp:
        ledger = apply(p.base, vectors, tmp, options=p.edit.merge_options())
        for t in tasks:
            save_head(suite.heads[t], tmp / "heads" / f"{t}.safetensors")
        base_acc = suite.accuracies()
        edited_acc = suite.score_model(tmp)
        ft_acc = {t: suite.score_model(P.finetuned_dir(p, t), tasks=[t])[t] for t in p.edit.target_tasks() if P.finetuned_dir(p, t).is_dir()}
        metrics = _metrics(p, base_acc, edited_acc, ft_acc, lam)
        provenance = {
            "params_sha256": P.params_hash(Path(params_file)),
            # no git commit here: these files are DVC-tracked, and a commit id in them would make every
            # checkout's run rewrite dvc.lock; the registered version carries it (tags git.commit, git.dirty)
            "data": lineage(p, suite.lineage(split)),
            "composition": {"vector_sha256": record["sha256"], "inputs": [{k: i[k] for k in ("task", "sha256", "sign")} for i in record["inputs"]], "options": record["options"], **({"recipe": record["recipe"]} if record.get("recipe") else {})},
            "search": {k: best[k] for k in ("lambda", "objective", "strategy", "split", "evaluations")},
        }
        (tmp / CARD).write_text(model_card(p, ledger, metrics, provenance))
        mdir = P.metrics_dir(p)
        with atomic_dir(mdir) as mtmp:
            (mtmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            (mtmp / TABLE).write_text(results_csv(metrics))
            (mtmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")
    return {
        "step": "evaluate",
        "path": str(out),
        "output_hash": ledger["output_hash"],
        "ledger": ledger,
        "metrics": str(mdir / METRICS),
        "table": str(mdir / TABLE),
        "summary": metrics["summary"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _metrics(p: P.PipelineParams, base: dict, edited: dict, ft: dict, lam: float) -> dict:
    plan = p.edit
    per_task = {}
    for t in plan.eval_tasks():
        role = "learn" if t in plan.target_tasks() else "forget" if t in plan.forget else "control"
        row = {"role": role, "base": base[t], "edited": edited[t]}
        if t in ft:
            row["finetuned"] = ft[t]
            row["normalized"] = edited[t] / max(ft[t], 1e-9)
        per_task[t] = row
    summary: dict[str, float] = {"lambda": lam}
    targets = plan.target_tasks()
    if targets:
        summary["target_accuracy"] = sum(edited[t] for t in targets) / len(targets)
        normed = [per_task[t]["normalized"] for t in targets if "normalized" in per_task[t]]
        if normed:
            summary["target_normalized_accuracy"] = sum(normed) / len(normed)
    if plan.forget:
        summary["forget_accuracy"] = sum(edited[t] for t in plan.forget) / len(plan.forget)
    if plan.control:
        summary["control_accuracy"] = sum(edited[t] for t in plan.control) / len(plan.control)
        summary["control_retention"] = min(edited[t] / max(base[t], 1e-9) for t in plan.control)
    return {"split": "test", "tasks": per_task, "summary": summary}


def results_csv(metrics: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "role", "base", "finetuned", "edited", "normalized"])
    for t, r in metrics["tasks"].items():
        w.writerow([t, r["role"], f"{r['base']:.4f}", f"{r['finetuned']:.4f}" if "finetuned" in r else "", f"{r['edited']:.4f}", f"{r['normalized']:.4f}" if "normalized" in r else ""])
    return buf.getvalue()


def results_markdown(metrics: dict) -> str:
    lines = ["| task | role | base (zero-shot) | fine-tuned | edited | normalised |", "| --- | --- | --- | --- | --- | --- |"]
    for t, r in metrics["tasks"].items():
        ft = f"{r['finetuned']:.2%}" if "finetuned" in r else "–"
        nz = f"{r['normalized']:.2%}" if "normalized" in r else "–"
        lines.append(f"| {t} | {r['role']} | {r['base']:.2%} | {ft} | {r['edited']:.2%} | {nz} |")
    return "\n".join(lines)


def _edit_lines(ledger: dict) -> list[str]:
    lines = ["| # | vector sha256 | vector | λ | method |", "| --- | --- | --- | --- | --- |"]
    n = 0
    for e in ledger["edits"]:
        for item in e.get("merge", [e]):
            n += 1
            lines.append(f"| {n} | `{item['vector_sha256']}` | {item.get('vector', '')} | {item['lambda']:+.6g} | {e['method']} |")
    return lines


def model_card(p: P.PipelineParams, ledger: dict, metrics: dict, provenance: dict) -> str:
    plan = p.edit
    recipe = provenance["composition"].get("recipe")
    how = f"λ·{recipe['merge_method']}(τ) (mergekit recipe `{recipe['path']}`)" if recipe else f"{plan.method}(λ·τ)"
    data_lines = [f"| {t} | {d['split']} | `{d['sha256']}` | {d['rows_used']} / {d['rows_total']} | {' + '.join(d['origin']) if isinstance(d['origin'], list) else d['origin']} |" for t, d in provenance["data"].items()]
    text = f"""---
library_name: transformers
base_model: {ledger['base_model']}
tags: [taskvec, task-arithmetic, model-editing]
---

# Task-arithmetic edit of `{ledger['base_model']}`

θ = θ₀ + {how}: learn {', '.join(plan.learn) or '–'}; forget {', '.join(plan.forget) or '–'};
analogies {', '.join(f'{a.c}+({a.b}−{a.a})' for a in plan.analogies) or '–'}; controls {', '.join(plan.control) or '–'}.
λ = {metrics['summary']['lambda']:g}, chosen on the {provenance['search']['split']} split by {provenance['search']['strategy']} search
({provenance['search']['evaluations']} evaluations).

Load it with `transformers.AutoModel.from_pretrained(<this folder>)` (an encoder; sentence embeddings are the
mean-pooled, L2-normalised last hidden states) and score a task with its frozen head in `heads/<task>.safetensors`.

## Edit ledger (`taskvec.json`)

- base model: `{ledger['base_model']}`
- base content hash: `{ledger['base_hash']}`
- output content hash: `{ledger['output_hash']}`

{chr(10).join(_edit_lines(ledger))}

Composed vector (searched): `{provenance['composition']['vector_sha256']}` = {provenance['composition']['options']['method']} of
{', '.join(f"{'+' if i['sign'] > 0 else '−'}{i['task']}" for i in provenance['composition']['inputs'])}.

Rebuild and verify: `taskvec reproduce <registered model> <version>` (or `taskvec apply` with the vectors above).

## Metrics ({metrics['split']} split)

{results_markdown(metrics)}

Summary: {', '.join(f'{k} = {v:.4f}' for k, v in metrics['summary'].items())}

## Provenance

- git commit: the registered version's `git.commit` / `git.dirty` tags (kept out of this DVC-tracked card, so every checkout writes the same bytes)
- params.yaml sha256: `{provenance['params_sha256']}`
- datasets (evaluation split digests):

| task | split | sha256 | rows used / total | origin |
| --- | --- | --- | --- | --- |
{chr(10).join(data_lines)}

Training data digests, dvc.lock hashes and the Prefect flow-run id are tags of the registered model version.
"""
    return text


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0])
