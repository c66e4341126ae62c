"""The paper's three experiments (Ilharco et al., ICLR 2023) on small text encoders.

One entry point, :func:`run_benchmark`, regenerates ``results.md``,
``results.json`` and PNG plots from a config such as
``benchmarks/experiments.yaml`` (:class:`ExperimentParams` = :class:`Params`
plus a ``bench`` section):

1. **Negation** — for each target (``offensive``, ``sst2``): base vs
   ``θ − λ·τ_target`` vs ``θ − λ·r`` (``r`` a seeded Gaussian vector with the
   same per-tensor or global norm as ``τ_target``) vs gradient ascent on the
   target (−cross-entropy, AdamW; learning rate and step count chosen among
   validation probes). λ and the ascent checkpoint minimise the target's
   validation accuracy subject to the control (``agnews``) keeping ≥ 0.95 ×
   its base validation accuracy (the paper's criterion).
2. **Addition** — the vectors of ``sst2, agnews, sms_spam, offensive``
   merged by task arithmetic (sum), TIES (top-k density), DARE (drop p,
   rescale) and DARE-TIES; each merge is built with unit weights and a single
   scale λ is searched to maximise mean normalised validation accuracy
   (accuracy / the task's own fine-tuned validation accuracy).
3. **Analogy** — ``τ_yelp ≈ τ_amazon + (τ_yelp_lm − τ_amazon_lm)``; λ
   maximises Yelp validation accuracy; compared on the Yelp test split with
   the base, the amazon-only vector and supervised Yelp fine-tuning.

Selection uses validation rows only; test rows are scored once per final
model and never compared to choose anything.

Recipe (the paper's, for text encoders): each task vector covers the encoder
only; every task is scored with its own *frozen* zero-shot head built from the
*base* encoder's embeddings of its label descriptions (:mod:`taskvec.heads`),
so the base has a measurable zero-shot accuracy. Fine-tunes go through
:func:`taskvec.train.finetune_task`, vectors through :func:`taskvec.engine.extract`;
both are cached under ``<out>/cache`` keyed by a hash of base, task spec and
budget, so a re-run only re-does the (cheap) searches and evaluations. All
weight edits happen in place on one loaded encoder (:class:`taskvec.search.WeightEditor`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from taskvec import methods
from taskvec.config import MergeMethod, Params, SearchSpec, TrainSpec, _Strict, check_merge_options, load_params, merge_option
from taskvec.data import load_split
from taskvec.errors import TaskvecError
from taskvec.evaluate import EvalSet, score
from taskvec.heads import EncoderClassifier, build_head, load_encoder
from taskvec.io import resolve_model

# ---------------------------------------------------------------------------
# Config


class GradientAscentSpec(_Strict):
    lrs: list[float] = Field(default_factory=lambda: [1e-5, 3e-5])
    steps: int = Field(default=40, ge=1)
    checkpoints: list[int] = Field(default_factory=lambda: [5, 10, 20, 30, 40])
    batch_size: int = Field(default=16, ge=1)


class NegationSpec(_Strict):
    targets: list[str] = Field(default_factory=lambda: ["offensive", "sst2"])
    control: str = "agnews"
    random_norm: Literal["per_tensor", "global"] = "per_tensor"
    gradient_ascent: GradientAscentSpec = Field(default_factory=GradientAscentSpec)


class MethodSpec(_Strict):
    """A merge method and its options, checked by the registry in taskvec.methods (as the engine checks them)."""

    name: str
    method: MergeMethod
    density: merge_option("density") = methods.OPTIONS["density"].default
    drop: merge_option("drop") = methods.OPTIONS["drop"].default

    @model_validator(mode="after")
    def _check_options(self) -> MethodSpec:
        check_merge_options(self.method, density=self.density, drop=self.drop)
        return self


class AdditionSpec(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["sst2", "agnews", "sms_spam", "offensive"])
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [
            MethodSpec(name="task_arithmetic", method="sum"),
            MethodSpec(name="ties", method="ties", density=0.2),
            MethodSpec(name="dare", method="dare", drop=0.5),
            MethodSpec(name="dare_ties", method="dare_ties", drop=0.5),
        ]
    )


class AnalogySpec(_Strict):
    target: str = "yelp"
    source: str = "amazon"
    target_lm: str = "yelp_lm"
    source_lm: str = "amazon_lm"


class QuickSpec(_Strict):
    steps: int = 6
    validation_rows: int = 48
    test_rows: int = 64
    ga_steps: int = 4
    max_evals: int = 4


class BenchSpec(_Strict):
    seed: int = 0
    threads: int = Field(default=0, ge=0)  # torch intra-op threads; 0 = torch's default
    steps: dict[str, int] = Field(default_factory=dict)  # per-task override of train.steps
    negation: NegationSpec | None = Field(default_factory=NegationSpec)
    addition: AdditionSpec | None = Field(default_factory=AdditionSpec)
    analogy: AnalogySpec | None = Field(default_factory=AnalogySpec)
    quick: QuickSpec = Field(default_factory=QuickSpec)


class ExperimentParams(Params):
    bench: BenchSpec = Field(default_factory=BenchSpec)


def load_experiment_params(path: str | Path) -> ExperimentParams:
    return load_params(path, model=ExperimentParams)


def quick_params(params: ExperimentParams) -> ExperimentParams:
    """The same experiments with smoke-test budgets (``--quick``)."""
    p = copy.deepcopy(params)
    q = p.bench.quick
    p.train = TrainSpec.model_validate(p.train.model_dump() | {"steps": q.steps})
    p.bench.steps = {}
    p.eval.max_rows.validation = q.validation_rows
    p.eval.max_rows.test = q.test_rows
    p.search = SearchSpec.model_validate(p.search.model_dump() | {"max_evals": q.max_evals})
    if p.bench.negation is not None:
        ga = p.bench.negation.gradient_ascent
        ga.steps = q.ga_steps
        ga.checkpoints = sorted({max(1, q.ga_steps // 2), q.ga_steps})
        ga.lrs = ga.lrs[:1]
    return p


def needed_tasks(params: ExperimentParams) -> tuple[list[str], list[str]]:
    """(tasks to fine-tune, classification tasks to score)."""
    b = params.bench
    ft: list[str] = []
    scored: list[str] = []
    if b.negation:
        ft += b.negation.targets
        scored += [*b.negation.targets, b.negation.control]
    if b.addition:
        ft += b.addition.tasks
        scored += b.addition.tasks
    if b.analogy:
        a = b.analogy
        ft += [a.target, a.source, a.target_lm, a.source_lm]
        scored += [a.target]
    ft = list(dict.fromkeys(ft))
    scored = list(dict.fromkeys(scored))
    for name in [*ft, *scored]:
        params.task(name)
    return ft, scored


# ---------------------------------------------------------------------------
# Fine-tunes and vectors (cached)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _code_and_data(spec, params: ExperimentParams) -> dict[str, str]:
    """sha256 of the training code and of the task's data files: a change to either invalidates the cache."""
    from taskvec import data, heads, train
    from taskvec.io import file_sha256

    out = {Path(m.__file__).name: file_sha256(m.__file__) for m in (data, heads, train)}
    source = data.resolve_source(spec, params.data_root())
    if source.kind == "mirror":
        out |= {f.name: file_sha256(f) for f in sorted(Path(source.location).glob("*.csv"))}
    else:
        out["source"] = str(source.location)
    return out


