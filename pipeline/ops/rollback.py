"""Roll one edit back out of a registered model version, as a first-class new version.

:func:`rollback`:

1. finds the edit (by vector sha256 or a unique prefix of ≥ 8 hex digits) in
   the version's ledger — an unknown vector, or one the version does not
   contain, is a one-line error before anything changes;
2. finds the vector files (``--vector PATH``, the version's run artifacts
   under ``vectors/``, or local search folders such as ``outputs/vectors``),
   checked by sha256 (:class:`pipeline.ops.registry.VectorResolver`);
3. builds the new weights the canonical way: base + the remaining edits, via
   :func:`pipeline.ops.registry.materialise` — the same function
   ``taskvec reproduce`` uses, so the new version reproduces bit for bit;
4. verifies: subtracts the edit from the downloaded weights
   (``taskvec.engine.apply(edited, [(τ, −λ)])``) and compares every tensor
   with the rebuild: the maximum absolute difference is recorded and must
   be within floating-point rounding (a few ulps of the values involved);
5. evaluates the rebuild with the promotion evaluator
   (``promotion.evaluator`` of params.yaml, through
   :func:`pipeline.ops.promotion.load_evaluator`), writes its model card
   (remaining edits, new accuracies, the rollback) and registers it with
   :func:`pipeline.ops.registry.register_model` — like any other version:
   MLmodel, signature, artifacts under the source run's experiment artifact
   root, ledger tags, vectors in the content-addressed store; thin (ledger +
   vector references, materialised on load) unless ``weights="full"`` or
   params.yaml's ``register.weights: full``;
6. when the source version was the champion, moves ``champion`` to it through
   :func:`pipeline.ops.promotion.move_alias` (action ``rollback``, approved by
   the operator). Otherwise a ``rollback`` audit entry records the new version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.ops import registry
from pipeline.ops.promotion import CHAMPION, LEDGER_TAG, Move, Ops, alias_version, audited_append, get_version, ledger_of, move_alias, rejection
from taskvec.errors import TaskvecError

ULP_FACTOR = 4.0  # allowed error per float operation, in units of eps·|value|
ROLLBACK_EXPERIMENT = "taskvec-rollback"
CARD = "README.md"


@dataclass
class Check:
    max_abs_diff: float
    max_ulps: float
    tolerance_ulps: float
    tensors: int
    worst_tensor: str | None

    @property
    def ok(self) -> bool:
        return self.max_ulps <= self.tolerance_ulps


@dataclass
class RollbackResult:
    model: str
    source_version: str
    new_version: str
    removed: dict
    check: Check
    ledger: dict
    accuracy: dict[str, float] = field(default_factory=dict)
    champion_moved: Move | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (
            f"{self.model}: version {self.new_version} = version {self.source_version} without edit {self.removed['vector_sha256'][:12]} "
            f"(λ={self.removed['lambda']:g}), rebuilt from the base with the remaining edits; max |diff| of θ − λτ vs that rebuild {self.check.max_abs_diff:.3e} "
            f"({self.check.max_ulps:.2f} ulp, limit {self.check.tolerance_ulps:g}) over {self.check.tensors} tensors"
        )
        if self.accuracy:
            s += "; accuracy " + ", ".join(f"{t} {a:.4f}" for t, a in sorted(self.accuracy.items()))
        if self.champion_moved:
            s += f"; champion {self.champion_moved.from_version} → {self.champion_moved.to_version} (audit entry {self.champion_moved.entry.seq})"
        return s


# ---------------------------------------------------------------------------
# Finding the edit


def _norm_sha(sha: str) -> str:
    sha = (sha or "").strip().lower()
    if len(sha) < 8 or any(c not in "0123456789abcdef" for c in sha):
        raise TaskvecError(f"bad vector sha256 {sha!r}: give the full sha256 or a prefix of at least 8 hex digits")
    return sha


def _edit_shas(edit: dict) -> list[str]:
    if "merge" in edit:
        return [m["vector_sha256"] for m in edit["merge"]]
    return [edit["vector_sha256"]]


def find_edit(ledger: dict, sha: str) -> int:
    """Index of the (last) sum edit whose vector matches ``sha``; TaskvecError otherwise."""
    sha = _norm_sha(sha)
    edits = ledger.get("edits") or []
    hits = [i for i, e in enumerate(edits) if "merge" not in e and e["vector_sha256"].startswith(sha)]
    distinct = {edits[i]["vector_sha256"] for i in hits}
    if len(distinct) > 1:
        raise TaskvecError(f"vector prefix {sha} is ambiguous: matches {', '.join(sorted(x[:12] for x in distinct))}")
    if hits:
        return hits[-1]
    for e in edits:
        if "merge" in e and any(s.startswith(sha) for s in _edit_shas(e)):
            raise TaskvecError(f"vector {sha[:12]} is part of a {e.get('method')} merge edit; only sum edits can be subtracted exactly")
    raise LookupError(sha)


def _known_shas(ops: Ops, model: str) -> set[str]:
    out: set[str] = set()
    for mv in ops.client.search_model_versions(f"name = '{model}'"):
        raw = (mv.tags or {}).get(LEDGER_TAG)
        if raw:
            try:
                for e in json.loads(raw).get("edits", []):
                    out.update(_edit_shas(e))
            except ValueError:
                pass
    return out


def default_search_dirs() -> list[Path]:
    roots = [Path(os.environ.get("TASKVEC_VECTOR_DIRS", "")).expanduser()] if os.environ.get("TASKVEC_VECTOR_DIRS") else []
    return roots + [Path("outputs/vectors"), Path("outputs/edit")]


# ---------------------------------------------------------------------------
# Compare the subtraction with the rebuild


def compare(a_dir: Path, b_dir: Path, scale_dirs: list[Path], n_ops: int, terms: list[tuple[Path, float]] = ()) -> Check:
    """Max |a − b| over all tensors, also in ulps of the magnitudes the arithmetic went through.

    The scale of an element is the largest of |a|, |b|, the models in
    ``scale_dirs`` (edited, base), plus Σ |λ|·|τ| over ``terms`` — the
    operands whose rounding the subtraction and the rebuild accumulate.
    """
    from taskvec.io import TensorSource
    from taskvec.vector import VectorFile

    worst_abs, worst_ulps, worst_name = 0.0, 0.0, None
    with TensorSource(a_dir) as a, TensorSource(b_dir) as b:
        others = [TensorSource(d) for d in scale_dirs]
        vfs = [(VectorFile(p), abs(float(lam))) for p, lam in terms]
        try:
            if sorted(a.names()) != sorted(b.names()):
                raise TaskvecError("rollback result and ledger rebuild hold different tensors")
            for name in sorted(a.names()):
                ta, tb = a.read(name), b.read(name)
                if not ta.is_floating_point():
                    if not torch.equal(ta, tb):
                        worst_abs, worst_ulps, worst_name = float("inf"), float("inf"), name
                    continue
                eps = torch.finfo(ta.dtype).eps
                fa, fb = ta.to(torch.float32), tb.to(torch.float32)
                diff = (fa - fb).abs()
                scale = torch.maximum(fa.abs(), fb.abs())
                for o in others:
                    if name in o:
                        scale = torch.maximum(scale, o.read_float32(name).abs())
                for vf, lam in vfs:
                    if name in vf.names:
                        scale = scale + lam * vf.read(name).abs()
                ulps = diff / (eps * scale.clamp_min(torch.finfo(torch.float32).tiny))
                ulps = torch.where(diff == 0, torch.zeros_like(ulps), ulps)
                m_abs, m_ulp = float(diff.max()) if diff.numel() else 0.0, float(ulps.max()) if ulps.numel() else 0.0
                worst_abs = max(worst_abs, m_abs)
                if m_ulp > worst_ulps:
                    worst_ulps, worst_name = m_ulp, name
            n = len(a.names())
        finally:
            for o in others:
                o.close()
            for vf, _ in vfs:
                vf.close()
    return Check(worst_abs, worst_ulps, ULP_FACTOR * max(n_ops, 1), n, worst_name)


# ---------------------------------------------------------------------------
# Evaluation, model card, registration


def resolve_evaluator(evaluator=None, params_file: str | os.PathLike | None = None):
    """``(name, callable)``: the given evaluator, else ``promotion.evaluator`` of the params file."""
    from pipeline.ops.promotion import load_evaluator, load_spec
    from pipeline.params import PromotionSpec

    if evaluator is None:
        path = params_file or os.environ.get("TASKVEC_PARAMS", "params.yaml")
        evaluator = load_spec(path).evaluator if Path(path).is_file() else PromotionSpec().evaluator
    name = evaluator if isinstance(evaluator, str) else f"{getattr(evaluator, '__module__', '?')}:{getattr(evaluator, '__qualname__', repr(evaluator))}"
    return name, load_evaluator(evaluator)


def evaluate(folder: Path, evaluator=None, params_file: str | os.PathLike | None = None) -> tuple[str, dict[str, float]]:
    """The promotion evaluator's ``{task: accuracy}`` of a model folder (one line on failure)."""
    name, fn = resolve_evaluator(evaluator, params_file)
    try:
        scores = fn(folder)
    except TaskvecError:
        raise
    except Exception as exc:  # noqa: BLE001 - an evaluator's crash: one line, nothing registered
        raise TaskvecError(f"evaluator {name} failed on the rolled-back model: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; nothing registered") from None
    return name, {str(k): float(v) for k, v in scores.items()}


