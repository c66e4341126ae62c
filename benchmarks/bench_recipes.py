"""Bit parity of ``taskvec merge --config recipe.yml`` with mergekit 0.1.5.

1. Builds (or reuses, under ``benchmarks/out/recipe-models``) a small
   synthetic Llama (``--size-gb``, default 0.05 GB float32) and three
   fine-tuned copies (noise seeds 1–3, so three-way sums are covered) with
   :func:`benchmarks.models.build_models`.
2. Reuses bench_engine's ``.bench-venv`` (CPU torch, same version as ours, and
   ``mergekit==0.1.5``), creating it if missing.
3. For each recipe below, runs ``mergekit-yaml recipe.yml OUT`` (one thread,
   like taskvec's engine: with ``rescale`` the L1 norms are float32 reductions
   whose rounding depends on the thread count; ``ties_rescale`` is also
   compared with mergekit on all threads) and
   ``taskvec merge --config recipe.yml -o OUT`` on the same YAML and compares
   every tensor: max |Δ| and whether the weights are bit-identical.
   Deterministic methods must be bit-identical; the DARE methods draw their
   masks from different generators (mergekit: torch's global RNG; taskvec:
   per-tensor seeds), so for them only the kept fraction is compared.
4. Also compares ``taskvec merge --method ties --density K`` (weights 1) with
   mergekit's ``ties`` recipe of the same density: same ⌊k·n⌋ count, but the
   CLI breaks ties at the threshold magnitude by lower flat index (and gives a
   zero-sum sign election 0, not +), so a few entries may differ.

Usage: ``python -m benchmarks.bench_recipes [--size-gb 0.05] [--keep-outputs]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_engine import BENCH_VENV, OUT, _taskvec_cmd, ensure_mergekit
from benchmarks.models import build_models, compare


def recipes(d: dict[str, Path]) -> dict[str, str]:
    def models(params: list[str]) -> str:
        return "".join(f"  - model: {d[k]}\n    parameters: {{{p}}}\n" for k, p in zip(("ft1", "ft2", "ft3"), params))

    head = f"base_model: {d['base']}\ndtype: float32\n"
    return {
        "task_arithmetic": head + "merge_method: task_arithmetic\nparameters: {lambda: 0.9}\nmodels:\n" + models(["weight: 0.7", "weight: 0.5", "weight: -0.3"]),
        "task_arithmetic_normalize": head + "merge_method: task_arithmetic\nparameters: {normalize: true}\nmodels:\n" + models(["weight: 0.7", "weight: 0.5", "weight: 0.3"]),
        "ties": head + "merge_method: ties\nparameters: {lambda: 1.2, int8_mask: true}\nmodels:\n" + models(["weight: 1.0, density: 0.3", "weight: 0.6, density: 0.5", "weight: 0.8, density: 0.7"]),
        "ties_unnormalized": head + "merge_method: ties\nparameters: {normalize: false, density: 0.2}\nmodels:\n" + models(["weight: 0.5", "weight: 0.5"]),
        "ties_rescale": head + "merge_method: ties\nparameters: {rescale: true, density: 0.4}\nmodels:\n" + models(["weight: 1.0", "weight: 1.0", "weight: 1.0"]),
        "breadcrumbs": head + "merge_method: breadcrumbs\nmodels:\n" + models(["weight: 0.6, density: 0.8, gamma: 0.05", "weight: 0.4, density: 0.9, gamma: 0.01"]),
        "breadcrumbs_ties": head + "merge_method: breadcrumbs_ties\nparameters: {density: 0.7, gamma: 0.02}\nmodels:\n" + models(["weight: 1.0", "weight: 1.0"]),
        "dare_linear": head + "merge_method: dare_linear\nparameters: {density: 0.5}\nmodels:\n" + models(["weight: 0.5", "weight: 0.5"]),
        "dare_ties": head + "merge_method: dare_ties\nparameters: {density: 0.5}\nmodels:\n" + models(["weight: 1.0", "weight: 1.0"]),
    }


def kept_fraction(merged: Path, base: Path) -> float:
    """Fraction of entries that moved away from the base (DARE keeps ≈ 1 − (1 − density)^models)."""
    from safetensors import safe_open

    moved = total = 0
    with safe_open(base / "model.safetensors", framework="pt") as hb:
        for f in sorted(merged.glob("*.safetensors")):
            with safe_open(f, framework="pt") as hm:
                for k in hm.keys():
                    t = hm.get_tensor(k)
                    moved += int((t != hb.get_tensor(k)).sum())
                    total += t.numel()
    return moved / total


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=0.05, help="model size in GB float32 (default 0.05)")
    ap.add_argument("--only", nargs="*", help="run only these recipes")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)

    OUT.mkdir(parents=True, exist_ok=True)
    model = build_models(OUT / "recipe-models", args.size_gb, finetunes=(1, 2, 3))
    dirs = dict(model["dirs"])
    versions = ensure_mergekit()
    runs = OUT / "recipes"
    runs.mkdir(exist_ok=True)
    env = {**os.environ, "TASKVEC_CACHE_DIR": str(runs / "hash-cache"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    mk_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # taskvec's engine runs single-threaded
    tv = _taskvec_cmd()
    mk = str(BENCH_VENV / "bin" / "mergekit-yaml")
    results = {}
    for name, text in recipes(dirs).items():
        if args.only and name not in args.only:
            continue
        cfg = runs / f"{name}.yml"
        cfg.write_text(text)
        out_mk, out_tv = runs / f"{name}-mergekit", runs / f"{name}-taskvec"
        for p in (out_mk, out_tv):
            shutil.rmtree(p, ignore_errors=True)
        t_mk = run([mk, str(cfg), str(out_mk), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"], mk_env)
        t_tv = run([*tv, "merge", "--config", str(cfg), "-o", str(out_tv), "-q"], env)
        res = {**compare(out_tv, out_mk), "mergekit_s": round(t_mk, 2), "taskvec_s": round(t_tv, 2)}
        if name.startswith("dare"):
            res["kept_fraction_taskvec"] = kept_fraction(out_tv, dirs["base"])
            res["kept_fraction_mergekit"] = kept_fraction(out_mk, dirs["base"])
        if name == "ties_rescale":  # the L1 norms are float32 reductions: their rounding depends on mergekit's thread count
            out_mt = runs / f"{name}-mergekit-mt"
            shutil.rmtree(out_mt, ignore_errors=True)
            run([mk, str(cfg), str(out_mt), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"], env)
            mt = compare(out_tv, out_mt)
            res["vs_mergekit_default_threads"] = mt
            shutil.rmtree(out_mt, ignore_errors=True)
            print(f"{name + ' (mk threads=' + str(os.cpu_count()) + ')':28s} max|Δ| {mt['max_abs_diff']:.3g}  differing entries {mt['entries_differing']:,}/{mt['entries']:,}", flush=True)
        results[name] = res
        verdict = "bit-identical" if res["entries_differing"] == 0 else ("random: not compared bitwise" if name.startswith("dare") else "DIFFERENT")
        extra = f"  kept {res['kept_fraction_taskvec']:.4f} vs {res['kept_fraction_mergekit']:.4f}" if name.startswith("dare") else ""
        print(f"{name:28s} max|Δ| {res['max_abs_diff']:.3g}  differing entries {res['entries_differing']:,}/{res['entries']:,}  {verdict}{extra}", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out_tv, ignore_errors=True)
            shutil.rmtree(out_mk, ignore_errors=True)

    # the plain CLI: --method ties --density 0.2 with λ 1 equals mergekit's ties recipe with weight 1, density 0.2
    if not args.only or "cli_ties" in args.only:
        cfg = runs / "cli_ties.yml"
        cfg.write_text(f"base_model: {dirs['base']}\ndtype: float32\nmerge_method: ties\nparameters: {{density: 0.2}}\nmodels:\n  - model: {dirs['ft1']}\n    parameters: {{weight: 1}}\n  - model: {dirs['ft2']}\n    parameters: {{weight: 1}}\n")
        out_mk, out_tv = runs / "cli_ties-mergekit", runs / "cli_ties-taskvec"
        for p in (out_mk, out_tv):
            shutil.rmtree(p, ignore_errors=True)
        run([mk, str(cfg), str(out_mk), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"], mk_env)
        run([*tv, "merge", str(dirs["base"]), f"{dirs['ft1']}:1", f"{dirs['ft2']}:1", "--method", "ties", "--density", "0.2", "-o", str(out_tv), "-q"], env)
        res = compare(out_tv, out_mk)
        results["cli_ties"] = res
        print(f"{'taskvec merge --method ties -k 0.2':28s} max|Δ| {res['max_abs_diff']:.3g}  differing entries {res['entries_differing']:,}/{res['entries']:,}  vs mergekit ties (weights 1)", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out_tv, ignore_errors=True)
            shutil.rmtree(out_mk, ignore_errors=True)

    report = {"model": {k: v for k, v in model.items() if k != "dirs"}, "mergekit_venv": versions, "results": results}
    (OUT / "bench_recipes.json").write_text(json.dumps(report, indent=2) + "\n")
    deterministic_ok = all(r["entries_differing"] == 0 for n, r in results.items() if not n.startswith("dare") and n != "cli_ties")
    print(f"deterministic recipes bit-identical to mergekit {versions['mergekit']}: {'yes' if deterministic_ok else 'NO'}")
    return 0 if deterministic_ok else 1


if __name__ == "__main__":
    sys.exit(main())