def train_spec_for(params: ExperimentParams, task: str) -> TrainSpec:
    steps = params.bench.steps.get(task)
    return params.train if steps is None else TrainSpec.model_validate(params.train.model_dump() | {"steps": steps})


def ensure_vector(params: ExperimentParams, task: str, cache: Path, log: Callable[[str], None]) -> Path:
    """Fine-tune ``task`` (unless cached) and extract its encoder task vector (unless cached)."""
    from taskvec.engine import extract
    from taskvec.train import MANIFEST, finetune_task

    spec = params.task(task)
    train = train_spec_for(params, task)
    key = _key(params.base, str(resolve_model(params.base)), spec.model_dump(), train.model_dump(), str(params.data_root()), _code_and_data(spec, params))
    ft_dir = cache / "finetune" / f"{task}-{key}"
    vec = cache / "vectors" / f"{task}-{key}.safetensors"
    if vec.is_file():
        log(f"[cache] vector {task} ({vec.name})")
        return vec
    if not (ft_dir / MANIFEST).is_file():
        log(f"[finetune] {task} ({spec.kind}, {train.steps} steps × {train.batch_size}, lr {train.lr:g}) ...")
        result = finetune_task(params.base, spec, train, ft_dir, data_dir=params.data_root(), progress=False)
        losses = result.losses
        first_last = f"loss {losses[0][1]:.3f} → {losses[-1][1]:.3f}" if losses else ""
        log(f"[finetune] {task} done in {result.seconds:.0f}s {first_last}")
    else:
        log(f"[cache] fine-tune {task}")
    vec.parent.mkdir(parents=True, exist_ok=True)
    extract(resolve_model(params.base), ft_dir, vec)
    return vec