def model_card(model: str, ledger: dict, *, source_version: str, removed: dict, check: Check, evaluator: str, accuracy: dict[str, float]) -> str:
    """README.md of a rolled-back version: its remaining edits, its own accuracies, and how it was made."""
    rows = []
    for e in ledger["edits"]:
        for item in e.get("merge", [e]):
            rows.append(f"| {len(rows) + 1} | `{item['vector_sha256']}` | {item.get('vector', '')} | {float(item['lambda']):+.6g} | {e.get('method', 'sum')} |")
    acc = [f"| {t} | {a:.4f} |" for t, a in sorted(accuracy.items())]
    return f"""---
library_name: transformers
base_model: {ledger['base_model']}
tags: [taskvec, task-arithmetic, model-editing, rollback]
---

# Task-arithmetic edit of `{ledger['base_model']}` ({model}, rollback of version {source_version})

Version {source_version} of `{model}` without the edit of vector `{removed['vector_sha256']}` (λ = {float(removed['lambda']):g}).
The weights are the canonical rebuild from the ledger below: base + the remaining edits, applied in order
(`taskvec reproduce {model} <this version>` rebuilds them bit for bit). Verification: θ(v{source_version}) − λτ
agrees with this rebuild to max |diff| {check.max_abs_diff:.3e} ({check.max_ulps:.2f} ulp; limit {check.tolerance_ulps:g}) over {check.tensors} tensors.

Load it with `transformers.AutoModel.from_pretrained(<this folder>)` (an encoder; sentence embeddings are the
mean-pooled, L2-normalised last hidden states) and score a task with its frozen head in `heads/<task>.safetensors`.

## Edit ledger (`taskvec.json`)

- base model: `{ledger['base_model']}`
- base content hash: `{ledger['base_hash']}`
- output content hash: `{ledger['output_hash']}`

| # | vector sha256 | vector | λ | method |
| --- | --- | --- | --- | --- |
{chr(10).join(rows) if rows else '| – | (no edits: the base model) | | | |'}

## Metrics (recomputed for this version by `{evaluator}`)

| task | accuracy |
| --- | --- |
{chr(10).join(acc) if acc else '| – | – |'}
"""


