"""Experiment 1, negation: −λτ vs a random vector of the same norm vs gradient ascent on the target."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from benchmarks.paper.spec import ExperimentParams, GradientAscentSpec
from benchmarks.paper.suite import control_set, search
from benchmarks.paper.vectors import global_norm, random_like
from taskvec.data import load_split
from taskvec.search import ControlConstraint, control_constraint
from taskvec.search_run import SuiteMetrics
from taskvec.suite import Suite


def gradient_ascent(
    suite: Suite,
    params: ExperimentParams,
    target: str,
    control: str,
    spec: GradientAscentSpec,
    measure: SuiteMetrics,
    constraint: ControlConstraint,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Minimise −CE on the target's train split (frozen head), probing validation at checkpoints.

    Picks, over (lr, checkpoint), the lowest target validation accuracy whose
    control keeps ``constraint`` (the λ search's: drop upper bound ≤
    max_control_drop; ties → the earlier probe: smaller lr, then fewer steps);
    step 0 (the base) is always a feasible fallback. Returns the choice, every
    probe, and the test accuracies of the chosen weights. Restores the base.
    Runs on the harness's device: every batch and its labels go through
    ``suite.policy.to``, like the evaluation's.
    """
    from transformers import DataCollatorWithPadding

    task = params.task(target)
    train = load_split(task, params.data_root(), "train", seed=seed)
    rows = train.dataset.shuffle(seed=seed).select(range(min(len(train.dataset), spec.steps * spec.batch_size)))
    collate = DataCollatorWithPadding(suite.tokenizer)
    enc = suite.tokenizer(list(rows["text"]), truncation=True, max_length=params.train.max_length)
    labels = list(rows["label"])
    base_val = measure.base
    probes = [{"lr": 0.0, "step": 0, **measure.at_base(), "feasible": True}]
    best = (base_val[target], 0, 0.0)
    best_state = None
    model = suite.models[target]
    started = time.perf_counter()
    for lr in spec.lrs:
        suite.reset()
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(suite.encoder.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for step in range(1, spec.steps + 1):
            lo = ((step - 1) * spec.batch_size) % len(labels)
            idx = list(range(lo, min(lo + spec.batch_size, len(labels))))
            batch = suite.policy.batch(collate([{k: enc[k][i] for k in enc} for i in idx]))
            out = model(**batch, labels=suite.policy.to(torch.tensor([labels[i] for i in idx])))
            (-out.loss).backward()
            torch.nn.utils.clip_grad_norm_(suite.encoder.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step in spec.checkpoints:
                acc = measure()
                feasible = constraint.ok(acc)
                probes.append({"lr": lr, "step": step, **acc, "feasible": bool(feasible)})
                if feasible and acc[target] < best[0]:
                    best = (acc[target], step, lr)
                    best_state = {k: v.detach().clone() for k, v in suite.encoder.state_dict().items()}
                model.train()
        model.eval()
    log(f"[ascent] {target}: best lr {best[2]:g} step {best[1]} (val target {best[0]:.4f}, {time.perf_counter() - started:.0f}s)")
    if best_state is not None:
        suite.encoder.load_state_dict(best_state)
    test = suite.accuracies("test", [target, control])
    val = {target: best[0], control: next(p[control] for p in probes if p["step"] == best[1] and p["lr"] == best[2])}
    suite.reset()
    return {"lr": best[2] if best[1] else None, "steps": best[1], "validation": val, "test": test, "probes": probes}  # lr None: the base was kept


def run_negation(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    neg = params.bench.negation
    assert neg is not None
    control, spec = neg.control, params.search
    results = {}
    for target in neg.targets:
        tasks = [target, control]
        measure = SuiteMetrics(suite, "validation", [target], [control], control_split=control_set(params, [control]))
        constraint = control_constraint([control], measure.base, spec.max_control_drop, confidence=spec.control_confidence)
        base_val, base_test = measure.base, suite.accuracies("test", tasks)
        tau = taus[target]
        rows = {"base": {"lambda": None, "validation": base_val, "test": base_test}}
        r_ft = suite.at(tau, 1.0, "test", tasks)
        rows["fine-tuned (+τ)"] = {"lambda": 1.0, "validation": suite.at(tau, 1.0, "validation", tasks), "test": r_ft}
        res = search(suite, params, tau, "negation", [target], controls=[control], sign=-1.0, curve_dir=out / "curves" / f"negation-{target}", label=f"negate τ_{target}", log=log)
        rows["negated task vector (−λτ)"] = {"lambda": res.best_lambda, "validation": res.best_metrics, "test": suite.at(tau, -res.best_lambda, "test", tasks)}
        rnd = random_like(tau, params.bench.seed, neg.random_norm)
        res_r = search(suite, params, rnd, "negation", [target], controls=[control], sign=-1.0, curve_dir=out / "curves" / f"negation-{target}-random", label=f"negate random ‖τ_{target}‖", log=log)
        rows["random vector, same norm (−λr)"] = {"lambda": res_r.best_lambda, "validation": res_r.best_metrics, "test": suite.at(rnd, -res_r.best_lambda, "test", tasks)}
        ga = gradient_ascent(suite, params, target, control, neg.gradient_ascent, measure, constraint, params.bench.seed, log)
        rows["gradient ascent"] = {"lambda": None, "lr": ga["lr"], "steps": ga["steps"], "validation": ga["validation"], "test": ga["test"], "probes": ga["probes"]}
        results[target] = {
            "control": control,
            "constraint": constraint.describe(),
            "tau_norm": global_norm(tau),
            "rows": rows,
            "searches": {"task_vector": res.to_dict(), "random": res_r.to_dict()},
        }
    return results
