"""Roll one edit back out of a registered model version: θ_edit − λτ, checked and audited.

:func:`rollback`:

1. finds the edit (by vector sha256 or a unique prefix of ≥ 8 hex digits) in
   the version's ledger — an unknown vector, or one the version does not
   contain, is a one-line error before anything changes;
2. finds the vector file (``--vector PATH``, the version's run artifacts under
   ``vectors/``, or local search folders such as ``outputs/vectors``), checked
   by sha256;
3. subtracts it from the downloaded edited weights
   (``taskvec.engine.apply(edited, [(τ, −λ)])``) and rewrites the ledger of the
   result so its edits no longer hold the removed edit (``output_hash`` stays
   that of the weights actually written);
4. rebuilds the model from the base with the remaining edits and compares
   every tensor: the maximum absolute difference is reported and must be
   within floating-point rounding (a few ulps of the values involved);
5. registers the result as a new version of the same registered model, its
   ``taskvec.ledger`` tag being the new ledger; and, when the source version
   was the champion, moves ``champion`` to it through
   :func:`pipeline.ops.promotion.move_alias` (action ``rollback``, approved by the
   operator). Otherwise a ``rollback`` audit entry records the new version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.ops.promotion import CHAMPION, LEDGER_TAG, Move, Ops, alias_version, audited_append, download_version, get_version, ledger_of, move_alias
from taskvec.errors import TaskvecError

ULP_FACTOR = 4.0  # allowed error per float operation, in units of eps·|value|
ROLLBACK_EXPERIMENT = "taskvec-rollback"


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
    champion_moved: Move | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = (
            f"{self.model}: version {self.new_version} = version {self.source_version} without edit {self.removed['vector_sha256'][:12]} "
            f"(λ={self.removed['lambda']:g}); max |diff| vs ledger rebuild {self.check.max_abs_diff:.3e} "
            f"({self.check.max_ulps:.2f} ulp, limit {self.check.tolerance_ulps:g}) over {self.check.tensors} tensors"
        )
        if self.champion_moved:
            s += f"; champion {self.champion_moved.from_version} → {self.champion_moved.to_version} (audit entry {self.champion_moved.entry.seq})"
        return s


# ---------------------------------------------------------------------------
# Finding the edit and the vector files


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


def _search_vector(sha: str, folders: list[Path]) -> Path | None:
    from taskvec.io import file_sha256

    for folder in folders:
        if folder.is_file():
            candidates = [folder]
        elif folder.is_dir():
            candidates = sorted(folder.rglob("*.safetensors"))
        else:
            continue
        for path in candidates:
            try:
                if path.stat().st_size and file_sha256(path) == sha:
                    return path
            except OSError:
                continue
    return None


def _run_vectors(ops: Ops, mv, dst: Path) -> list[Path]:
    """Vector files logged with the version's run (``vectors/`` artifacts), downloaded once."""
    if not mv.run_id:
        return []
    import mlflow

    found = []
    for sub in ("vectors", "edit"):
        try:
            found.append(Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=sub, dst_path=str(dst), tracking_uri=ops.client.tracking_uri)))
        except Exception:  # no such artifact folder
            continue
    return found


def default_search_dirs() -> list[Path]:
    roots = [Path(os.environ.get("TASKVEC_VECTOR_DIRS", "")).expanduser()] if os.environ.get("TASKVEC_VECTOR_DIRS") else []
    return roots + [Path("outputs/vectors"), Path("outputs/edit")]


class VectorResolver:
    def __init__(self, ops: Ops, mv, workdir: Path, explicit: list[Path] | None = None, search_dirs: list[Path] | None = None):
        self.ops, self.mv, self.workdir = ops, mv, workdir
        self.explicit = [Path(p) for p in explicit or []]
        self.search_dirs = list(search_dirs) if search_dirs is not None else default_search_dirs()
        self._run_dirs: list[Path] | None = None

    def __call__(self, sha: str) -> Path:
        from taskvec.io import file_sha256

        for p in self.explicit:
            if not p.is_file():
                raise TaskvecError(f"vector file not found: {p}")
        hit = _search_vector(sha, self.explicit)
        if hit:
            return hit
        if self._run_dirs is None:
            self._run_dirs = _run_vectors(self.ops, self.mv, self.workdir / "run-vectors")
        hit = _search_vector(sha, self._run_dirs + self.search_dirs)
        if hit:
            return hit
        if self.explicit:
            got = ", ".join(f"{p} ({file_sha256(p)[:12]})" for p in self.explicit)
            raise TaskvecError(f"no vector file with sha256 {sha[:12]} among {got}")
        raise TaskvecError(f"vector file with sha256 {sha[:12]} not found with version {self.mv.version}'s run or in {', '.join(map(str, self.search_dirs))}; give it with --vector PATH")


# ---------------------------------------------------------------------------
# Rebuild and compare


def _segments(edits: list[dict]) -> list[tuple[list[dict], dict]]:
    """Consecutive sum edits grouped into one apply; each merge edit its own apply."""
    out: list[tuple[list[dict], dict]] = []
    for e in edits:
        if "merge" in e:
            out.append(([dict(m) for m in e["merge"]], {k: v for k, v in e.items() if k != "merge"}))
        elif out and out[-1][1].get("method") == "sum" and "merge" not in out[-1][1]:
            out[-1][0].append(e)
        else:
            out.append(([e], {"method": "sum"}))
    return out