def load_tau(path: Path) -> dict[str, torch.Tensor]:
    from taskvec.vector import TaskVector

    return TaskVector.load(path).tensors


def random_like(tau: Mapping[str, torch.Tensor], seed: int, norm: str = "per_tensor") -> dict[str, torch.Tensor]:
    """Seeded Gaussian vector with the same per-tensor (or global) L2 norm as ``tau``."""
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(t.shape, generator=gen, dtype=torch.float32) for name, t in sorted(tau.items())}
    if norm == "per_tensor":
        for name, r in out.items():
            target = float(tau[name].float().norm())
            r.mul_(target / max(float(r.norm()), 1e-12))
    else:
        target = math.sqrt(sum(float(t.float().pow(2).sum()) for t in tau.values()))
        have = math.sqrt(sum(float(r.pow(2).sum()) for r in out.values()))
        for r in out.values():
            r.mul_(target / max(have, 1e-12))
    return out


def merge_vectors(taus: Sequence[Mapping[str, torch.Tensor]], method: MethodSpec, seed: int) -> dict[str, torch.Tensor]:
    """Merge with unit weights through the engine's per-tensor algebra (λ is searched afterwards)."""
    from taskvec.engine import MergeOptions

    # the benchmark's seed goes to the methods that take one (MethodSpec already refused options a method does not take)
    options = MergeOptions(method=method.method, density=method.density, drop=method.drop, seed=seed if methods.takes(method.method, "seed") else 0)
    names = sorted(taus[0])
    return {name: options.combine(name, [t[name] for t in taus], [1.0] * len(taus)) for name in names}


def global_norm(tau: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tau.values()))


# ---------------------------------------------------------------------------
# Evaluation suite: one encoder, frozen base heads, tokenised validation + test splits


class Suite:
    """The base encoder loaded once, each task's frozen base head, validation and test eval sets."""

    def __init__(self, params: ExperimentParams, tasks: Sequence[str]):
        self.params = params
        encoder, tokenizer, _ = load_encoder(params.base, dtype=torch.float32)
        self.encoder, self.tokenizer = encoder, tokenizer
        length, bs = params.eval.max_length, params.eval.batch_size
        self.models: dict[str, EncoderClassifier] = {}
        self.sets: dict[str, dict[str, EvalSet]] = {"validation": {}, "test": {}}
        for name in tasks:
            spec = params.task(name)
            head = build_head(encoder, tokenizer, name, spec.labels, spec.head_texts, max_length=length)
            self.models[name] = EncoderClassifier(encoder, head)
            for split in ("validation", "test"):
                data = load_split(spec, params.data_root(), split, max_rows=params.eval.max_rows.get(split), seed=params.eval.seed)
                self.sets[split][name] = EvalSet.build(data, tokenizer, batch_size=bs, max_length=length)
        self.base_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}

    def acc(self, split: str, tasks: Sequence[str]) -> dict[str, float]:
        return {t: score(self.models[t], self.sets[split][t])["accuracy"] for t in tasks}

    def editor(self, tau: Mapping[str, torch.Tensor]):
        from taskvec.search import WeightEditor

        return WeightEditor(self.encoder, tau)

    def at(self, tau: Mapping[str, torch.Tensor], lam: float, split: str, tasks: Sequence[str]) -> dict[str, float]:
        with self.editor(tau) as ed:
            ed.apply(lam)
            return self.acc(split, tasks)

    def reset(self) -> None:
        self.encoder.load_state_dict(self.base_state)

    def lineage(self) -> dict:
        return {split: {t: s.lineage for t, s in sets.items()} for split, sets in self.sets.items()}


