"""The analogy's domain-difference variants side by side (README: "What moved the analogy").

    .venv/bin/python benchmarks/bench_analogy.py [--config benchmarks/experiments.yaml] [--out benchmarks/out/paper] [-S KEY=VALUE]…

Reuses the benchmark's cached fine-tunes (``<out>/cache``; fine-tunes what is
missing), loads the target's suite once, and for each variant of
``bench.analogy`` (objective, tensors, normalisation) searches λ on the
target's validation split and scores test once. Prints a markdown table with
the difference's norm (and its part in ``embeddings.*``), the cosine of the
two LM vectors and the share of the supervised gain recovered. ``-S``
overrides the config as ``taskvec benchmark -S`` does, e.g. ``-S 'bench.steps={}'``
(60-step LM vectors), ``-S train.mlm_decoder=copy``, ``-S train.mlm_head_steps=200``
(README: "What moved the analogy"). ``--simcse`` adds the SimCSE
variants (two SimCSE trainings: minutes each on a GPU, ~10 min each on a
loaded 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="benchmarks/experiments.yaml")
    parser.add_argument("--out", default="benchmarks/out/paper")
    parser.add_argument("--simcse", action="store_true")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.paper.domain import domain_difference
    from benchmarks.paper.spec import load_experiment_params
    from benchmarks.paper.suite import open_suite, search
    from benchmarks.paper.vectors import ensure_vector, global_norm, load_tau
    from taskvec.inspection import inspect_vectors

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", file=sys.stderr, flush=True)

    params = load_experiment_params(args.config, args.set_param)
    if params.bench.threads:
        torch.set_num_threads(params.bench.threads)
    a = params.bench.analogy
    cache = Path(args.out) / "cache"
    paths = {t: ensure_vector(params, t, cache, log) for t in (a.target, a.source, a.target_lm, a.source_lm)}
    taus = {t: load_tau(path) for t, path in paths.items()}
    lm_cosine = inspect_vectors([paths[a.target_lm], paths[a.source_lm]])["cosine"][0][1]  # the MLM vectors: one value for every mlm variant
    suite = open_suite(params, [a.target])
    t = a.target
    base = suite.accuracies("test", [t])[t]
    ft_val = suite.at(taus[t], 1.0, "validation", [t])
    supervised = suite.at(taus[t], 1.0, "test", [t])[t]
    variants = [("none (source only)", None)]
    objectives = ["mlm", "simcse"] if args.simcse else ["mlm"]
    for objective in objectives:
        for tensors in ("all", "layers"):
            for norm in ("none", "source"):
                variants.append((f"{objective}, {tensors} tensors, norm {norm}", a.model_copy(update={"domain_objective": objective, "lm_tensors": tensors, "lm_norm": norm})))
    print(f"base {100 * base:.1f}, supervised {100 * supervised:.1f} ({t} test)\n")
    print(f"overrides: {args.set_param or 'none'}; LM steps {[params.bench.steps.get(x, params.train.steps) for x in (a.target_lm, a.source_lm)]}\n")
    print("| domain difference | ‖diff‖ (embeddings.*) | cos(LM vectors) | scale | λ | test | share of the supervised gain |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, spec in variants:
        if spec is None:
            tau, scale, norms = taus[a.source], 0.0, "– | –"
        else:
            diff, how = domain_difference(spec, taus, params, cache, log)
            tau, scale = {k: taus[a.source][k] + diff[k] for k in diff}, how["scale"]
            embeddings = global_norm({k: v for k, v in diff.items() if k.startswith("embeddings.")}) / scale
            cos = lm_cosine if spec.domain_objective == "mlm" else float("nan")
            norms = f"{how['norm']['difference']:.1f} ({embeddings:.1f}) | {cos:.2f}"
        res = search(suite, params, tau, "addition", [t], reference=ft_val, label=name, log=log)
        test = suite.at(tau, res.best_lambda, "test", [t])[t]
        share = (test - base) / (supervised - base)
        print(f"| {name} | {norms} | {scale:.3f} | {res.best_lambda:g} | {100 * test:.1f} | {100 * share:.0f} % |", flush=True)


if __name__ == "__main__":
    main()