def _experiment_for(client, mv) -> str:
    """The experiment of the source version's run (so artifacts land under its artifact root), else taskvec-rollback."""
    from mlflow.exceptions import MlflowException

    if getattr(mv, "run_id", None):
        try:
            return client.get_run(mv.run_id).info.experiment_id
        except MlflowException:
            pass
    exp = client.get_experiment_by_name(ROLLBACK_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    try:
        from pipeline import params as P
        from pipeline.ops import tracking

        location = tracking.artifact_location(P.load(os.environ.get("TASKVEC_PARAMS", "params.yaml")), client.tracking_uri)
    except Exception:  # noqa: BLE001 - no params.yaml here: the store's default artifact root
        pass
    try:
        return client.create_experiment(ROLLBACK_EXPERIMENT, artifact_location=location)
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(ROLLBACK_EXPERIMENT).experiment_id


def _register_section(params_file: str | os.PathLike | None) -> dict:
    import yaml

    path = Path(params_file or os.environ.get("TASKVEC_PARAMS", "params.yaml"))
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        raw = {}
    section = (raw or {}).get("register") if isinstance(raw, dict) else None
    return section if isinstance(section, dict) else {}


def default_weights(params_file: str | os.PathLike | None = None) -> str:
    """``register.weights`` of the params file (``thin`` when there is none): rollback registers like the register step."""
    return str(_register_section(params_file).get("weights") or "thin")


def default_compress(params_file: str | os.PathLike | None = None) -> dict | None:
    """``register.compress`` of the params file (validated; None when unset): a thin rollback version stores its vectors like the register step."""
    from pipeline.params import CompressSpec
    from taskvec.config import parse_params

    spec = _register_section(params_file).get("compress")
    return None if spec is None else parse_params(spec, source="params register.compress", model=CompressSpec).model_dump()


def register_version(ops: Ops, model: str, folder: Path, *, source, tags: dict[str, str], vectors: list[Path], metrics: dict[str, float], description: str, weights: str = "thin", compress: dict | None = None) -> dict:
    """A run in the source version's experiment, then :func:`pipeline.ops.registry.register_model` in it."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client = ops.client
    small = {k: v for k, v in tags.items() if len(v) < 5000}
    run = client.create_run(_experiment_for(client, source), tags={MLFLOW_RUN_NAME: f"rollback of {model} v{source.version}", "taskvec.kind": "rollback", **small})
    rid = run.info.run_id
    try:
        for k, v in metrics.items():
            client.log_metric(rid, k, float(v))
        rec = registry.register_model(client, rid, folder, name=model, tags=tags, vectors=vectors, version_description=description, weights=weights, compress=compress)
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rec


def rollback(
    ops: Ops,
    model: str,
    vector_sha: str,
    *,
    version: str | int = CHAMPION,
    vectors: list[Path] | None = None,
    search_dirs: list[Path] | None = None,
    approver: str | None = None,
    reason: str | None = None,
    move_champion: bool = True,
    evaluator=None,
    params_file: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    weights: str | None = None,
) -> RollbackResult:
    """Remove one edit from ``model``'s ``version``; see the module docstring."""
    from taskvec.engine import LEDGER_FILE, apply
    from taskvec.io import TensorSource, file_sha256, resolve_model

    from pipeline.ops.audit import default_actor

    sha = _norm_sha(vector_sha)
    mv = get_version(ops.client, model, version)
    src_version = str(mv.version)
    rej = rejection(ops, model, src_version)
    if rej is not None:
        raise TaskvecError(f"{model} version {src_version} was rejected (audit entry {rej.seq}); roll back from the champion or another accepted version")
    ledger = ledger_of(ops.client, mv)
    try:
        idx = find_edit(ledger, sha)
    except LookupError:
        known = {s for s in _known_shas(ops, model) if s.startswith(sha)}
        if known:
            raise TaskvecError(f"{model} version {src_version} does not contain vector {sha[:12]} (its edits: {', '.join(e.get('vector_sha256', 'merge')[:12] for e in ledger.get('edits', [])) or 'none'})") from None
        raise TaskvecError(f"unknown vector {sha[:12]}: no version of {model} was edited with it") from None
    removed = ledger["edits"][idx]
    remaining = [e for i, e in enumerate(ledger["edits"]) if i != idx]
    champion = alias_version(ops.client, model, CHAMPION)
    approver = (approver or default_actor()).strip()
    reason = (reason or f"remove edit {removed['vector_sha256'][:12]} from version {src_version}").strip()
    evaluator_name, evaluator_fn = resolve_evaluator(evaluator, params_file)  # a bad evaluator fails before any work
    weights = weights or default_weights(params_file)
    if weights not in ("thin", "full"):
        raise TaskvecError(f"unknown weights mode {weights!r}: use thin or full")
    compress = default_compress(params_file) if weights == "thin" else None

    tmp_owner = workdir is None
    work = Path(tempfile.mkdtemp(prefix="taskvec-rollback-")) if workdir is None else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        resolve = registry.VectorResolver(ops.client, mv, work, vectors, search_dirs if search_dirs is not None else default_search_dirs())
        vec = resolve(removed["vector_sha256"])
        if registry.store.COMPRESSION_TAG in (mv.tags or {}):  # it serves base + Σλτ̂: roll back the exact weights its ledger describes
            edited = work / "edited"
            registry.materialise(ledger["base_model"], ledger["edits"], resolve, edited, base_hash=ledger["base_hash"])
        else:
            edited = registry.download_version(mv, work / "edited", ops.client.tracking_uri)
        with TensorSource(edited) as s:
            if s.content_hash() != ledger.get("output_hash"):
                raise TaskvecError(f"{model} version {src_version}: weights do not match the ledger's output_hash; refusing to roll back")
        # the new weights: the canonical rebuild of the remaining ledger
        out = work / "model"
        new_ledger = registry.materialise(ledger["base_model"], remaining, resolve, out, base_hash=ledger["base_hash"])
        # the verification: θ − λτ must agree with it within float rounding
        subtracted = work / "subtracted"
        apply(edited, [(vec, -float(removed["lambda"]))], subtracted)
        terms = [(resolve(e["vector_sha256"]), e["lambda"]) for e in ledger["edits"] if "merge" not in e]
        terms += [(resolve(m["vector_sha256"]), m["lambda"]) for e in ledger["edits"] if "merge" in e for m in e["merge"]]
        check = compare(subtracted, out, [edited, resolve_model(ledger["base_model"])], n_ops=len(ledger["edits"]) + 2, terms=terms)
        if not check.ok:
            raise TaskvecError(
                f"rollback check failed: max |diff| {check.max_abs_diff:.3e} ({check.max_ulps:.1f} ulp > {check.tolerance_ulps:g}) in tensor {check.worst_tensor}; nothing registered"
            )
        if (edited / "heads").is_dir():
            shutil.copytree(edited / "heads", out / "heads", dirs_exist_ok=True)
        _, accuracy = evaluate(out, evaluator_fn, params_file)
        (out / CARD).write_text(model_card(model, new_ledger, source_version=src_version, removed=removed, check=check, evaluator=evaluator_name, accuracy=accuracy))
        with TensorSource(out) as s:  # heads and card are not weights: the ledger still describes the folder
            if s.content_hash(use_cache=False) != new_ledger["output_hash"] or json.loads((out / LEDGER_FILE).read_text())["output_hash"] != new_ledger["output_hash"]:
                raise TaskvecError("rolled-back model folder does not match its ledger; nothing registered")

        vec_files = [resolve(i["vector_sha256"]) for e in remaining for i in e.get("merge", [e])] + [vec]
        tags = {
            **registry.ledger_tags(new_ledger),
            "taskvec.rollback_of": src_version,
            "taskvec.removed_vector": removed["vector_sha256"],
            "taskvec.removed_lambda": repr(float(removed["lambda"])),
            "taskvec.rollback_max_abs_diff": repr(check.max_abs_diff),
            "taskvec.rollback_max_ulps": repr(check.max_ulps),
            "taskvec.evaluator": evaluator_name,
            "metrics.accuracy": json.dumps(accuracy, sort_keys=True),
        }
        metrics = {"rollback_max_abs_diff": check.max_abs_diff, "rollback_max_ulps": check.max_ulps, **{f"accuracy.{t}": a for t, a in accuracy.items()}}
        rec = register_version(
            ops, model, out, source=mv, tags=tags, metrics=metrics,
            vectors=sorted({file_sha256(p): p for p in vec_files}.values()), weights=weights, compress=compress,
            description=f"Version {src_version} with edit {removed['vector_sha256'][:12]} (λ={removed['lambda']:g}) rolled back: base + remaining edits.",
        )
        new_version = rec["version"]
        details = {
            "kind": "rollback",
            "source_version": src_version,
            "new_version": new_version,
            "removed_vector": removed["vector_sha256"],
            "removed_lambda": removed["lambda"],
            "max_abs_diff": check.max_abs_diff,
            "max_ulps": check.max_ulps,
            "output_hash": new_ledger["output_hash"],
            "accuracy": accuracy,
        }
        result = RollbackResult(model, src_version, new_version, removed, check, new_ledger, accuracy)
        try:
            if move_champion and champion == src_version:
                result.champion_moved = move_alias(ops, model, new_version, action="rollback", inline_approval=(approver, reason), payload=details, actor=approver)
            else:
                if champion and champion != src_version:
                    result.notes.append(f"champion is version {champion}, not {src_version}: champion unchanged")
                audited_append(ops, "rollback", model, new_version, lambda tx, undo: {**details, "alias": None, "approver": approver, "reason": reason}, actor=approver)
        except BaseException:
            # the audited record failed: take the unreferenced new version back out
            try:
                ops.client.delete_model_version(model, new_version)
            except Exception:
                pass
            raise
        return result
    finally:
        if tmp_owner:
            shutil.rmtree(work, ignore_errors=True)