def search(
    suite: Suite,
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
):
    """λ search on VALIDATION with taskvec.search's objectives and golden/grid strategy."""
    from taskvec.search import CachedEvaluator, addition_objective, negation_objective, search_lambda, write_outputs

    spec = suite.params.search
    every = list(dict.fromkeys([*tasks, *controls]))
    signed = {k: sign * v for k, v in tau.items()}
    started = time.perf_counter()
    with suite.editor(signed) as ed:

        def evaluate(lam: float) -> dict[str, float]:
            ed.apply(lam)
            return suite.acc("validation", every)

        cached = CachedEvaluator(evaluate)
        if objective_name == "addition":
            goal = addition_objective(tasks, reference or {})
        else:
            goal = negation_objective(tasks, controls, cached(0.0), spec.control_threshold)
        result = search_lambda(cached, goal, spec)
    if curve_dir is not None:
        write_outputs(result, curve_dir)
    log(f"[search] {label}: λ = {result.best_lambda:g} (val score {result.best_score:.4f}, {len(result.evaluations)} evals, {time.perf_counter() - started:.0f}s)")
    return result


# ---------------------------------------------------------------------------
# Gradient-ascent baseline


def gradient_ascent(
    suite: Suite,
    target: str,
    control: str,
    spec: GradientAscentSpec,
    base_val: Mapping[str, float],
    threshold: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> dict:
    """Minimise −CE on the target's train split (frozen head), probing validation at checkpoints.

    Picks, over (lr, checkpoint), the lowest target validation accuracy with
    control ≥ threshold × base control (ties → the earlier probe: smaller lr, then fewer steps);
    step 0 (the base) is always a feasible fallback. Returns the choice, every
    probe, and the test accuracies of the chosen weights. Restores the base.
    """
    from transformers import DataCollatorWithPadding

    params = suite.params
    task = params.task(target)
    train = load_split(task, params.data_root(), "train", seed=seed)
    rows = train.dataset.shuffle(seed=seed).select(range(min(len(train.dataset), spec.steps * spec.batch_size)))
    collate = DataCollatorWithPadding(suite.tokenizer)
    enc = suite.tokenizer(list(rows["text"]), truncation=True, max_length=params.train.max_length)
    labels = list(rows["label"])
    floor = threshold * base_val[control]
    probes = [{"lr": 0.0, "step": 0, **{k: base_val[k] for k in (target, control)}, "feasible": True}]
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
            batch = collate([{k: enc[k][i] for k in enc} for i in idx])
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=torch.tensor([labels[i] for i in idx]))
            (-out.loss).backward()
            torch.nn.utils.clip_grad_norm_(suite.encoder.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step in spec.checkpoints:
                acc = suite.acc("validation", [target, control])
                feasible = acc[control] >= floor
                probes.append({"lr": lr, "step": step, **acc, "feasible": bool(feasible)})
                if feasible and acc[target] < best[0]:
                    best = (acc[target], step, lr)
                    best_state = {k: v.detach().clone() for k, v in suite.encoder.state_dict().items()}
                model.train()
        model.eval()
    log(f"[ascent] {target}: best lr {best[2]:g} step {best[1]} (val target {best[0]:.4f}, {time.perf_counter() - started:.0f}s)")
    if best_state is not None:
        suite.encoder.load_state_dict(best_state)
    test = suite.acc("test", [target, control])
    val = {target: best[0], control: next(p[control] for p in probes if p["step"] == best[1] and p["lr"] == best[2])}
    suite.reset()
    return {"lr": best[2], "steps": best[1], "validation": val, "test": test, "probes": probes}


# ---------------------------------------------------------------------------
# The three experiments


def run_negation(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    neg = params.bench.negation
    assert neg is not None
    control, thr = neg.control, params.search.control_threshold
    results = {}
    for target in neg.targets:
        tasks = [target, control]
        base_val, base_test = suite.acc("validation", tasks), suite.acc("test", tasks)
        tau = taus[target]
        rows = {"base": {"lambda": None, "validation": base_val, "test": base_test}}
        r_ft = suite.at(tau, 1.0, "test", tasks)
        rows["fine-tuned (+τ)"] = {"lambda": 1.0, "validation": suite.at(tau, 1.0, "validation", tasks), "test": r_ft}
        res = search(suite, tau, "negation", [target], controls=[control], sign=-1.0, curve_dir=out / "curves" / f"negation-{target}", label=f"negate τ_{target}", log=log)
        rows["negated task vector (−λτ)"] = {"lambda": res.best_lambda, "validation": res.best_metrics, "test": suite.at(tau, -res.best_lambda, "test", tasks)}
        rnd = random_like(tau, params.bench.seed, neg.random_norm)
        res_r = search(suite, rnd, "negation", [target], controls=[control], sign=-1.0, curve_dir=out / "curves" / f"negation-{target}-random", label=f"negate random ‖τ_{target}‖", log=log)
        rows["random vector, same norm (−λr)"] = {"lambda": res_r.best_lambda, "validation": res_r.best_metrics, "test": suite.at(rnd, -res_r.best_lambda, "test", tasks)}
        ga = gradient_ascent(suite, target, control, neg.gradient_ascent, base_val, thr, params.bench.seed, log)
        rows["gradient ascent"] = {"lambda": None, "lr": ga["lr"], "steps": ga["steps"], "validation": ga["validation"], "test": ga["test"], "probes": ga["probes"]}
        results[target] = {
            "control": control,
            "control_floor_validation": thr * base_val[control],
            "tau_norm": global_norm(tau),
            "rows": rows,
            "searches": {"task_vector": res.to_dict(), "random": res_r.to_dict()},
        }
    return results


def run_addition(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    add = params.bench.addition
    assert add is not None
    tasks = add.tasks
    base_val, base_test = suite.acc("validation", tasks), suite.acc("test", tasks)
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
        res = search(suite, merged, "addition", tasks, reference=ft_val, curve_dir=out / "curves" / f"addition-{m.name}", label=f"addition {m.name}", log=log)
        rows[m.name] = {"lambda": res.best_lambda, "method": m.model_dump(), "validation": res.best_metrics, "test": suite.at(merged, res.best_lambda, "test", tasks)}
        searches[m.name] = res.to_dict()
    for row in rows.values():
        row["normalized_test"] = {t: row["test"][t] / ft_test[t] for t in tasks}
        row["mean_test"] = float(np.mean([row["test"][t] for t in tasks]))
        row["mean_normalized_test"] = float(np.mean(list(row["normalized_test"].values())))
    return {"tasks": tasks, "rows": rows, "searches": searches}


def run_analogy(suite: Suite, taus: Mapping[str, dict], params: ExperimentParams, out: Path, log) -> dict:
    a = params.bench.analogy
    assert a is not None
    t = a.target
    analog = {k: taus[a.source][k] + taus[a.target_lm][k] - taus[a.source_lm][k] for k in taus[a.source]}
    ft_val = suite.at(taus[t], 1.0, "validation", [t])
    rows = {
        "base (zero-shot)": {"lambda": None, "validation": suite.acc("validation", [t]), "test": suite.acc("test", [t])},
        f"supervised {t} fine-tune (τ_{t})": {"lambda": 1.0, "validation": ft_val, "test": suite.at(taus[t], 1.0, "test", [t])},
    }
    searches = {}
    for name, tau in ((f"τ_{a.source} only", taus[a.source]), (f"analogy τ_{a.source} + (τ_{a.target_lm} − τ_{a.source_lm})", analog)):
        slug = "source-only" if "only" in name else "analogy"
        res = search(suite, tau, "addition", [t], reference=ft_val, curve_dir=out / "curves" / f"analogy-{slug}", label=f"analogy {slug}", log=log)
        rows[name] = {"lambda": res.best_lambda, "validation": res.best_metrics, "test": suite.at(tau, res.best_lambda, "test", [t])}
        searches[slug] = res.to_dict()
    return {"target": t, "rows": rows, "searches": searches}


# ---------------------------------------------------------------------------
# Report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _lam(row: dict) -> str:
    if row.get("steps") is not None:
        return f"lr {row['lr']:g}, {row['steps']} steps"
    return "–" if row.get("lambda") is None else f"{row['lambda']:g}"


def render_markdown(results: dict) -> str:
    lines: list[str] = []
    meta = results["meta"]
    lines += [
        "# Task arithmetic on all-MiniLM-L6-v2 — paper experiments",
        "",
        f"Base `{meta['base']}`; fine-tunes: {meta['train']['steps']} steps × batch {meta['train']['batch_size']}, lr {meta['train']['lr']:g}, max_length {meta['train']['max_length']}; "
        f"rows: validation ≤ {meta['eval_rows']['validation']}, test ≤ {meta['eval_rows']['test']} per task. "
        f"λ on linspace({meta['search']['lambda_min']:g}, {meta['search']['lambda_max']:g}, {meta['search']['grid_points']}) by {meta['search']['strategy']} search on **validation**; all numbers below are **test** accuracy (%) unless marked. "
        f"Wall time {meta['seconds'] / 60:.1f} min{' (--quick smoke budget: numbers are not meaningful)' if meta['quick'] else ''}.",
        "",
    ]
    if "negation" in results:
        lines += ["## 1. Negation (forgetting a task)", "",
                  "λ / gradient-ascent checkpoint minimise target validation accuracy subject to control validation accuracy ≥ 95% of the base's.", ""]
        for target, res in results["negation"].items():
            c = res["control"]
            base_c = res["rows"]["base"]["test"][c]
            lines += [f"### Target `{target}`, control `{c}`", "",
                      f"| method | λ / budget | {target} acc ↓ | {c} acc | {c} / base | {target} val | {c} val |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
            for name, row in res["rows"].items():
                lines.append(
                    f"| {name} | {_lam(row)} | {_pct(row['test'][target])} | {_pct(row['test'][c])} | {_pct(row['test'][c] / base_c)} | "
                    f"{_pct(row['validation'][target])} | {_pct(row['validation'][c])} |"
                )
            lines.append("")
    if "addition" in results:
        add = results["addition"]
        tasks = add["tasks"]
        lines += ["## 2. Addition (one model for " + ", ".join(f"`{t}`" for t in tasks) + ")", "",
                  "Absolute test accuracy (%) and, in parentheses, normalised accuracy = accuracy / the task's own fine-tuned test accuracy (%). "
                  "λ maximises mean normalised **validation** accuracy.", "",
                  "| method | λ | " + " | ".join(tasks) + " | mean abs | mean norm |",
                  "| --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
        for name, row in add["rows"].items():
            m = row.get("method") or {}
            extra = f" (density {m['density']:g})" if m.get("method") == "ties" else (f" (p = {m['drop']:g})" if m.get("method") in ("dare", "dare_ties") else "")
            cells = " | ".join(f"{_pct(row['test'][t])} ({_pct(row['normalized_test'][t])})" for t in tasks)
            lines.append(f"| {name}{extra} | {_lam(row)} | {cells} | {_pct(row['mean_test'])} | {_pct(row['mean_normalized_test'])} |")
        lines.append("")
    if "analogy" in results:
        an = results["analogy"]
        t = an["target"]
        lines += ["## 3. Analogy (τ_yelp ≈ τ_amazon + (τ_yelp_lm − τ_amazon_lm))", "",
                  f"λ maximises `{t}` **validation** accuracy; no labelled `{t}` data is used by the analogy vector.", "",
                  f"| model | λ | {t} test acc | {t} val acc |", "| --- | --- | ---: | ---: |"]
        for name, row in an["rows"].items():
            lines.append(f"| {name} | {_lam(row)} | {_pct(row['test'][t])} | {_pct(row['validation'][t])} |")
        lines.append("")
    lines += ["Regenerate: `taskvec benchmark --config benchmarks/experiments.yaml --out benchmarks/out/paper` "
              "(or `python benchmarks/paper_experiments.py`); fine-tunes and vectors are cached under `<out>/cache`.", ""]
    return "\n".join(lines)


def plot_bars(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
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
        fig.tight_layout()
        fig.savefig(out / "negation.png", dpi=120)
        plt.close(fig)
        written.append(out / "negation.png")
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
        fig.tight_layout()
        fig.savefig(out / "addition.png", dpi=120)
        plt.close(fig)
        written.append(out / "addition.png")
    if "analogy" in results:
        an = results["analogy"]
        names = list(an["rows"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(names)), [100 * an["rows"][n]["test"][an["target"]] for n in names], color="tab:green")
        ax.set_xticks(range(len(names)), [n.split(" (")[0][:40] for n in names], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(f"{an['target']} test accuracy (%)")
        ax.set_title("task analogy")
        fig.tight_layout()
        fig.savefig(out / "analogy.png", dpi=120)
        plt.close(fig)
        written.append(out / "analogy.png")
    return written


# ---------------------------------------------------------------------------
# Entry point


def run_benchmark(
    config: str | Path = "benchmarks/experiments.yaml",
    out: str | Path = "benchmarks/out/paper",
    *,
    quick: bool = False,
    params: ExperimentParams | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the configured experiments; write results.md / results.json / *.png into ``out``."""
    started = time.perf_counter()
    params = params or load_experiment_params(config)
    if quick:
        params = quick_params(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    if params.bench.threads:
        torch.set_num_threads(params.bench.threads)
    torch.manual_seed(params.bench.seed)
    ft_tasks, scored = needed_tasks(params)
    if not scored:
        raise TaskvecError("nothing to run: the bench section enables no experiment")
    log(f"[bench] fine-tunes: {', '.join(ft_tasks)}; scored tasks: {', '.join(scored)}")
    vec_paths = {t: ensure_vector(params, t, cache, log) for t in ft_tasks}
    taus = {t: load_tau(p) for t, p in vec_paths.items()}
    t0 = time.perf_counter()
    suite = Suite(params, scored)
    log(f"[bench] evaluation suite ready in {time.perf_counter() - t0:.0f}s")
    results: dict = {}
    timings: dict = {"finetune_and_extract": round(t0 - started, 1)}
    for name, fn, enabled in (
        ("negation", run_negation, params.bench.negation),
        ("addition", run_addition, params.bench.addition),
        ("analogy", run_analogy, params.bench.analogy),
    ):
        if not enabled:
            continue
        t1 = time.perf_counter()
        log(f"[bench] {name} ...")
        results[name] = fn(suite, taus, params, out, log)
        suite.reset()
        timings[name] = round(time.perf_counter() - t1, 1)
    results["meta"] = {
        "base": params.base,
        "config": str(config),
        "quick": quick,
        "train": params.train.model_dump(),
        "train_steps_override": params.bench.steps,
        "eval_rows": {"validation": params.eval.max_rows.validation, "test": params.eval.max_rows.test},
        "search": params.search.model_dump(),
        "vectors": {t: {"path": str(p), "norm": global_norm(taus[t])} for t, p in vec_paths.items()},
        "data": suite.lineage(),
        "timings_s": timings,
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "selection": "λ, gradient-ascent lr/steps chosen on validation only; test scored once per final model",
    }
    md = render_markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(md)
    plot_bars(results, out)
    return results
