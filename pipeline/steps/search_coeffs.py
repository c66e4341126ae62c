"""The search step's learned-coefficient strategies: ``search.strategy: per_task | adamerging``.

Both work on the composition's *inputs* (``compose.json``: each task vector
with its sign) rather than the one composed vector, and need
``edit.method: sum`` (θ = θ₀ + Σ λ·s·τ; TIES/DARE are not linear in the
inputs' weights).

* ``per_task`` — :func:`taskvec.coefficients.per_task_search` on the step's
  objective (controls as a constraint), ``search.max_evals`` evaluations in
  all. ``best.json`` gets ``lambdas``: one λ per composition input, in order;
  the evaluate step applies input ``i`` with ``lambdas[i] · sign_i``, so the
  edit ledger lists each vector with its own λ.
* ``adamerging`` — :func:`taskvec.adamerging.adamerge_suite` on the
  unlabelled ``search.split`` texts of the plan's targets and controls
  (``search.adamerging`` options). The learned coefficients are per layer, so
  they cannot be one λ per ledger entry: each input ``i`` becomes a scaled
  vector ``s_i·Σ_g λ_{g,i}·τ_i[g]`` written to ``outputs/search/vectors/``
  (its header records the source vector and the coefficients), and
  ``best.json`` lists them (``vectors``: path, sha256, λ = 1) for the
  evaluate and register steps. If the learned model breaks a control floor,
  the step says so and falls back to the global golden-section λ.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import params as P
from pipeline.portable import rel
from taskvec.errors import TaskvecError

VECTORS = "vectors"


def _inputs(p: P.PipelineParams, suite) -> tuple[list[dict], list[dict]]:
    from pipeline.steps.compose import RECORD
    from pipeline.steps.search import load_tau

    record_file = P.edit_dir(p) / RECORD
    if not record_file.is_file():
        raise TaskvecError(f"{record_file} not found (run the compose step first)")
    inputs = json.loads(record_file.read_text())["inputs"]
    taus = []
    for item in inputs:
        path = P.vector_path(p, item["task"])
        if not path.is_file():
            raise TaskvecError(f"task vector of {item['task']} not found: {path}")
        sign = float(item["sign"])
        taus.append({k: sign * v for k, v in load_tau(path, suite.encoder).items()})
    return inputs, taus


def learned_search(p: P.PipelineParams, suite, objective, out: Path, measure):
    """Run ``p.search.strategy`` (per_task | adamerging); returns (SearchResult, extra best.json fields, files to write).

    ``measure`` is the search step's :class:`taskvec.search_run.SuiteMetrics`:
    every candidate is scored with it, so the control constraint holds on the
    upper bound of each control's drop, as in the golden and grid searches.
    """
    from taskvec.coefficients import per_task_search, suite_evaluator

    if p.edit.method != "sum":
        raise TaskvecError(f"search.strategy {p.search.strategy} needs edit.method: sum (got {p.edit.method})")
    inputs, taus = _inputs(p, suite)
    labels = [f"{'+' if float(i['sign']) > 0 else '-'}{i['task']}" for i in inputs]
    tasks = list(suite.heads)
    if p.search.strategy == "per_task":
        found = per_task_search(suite_evaluator(suite, taus, p.search.split, tasks, measure), len(taus), objective, p.search, labels=labels)
        return found, {"lambdas": [found.details["lambdas"][label] for label in labels]}, {}
    return _adamerging(p, suite, objective, inputs, taus, labels, out, measure)


def _adamerging(p, suite, objective, inputs, taus, labels, out: Path, measure):
    from taskvec.adamerging import adamerge_suite, edit_delta, group_of
    from taskvec.search import SearchResult, search_lambda
    from taskvec.search_run import compose

    if p.edit.forget:
        raise TaskvecError("search.strategy adamerging minimises prediction entropy: it cannot forget (edit.forget must be empty)")
    spec = p.search.adamerging
    tasks = [*p.edit.target_tasks(), *p.edit.control]
    res = adamerge_suite(suite, taus, tasks, spec, split=p.search.split, labels=labels)
    with suite.editor(edit_delta(taus, res.coefficients, res.groups, spec.granularity)) as editor:
        editor.apply(1.0)
        metrics = measure()
    record = res.to_dict()
    if not objective.feasible(metrics):
        with suite.editor(compose([(t, 1.0) for t in taus])) as editor:
            found = search_lambda(lambda lam: (editor.apply(lam), measure())[1], objective, p.search.model_copy(update={"strategy": "golden"}))
        found.details["adamerging"] = record | {"feasible": False, "metrics": metrics}
        found.details["note"] = "the AdaMerging coefficients break a control floor; fell back to one golden-section λ"
        return found, {"lambdas": [found.best_lambda] * len(taus), "adamerging": found.details["adamerging"], "note": found.details["note"]}, {}
    evaluation = {"lambda": float(res.coefficients.mean()), "score": objective.value(metrics), "feasible": True, "metrics": metrics}
    found = SearchResult("adamerging", objective.name, evaluation["lambda"], evaluation["score"], metrics, [evaluation], res.seconds, details={"adamerging": record})
    index = {g: k for k, g in enumerate(res.groups)}
    files = {}
    for j, (item, label) in enumerate(zip(inputs, labels, strict=True)):
        scaled = {n: float(res.coefficients[index[group_of(n, spec.granularity)], j]) * t for n, t in taus[j].items()}
        files[f"{VECTORS}/{j}-{item['task']}.safetensors"] = (item, label, scaled, res.table()[label])
    return found, {"adamerging": record}, files


def write_scaled(p: P.PipelineParams, tmp: Path, out: Path, files: dict) -> list[dict]:
    """Write the AdaMerging-scaled vectors into ``tmp`` (the search folder being built); their entries for best.json."""
    from taskvec.vector import VectorFile, VectorHeader, VectorWriter

    entries = []
    for name, (item, label, tensors, coefficients) in files.items():
        with VectorFile(P.vector_path(p, item["task"])) as source:
            names, shapes = list(source.names), source.shapes()
            header = VectorHeader(
                base_model=source.base_model,
                base_hash=source.base_hash,
                recipe={"op": "adamerging", "input": source.sha256, "sign": float(item["sign"]), "coefficients": coefficients},
            )
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with VectorWriter(path, {n: shapes[n] for n in names}, header) as writer:
            for n in names:
                writer.write(n, tensors[n].detach().cpu().contiguous())
        entries.append({"task": item["task"], "input": label, "path": rel(p, out / name), "sha256": writer.sha256, "lambda": 1.0})
    return entries


def edit_vectors(p: P.PipelineParams, best: dict, record: dict) -> list[tuple[str, float]]:
    """The (vector path, λ) list the evaluate step applies: the composition's inputs with their λ·sign —
    one global λ, or ``best["lambdas"]`` per input (per_task) — or AdaMerging's scaled vectors at λ = 1.
    A recipe's merge is not λ-linear: its composed vector is applied at the searched λ."""
    if record.get("recipe"):
        from pipeline.steps.compose import VECTOR

        composed = P.edit_dir(p) / VECTOR
        if not composed.is_file():
            raise TaskvecError(f"composed vector not found: {composed} (run the compose step first)")
        return [(str(composed), float(best["lambda"]))]
    if best.get("vectors"):
        out = []
        for item in best["vectors"]:
            path = p.root / item["path"]
            if not path.is_file():
                raise TaskvecError(f"scaled vector {path} not found (run the search step again)")
            out.append((str(path), float(item["lambda"])))
        return out
    lambdas = best.get("lambdas") or [float(best["lambda"])] * len(record["inputs"])
    if len(lambdas) != len(record["inputs"]):
        raise TaskvecError(f"best.json has {len(lambdas)} λ for {len(record['inputs'])} composed vectors (run the search step again)")
    out = []
    for item, lam in zip(record["inputs"], lambdas, strict=True):
        path = P.vector_path(p, item["task"])
        if not path.is_file():
            raise TaskvecError(f"task vector of {item['task']} not found: {path}")
        out.append((str(path), round(float(lam) * float(item["sign"]), 10)))
    return out


def scaled_vector_paths(p: P.PipelineParams) -> list[Path]:
    """AdaMerging's scaled vectors listed in ``best.json`` (none for the other strategies), for registration."""
    from pipeline.steps.search import BEST

    best = P.search_dir(p) / BEST
    if not best.is_file():
        return []
    return [p.root / item["path"] for item in json.loads(best.read_text()).get("vectors", [])]