def rebuild(base: str | os.PathLike, edits: list[dict], resolve, out: Path) -> Path:
    """The model the ledger describes: base + edits, applied as recorded."""
    from taskvec.engine import MergeOptions, apply
    from taskvec.io import resolve_model

    current: Path = resolve_model(base)
    if not edits:
        return current
    for i, (group, opts) in enumerate(_segments(edits)):
        options = MergeOptions(method=opts.get("method", "sum"), density=opts.get("density", 1.0), drop=opts.get("drop", 0.0), seed=opts.get("seed", 0))
        step = out / f"step{i}"
        apply(current, [(resolve(e["vector_sha256"]), float(e["lambda"])) for e in group], step, options=options)
        current = step
    return current


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
# Registration (adapter; uses pipeline.ops.registry when it offers a folder registration)


def register_folder(ops: Ops, model: str, folder: Path, *, tags: dict[str, str], description: str, extra_artifacts: dict[str, list[Path]] | None = None, metrics: dict[str, float] | None = None) -> str:
    """Log ``folder`` as the ``model`` artifact of a new run and register it as a new version; returns the version."""
    from mlflow.exceptions import MlflowException

    client = ops.client
    exp = client.get_experiment_by_name(ROLLBACK_EXPERIMENT)
    if exp is None:
        try:
            exp_id = client.create_experiment(ROLLBACK_EXPERIMENT)
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(ROLLBACK_EXPERIMENT).experiment_id
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, tags={"taskvec.kind": "rollback", **{k: v for k, v in tags.items() if len(v) < 5000}})
    rid = run.info.run_id
    try:
        client.log_artifacts(rid, str(folder), "model")
        for sub, files in (extra_artifacts or {}).items():
            for f in files:
                client.log_artifact(rid, str(f), sub)
        for k, v in (metrics or {}).items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    mv = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=rid, tags=tags, description=description)
    return str(mv.version)


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
    workdir: str | os.PathLike | None = None,
) -> RollbackResult:
    """Remove one edit from ``model``'s ``version``; see the module docstring."""
    from taskvec.engine import LEDGER_FILE, apply
    from taskvec.io import TensorSource, file_sha256

    from pipeline.ops.audit import default_actor

    sha = _norm_sha(vector_sha)
    mv = get_version(ops.client, model, version)
    src_version = str(mv.version)
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

    tmp_owner = workdir is None
    work = Path(tempfile.mkdtemp(prefix="taskvec-rollback-")) if workdir is None else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        resolve = VectorResolver(ops, mv, work, vectors, search_dirs)
        vec = resolve(removed["vector_sha256"])
        edited = download_version(mv, work / "edited", ops.client.tracking_uri)
        if not (edited / LEDGER_FILE).is_file():
            raise TaskvecError(f"{model} version {src_version}: the artifact at {mv.source} is not a taskvec model folder (no {LEDGER_FILE})")
        with TensorSource(edited) as s:
            if s.content_hash() != ledger.get("output_hash"):
                raise TaskvecError(f"{model} version {src_version}: weights do not match the ledger's output_hash; refusing to roll back")
        out = work / "rolled-back"
        apply(edited, [(vec, -float(removed["lambda"]))], out)
        new_ledger = json.loads((out / LEDGER_FILE).read_text())
        written = new_ledger["output_hash"]
        new_ledger = {
            **ledger,
            "edits": remaining,
            "output_hash": written,
            "weight_files": new_ledger.get("weight_files", ledger.get("weight_files")),
            "rollback": {"source_version": src_version, "removed": removed},
        }
        (out / LEDGER_FILE).write_text(json.dumps(new_ledger, indent=2, sort_keys=True) + "\n")

        rebuilt = rebuild(ledger["base_model"], remaining, resolve, work / "rebuild")
        with TensorSource(rebuilt) as rb:
            if rb.content_hash() != ledger["base_hash"] and not remaining:
                raise TaskvecError(f"base model {ledger['base_model']} does not match the ledger's base hash {ledger['base_hash'][:12]}")
        from taskvec.io import resolve_model

        terms = [(resolve(e["vector_sha256"]), e["lambda"]) for e in ledger["edits"] if "merge" not in e]
        terms += [(resolve(m["vector_sha256"]), m["lambda"]) for e in ledger["edits"] if "merge" in e for m in e["merge"]]
        check = compare(out, rebuilt, [edited, resolve_model(ledger["base_model"])], n_ops=len(ledger["edits"]) + 2, terms=terms)
        if not check.ok:
            raise TaskvecError(
                f"rollback check failed: max |diff| {check.max_abs_diff:.3e} ({check.max_ulps:.1f} ulp > {check.tolerance_ulps:g}) in tensor {check.worst_tensor}; nothing registered"
            )

        vec_files = [resolve(e["vector_sha256"]) for e in remaining if "merge" not in e] + [vec]
        tags = {
            LEDGER_TAG: json.dumps(new_ledger, sort_keys=True),
            "taskvec.rollback_of": src_version,
            "taskvec.removed_vector": removed["vector_sha256"],
            "taskvec.removed_lambda": repr(float(removed["lambda"])),
            "taskvec.rollback_max_abs_diff": repr(check.max_abs_diff),
            "taskvec.base_hash": ledger["base_hash"],
            "taskvec.output_hash": written,
        }
        new_version = register_folder(
            ops,
            model,
            out,
            tags=tags,
            description=f"Version {src_version} with edit {removed['vector_sha256'][:12]} (λ={removed['lambda']:g}) rolled back.",
            extra_artifacts={"vectors": sorted({file_sha256(p): p for p in vec_files}.values())},
            metrics={"rollback_max_abs_diff": check.max_abs_diff, "rollback_max_ulps": check.max_ulps},
        )
        details = {
            "kind": "rollback",
            "source_version": src_version,
            "new_version": new_version,
            "removed_vector": removed["vector_sha256"],
            "removed_lambda": removed["lambda"],
            "max_abs_diff": check.max_abs_diff,
            "max_ulps": check.max_ulps,
            "output_hash": written,
        }
        result = RollbackResult(model, src_version, new_version, removed, check, new_ledger)
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
