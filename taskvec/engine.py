"""The streaming engine: extract, combine, apply, merge and compress task vectors.

Every operation walks the checkpoints tensor by tensor (sorted by name) and
each tensor in flat chunks (:mod:`taskvec.streaming`): read one chunk from
each input, do the algebra of :mod:`taskvec.algebra` in float32 into the
buffer that is then written, round once to the output dtype. Homology (names,
shapes, dtypes, base hash) is checked from the headers before any arithmetic,
and every output is written to a temporary path and renamed into place only
when complete.

An applied model folder carries ``taskvec.json``, its edit ledger
(:mod:`taskvec.ledger`). Outputs never destroy inputs or foreign data
(:func:`taskvec.io.check_output`): an output that is, contains or lies inside
an input is refused; an existing output must be a previous taskvec output (or
the caller passes ``force``).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec import algebra, kernels, methods
from taskvec.compress import compress
from taskvec.errors import HomologyError, TaskvecError
from taskvec.io import (
    DEFAULT_SHARD_BYTES,
    ContentHasher,
    Scratch,
    TensorSource,
    _tensor_bytes,
    check_output,
    dtype_code,
    resolve_model,
)
from taskvec.io.dtypes import chunk_ranges
from taskvec.ledger import LEDGER_FILE, copy_model_files, descent, read_ledger, root_hash
from taskvec.methods.streamed import ChunkedMerge
from taskvec.streaming import ModelStream, Memo, WriteBehind, add_into, check_result, progress_bar, scratch_f32, single_threaded, stream_tensor, whole_tensor, write_model
from taskvec.vector import VectorFile, VectorHeader, VectorWriter, check_vectors_homologous

__all__ = [
    "LEDGER_FILE", "MergeOptions", "VectorResult", "apply", "combine", "compress", "copy_model_files", "extract",
    "merge", "parse_size", "read_ledger", "root_hash", "select_names", "single_threaded",
]


def select_names(names: Sequence[str], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Names matching any ``include`` glob (all if none) and no ``exclude`` glob."""
    out = []
    for n in names:
        if include and not any(fnmatch.fnmatchcase(n, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(n, p) for p in exclude):
            continue
        out.append(n)
    return out


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise TaskvecError(f"bad size {text!r}: use e.g. 500MB or 5GB")
    unit = m.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(float(m.group(1)) * base**power)


def _float_names(src: TensorSource) -> list[str]:
    return sorted(n for n, i in src.infos().items() if i.is_float)


def _check_homologous(src: TensorSource, names: Sequence[str], other: TensorSource, where: str, fix: str = "") -> None:
    """Every tensor of ``names`` is in ``other`` with the base's shape and dtype."""
    for name in names:
        if name not in other:
            raise HomologyError(f"tensor {name!r} is in the base but not in {where}{fix}")
        b, o = src.info(name), other.info(name)
        if o.shape != b.shape:
            raise HomologyError(f"tensor {name!r} has shape {list(o.shape)} in {where} but {list(b.shape)} in the base")
        if o.dtype != b.dtype:
            raise HomologyError(f"tensor {name!r} has dtype {o.dtype} in {where} but {b.dtype} in the base")


@dataclass
class VectorResult:
    path: Path
    sha256: str
    param_count: int
    tensors: int
    base_hash: str


# ---------------------------------------------------------------------------
# extract: one loop for both kinds of fine-tuned side


class ModelSide:
    """A fine-tuned model as the fine-tuned side of :func:`extract`: τ = θ_ft − θ_base."""

    def __init__(self, finetuned, allow_pickle: bool):
        self.dir = resolve_model(finetuned)
        self.inputs = [self.dir]
        self.src = TensorSource(self.dir, allow_pickle=allow_pickle)

    def select(self, b: TensorSource, base: str, include: Sequence[str], exclude: Sequence[str]) -> list[str]:
        selected = select_names(_float_names(b), include, exclude)
        extra = sorted(set(select_names(_float_names(self.src), include, exclude)) - set(selected))
        if extra:
            raise HomologyError(f"tensor {extra[0]!r} is in the fine-tuned model but not in the base (exclude it with --exclude)")
        _check_homologous(b, selected, self.src, "the fine-tuned model", " (exclude it with --exclude)")
        if not selected:
            raise TaskvecError("empty task vector: no floating tensors left after --include/--exclude")
        return selected

    def recipe(self) -> dict:
        return {"finetuned_hash": self.src.content_hash()}  # path-free: same τ, same sha256

    def tau_into(self, name: str, start: int, stop: int, base32: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
        if self.src.stored_dtype(name) == torch.float32:
            self.src.read_range_into(name, start, stop, out)
        else:
            out.copy_(self.src.read_range(name, start, stop, scratch, "ft"))
        out.sub_(base32)

    def causes(self, name: str):
        return [("fine-tuned model", lambda: self.src.read(name))]

    def advise(self, name: str) -> None:
        if name in self.src:
            self.src.advise(name)

    def close(self) -> None:
        self.src.close()


@single_threaded
def extract(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    progress: bool = False,
    force: bool = False,
    low_rank: bool = False,
) -> VectorResult:
    """τ = θ_ft − θ_base over the shared floating tensors selected by include/exclude.

    ``finetuned`` may be a PEFT LoRA adapter folder: τ = scaling·B·A
    (:class:`taskvec.adapters.AdapterSide`; ``low_rank`` keeps the factors).
    """
    from taskvec.adapters import AdapterSide, is_adapter_dir

    adapter = is_adapter_dir(finetuned)
    if low_rank and not adapter:
        raise TaskvecError(f"--low-rank needs a PEFT LoRA adapter folder (with adapter_config.json), not {finetuned}")
    side = AdapterSide(finetuned, allow_pickle) if adapter else None
    bdir = resolve_model(base)
    side = side or ModelSide(finetuned, allow_pickle)
    try:
        dest = check_output(out, [bdir, *side.inputs], kind="file", force=force)
        with TensorSource(bdir, allow_pickle=allow_pickle) as b:
            selected = side.select(b, str(base), include, exclude)
            recipe = {"op": "extract", **side.recipe(), "include": list(include), "exclude": list(exclude)}
            header = VectorHeader(base_model=str(base), base_hash="0" * 64, dtype=dtype, recipe=recipe)
            if low_rank:
                return side.write_lowrank(b, dest, header, selected)
            return _extract_stream(b, side, dest, header, selected, progress)
    finally:
        side.close()


def _extract_stream(b: TensorSource, side, dest: Path, header: VectorHeader, selected: list[str], progress: bool) -> VectorResult:
    """The one extract loop: base chunks in, τ chunks out; the base's content hash on the way, unless cached."""
    known = b.cached_content_hash()
    if known:
        header.base_hash = known
    hasher = None if known else ContentHasher()
    selected_set, scratch = set(selected), Scratch()
    names = sorted(b.names())
    code = dtype_code(header.dtype)
    with VectorWriter(dest, {n: b.info(n).shape for n in selected}, header, hash_file=bool(known)) as w, progress_bar(sum(b.info(n).nbytes for n in names), "extract", progress) as bar:
        sink = WriteBehind(w.write)
        try:
            for i, name in enumerate(names):
                for nxt in names[i + 1 : i + 2]:
                    b.advise(nxt)
                    side.advise(nxt)
                info = b.info(name)
                if hasher:
                    hasher.begin(name, info.dtype, info.shape)
                if name not in selected_set:
                    for start, stop in chunk_ranges(info.numel, 4) if hasher else ():
                        hasher.feed(_tensor_bytes(b.read_range(name, start, stop, scratch, "base")))
                    bar.update(info.nbytes)
                    continue

                def produce(start, stop, out, name=name):
                    raw = b.read_range(name, start, stop, scratch, "base")
                    if hasher:
                        hasher.feed(_tensor_bytes(raw))
                    base32 = raw if raw.dtype == torch.float32 else scratch_f32(scratch, "base/f32", stop - start).copy_(raw)
                    tau = out if out.dtype == torch.float32 else scratch_f32(scratch, "tau", stop - start)
                    side.tau_into(name, start, stop, base32, tau, scratch)
                    check_result(tau, name, [("base model", lambda: b.read(name)), *side.causes(name)], "task-vector", out.dtype, "store the vector in float32: --dtype float32")
                    return tau

                stream_tensor(sink, name, code, info.shape, header.dtype, produce)
                bar.update(info.nbytes)
        finally:
            sink.close()
        base_hash = known or hasher.hexdigest()
        if not known:
            w.set_base_hash(base_hash)
    if not known:
        b.remember_content_hash(base_hash)
    return VectorResult(Path(dest), w.sha256, w.param_count, len(selected), base_hash)


# ---------------------------------------------------------------------------
# combine


@dataclass
class MergeOptions:
    method: str = "sum"
    density: float = 1.0
    drop: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        # one check for engine, edit plan and benchmark: the registry of taskvec.methods
        methods.validate(self.method, {"density": self.density, "drop": self.drop, "seed": self.seed})

    def record(self) -> dict:
        """The method and the options it takes (the vector recipe / ledger entry)."""
        return {"method": self.method, **{name: getattr(self, name) for name in methods.get(self.method).option_names}}

    def _seeds(self, name: str, n: int) -> list[int]:
        return [algebra.tensor_seed(self.seed, i, name) for i in range(n)]

    def combine(self, name: str, taus: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
        """The merged tensor from whole tensors (the in-memory form)."""
        return algebra.merge(self.method, taus, lambdas, density=self.density, drop=self.drop, seeds=self._seeds(name, len(taus)))

    def chunked(self, name: str, numel: int, read, lambdas: Sequence[float]) -> ChunkedMerge:
        """The same merge, chunk by chunk; ``read(t, start, stop)`` gives vector t's τ elements."""
        return ChunkedMerge(self.method, lambdas, read, numel, chunk_ranges(numel, 4), density=self.density, drop=self.drop, seeds=self._seeds(name, len(lambdas)))


def _open_vectors(vectors: Sequence[tuple[str | os.PathLike, float]]) -> list[VectorFile]:
    if not vectors:
        raise TaskvecError("no task vectors given")
    for _, lam in vectors:
        algebra.check_lambda(lam)
    vfs = [VectorFile(p) for p, _ in vectors]
    check_vectors_homologous(vfs)
    return vfs


def _vector_causes(vfs: Sequence[VectorFile], name: str):
    return [(f"vector {v.path.name}", lambda v=v: v.read(name)) for v in vfs]


@single_threaded
def combine(
    vectors: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    *,
    options: MergeOptions | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    force: bool = False,
) -> VectorResult:
    """One vector from several: ``Σ λ τ`` (sum), analogy (λ = 1, 1, −1), TIES, DARE…"""
    options = options or MergeOptions()
    vfs = _open_vectors(vectors)
    lambdas = [lam for _, lam in vectors]
    ref = vfs[0]
    try:
        dest = check_output(out, [p for p, _ in vectors], kind="file", force=force)
        header = VectorHeader(
            base_model=ref.base_model,
            base_hash=ref.base_hash,
            dtype=dtype,
            recipe={"op": "combine", "inputs": [{"sha256": v.sha256, "lambda": lam} for v, lam in zip(vfs, lambdas)], **options.record()},
        )
        scratch, code = Scratch(), dtype_code(dtype)
        with VectorWriter(dest, ref.shapes(), header) as w, progress_bar(4 * ref.param_count * len(vfs), "combine", progress) as bar:
            sink = WriteBehind(w.write)
            try:
                for name in ref.names:
                    shape = ref.shape(name)
                    if hasattr(options, "chunked"):
                        chunk_of = options.chunked(name, _numel(shape), lambda t, s, e, name=name: vfs[t].read_range_float32(name, s, e, scratch, f"v{t}"), lambdas).chunk
                    else:  # a mergekit recipe: whole tensors, merged once
                        chunk_of = functools.partial(whole_tensor(options, name, lambda name=name: [v.read(name) for v in vfs], lambdas), 0)

                    def produce(start, stop, out, name=name, chunk_of=chunk_of):
                        chunk = chunk_of(start, stop)
                        check_result(chunk, name, _vector_causes(vfs, name), "combined", out.dtype, "write it as float32 with --dtype float32, or use smaller λ")
                        return chunk

                    stream_tensor(sink, name, code, shape, dtype, produce)
                    bar.update(4 * _numel(shape) * len(vfs))
            finally:
                sink.close()
        return VectorResult(Path(out), w.sha256, w.param_count, len(ref.names), ref.base_hash)
    finally:
        for v in vfs:
            v.close()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------
# apply and merge: write a complete model folder


@single_threaded
def apply(
    base: str | os.PathLike,
    vectors: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    *,
    options: MergeOptions | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_pickle: bool = False,
    progress: bool = False,
    force: bool = False,
) -> dict:
    """θ = θ_base + merge(λ_t τ_t) written as a complete Hugging Face model folder.

    Computes in float32 and stores each tensor in the base's dtype. Returns the
    edit ledger written to ``OUT/taskvec.json``.
    """
    options = options or MergeOptions()
    vfs = _open_vectors(vectors)
    lambdas = [lam for _, lam in vectors]
    bdir = resolve_model(base)
    try:
        dest = check_output(out, [bdir, *(p for p, _ in vectors)], kind="folder", force=force)
        with TensorSource(bdir, allow_pickle=allow_pickle) as b:
            ref = vfs[0]
            for name in ref.names:
                if name not in b:
                    raise HomologyError(f"tensor {name!r} of vector {ref.path.name} is not in the base model")
                info = b.info(name)
                if info.shape != ref.shape(name):
                    raise HomologyError(f"tensor {name!r} has shape {list(ref.shape(name))} in vector {ref.path.name} but {list(info.shape)} in the base")
                if not info.is_float:
                    raise HomologyError(f"tensor {name!r} is {info.dtype} in the base, not floating point")
            known = b.cached_content_hash()
            if known:
                _check_root(known, bdir, ref)  # refuse before any work when the base's hash is known
            new_edits = [
                {"vector_sha256": v.sha256, "vector": v.path.name, "lambda": lam, **options.record()}
                for v, lam in zip(vfs, lambdas)
            ] if options.method == "sum" else [
                {"merge": [{"vector_sha256": v.sha256, "vector": v.path.name, "lambda": lam} for v, lam in zip(vfs, lambdas)], **options.record()}
            ]

            def finish(streamed: str | None) -> dict:
                root, parent = _check_root(known or streamed, bdir, ref)
                edits = (list(parent["edits"]) if parent else []) + new_edits
                return {"format": 1, "base_model": parent["base_model"] if parent else str(base), "base_hash": root, "edits": edits}

            scratch = Scratch()
            chunked = hasattr(options, "chunked")

            def make(name: str):
                if options.method == "sum":  # ((θ + λ_1 τ_1) + λ_2 τ_2) …, each product rounded, in the output buffer
                    def compute(start, stop, out, acc):
                        for v, lam in zip(vfs, lambdas):
                            acc.add_(v.read_range_float32(name, start, stop, scratch, "vector").mul_(lam))
                        return acc

                    compute.fused = (kernels.APPLY, vfs, lambdas)  # the same operations in one pass
                    return compute
                numel = _numel(ref.shape(name))
                if chunked:
                    merged = options.chunked(name, numel, lambda t, s, e: vfs[t].read_range_float32(name, s, e, scratch, f"v{t}"), lambdas)
                    return lambda start, stop, out, acc: acc.add_(merged.chunk(start, stop))
                whole = whole_tensor(options, name, lambda: [v.read(name) for v in vfs], lambdas)
                return lambda start, stop, out, acc: acc.add_(whole(0, start, stop))

            m = ModelStream(b, set(ref.names), make, lambda name: _vector_causes(vfs, name), hash_base=not known)
            return write_model(m, bdir, dest, finish, max_shard_bytes=max_shard_bytes, progress=progress, desc="apply")
    finally:
        for v in vfs:
            v.close()


def _check_root(own: str, bdir: Path, ref: VectorFile) -> tuple[str, dict | None]:
    root, parent = descent(own, bdir)
    if root != ref.base_hash:
        raise HomologyError(
            f"base content hash {own[:12]} differs from the hash {ref.base_hash[:12]} recorded in vector {ref.path.name} "
            f"(taken from {ref.base_model}); apply it to the model it was extracted from"
        )
    return root, parent


@single_threaded
def merge(
    base: str | os.PathLike,
    finetuned: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    *,
    options: MergeOptions | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_pickle: bool = False,
    progress: bool = False,
    force: bool = False,
) -> dict:
    """Extract and apply in one pass: θ_base + merge(λ_t (θ_t − θ_base)), no vector files.

    The one-command equivalent of ``mergekit``'s ``task_arithmetic`` /
    ``ties`` / ``dare_*`` merges.
    """
    options = options or MergeOptions()
    for _, lam in finetuned:
        algebra.check_lambda(lam)
    if not finetuned:
        raise TaskvecError("no fine-tuned models given")
    bdir = resolve_model(base)
    dirs = [resolve_model(p) for p, _ in finetuned]
    lambdas = [lam for _, lam in finetuned]
    dest = check_output(out, [bdir, *dirs], kind="folder", force=force)
    srcs = [TensorSource(d, allow_pickle=allow_pickle) for d in dirs]
    try:
        with TensorSource(bdir, allow_pickle=allow_pickle) as b:
            covered = select_names(_float_names(b), include, exclude)
            for (path, _), s in zip(finetuned, srcs):
                _check_homologous(b, covered, s, str(path))
            ledger = {
                "format": 1,
                "base_model": str(base),
                "base_hash": None,
                "edits": [{"finetuned": str(p), "lambda": lam, "include": list(include), "exclude": list(exclude), **options.record()} for p, lam in finetuned],
            }
            scratch = Scratch()
            chunked = hasattr(options, "chunked")

            def make(name: str):
                if options.method == "sum":  # Σ λ_t (θ_t − θ), then + θ (mergekit's order), each product rounded
                    def compute(start, stop, out, tb):
                        if out.dtype == torch.float32:  # the first fine-tune is read into the buffer written
                            acc = srcs[0].read_range_into(name, start, stop, out)
                        else:
                            acc = srcs[0].read_range_float32(name, start, stop, scratch, "acc")
                        acc.sub_(tb).mul_(lambdas[0])
                        for s, lam in zip(srcs[1:], lambdas[1:]):
                            acc.add_(s.read_range_float32(name, start, stop, scratch, "ft").sub_(tb).mul_(lam))
                        return acc.add_(tb)

                    compute.fused = (kernels.MERGE, srcs, lambdas)  # the same operations in one pass
                    return compute
                base_chunk = Memo(lambda s, e: b.read_range_float32(name, s, e, scratch, "base/memo"))

                def tau(t, s, e):
                    return srcs[t].read_range_float32(name, s, e, scratch, f"ft{t}").sub_(base_chunk(s, e))

                if chunked:
                    merged = options.chunked(name, _numel(b.info(name).shape), tau, lambdas)
                    return lambda start, stop, out, tb: add_into(tb, merged.chunk(start, stop), out)
                tb_full = b.read_float32(name)
                whole = whole_tensor(options, name, lambda: [s.read_float32(name).sub_(tb_full) for s in srcs], lambdas)
                return lambda start, stop, out, tb: add_into(tb, whole(0, start, stop), out)

            def causes(name: str):
                return [(f"fine-tuned model {p}", lambda s=s: s.read(name)) for (p, _), s in zip(finetuned, srcs)]

            m = ModelStream(b, set(covered), make, causes, hash_base=False, base_in_out=False)
            return write_model(m, bdir, dest, lambda _: ledger, max_shard_bytes=max_shard_bytes, progress=progress, desc="merge")
    finally:
        for s in srcs:
            s.close()
