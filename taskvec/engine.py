"""The streaming engine: extract, combine, apply, merge and compress task vectors.

Every operation walks the checkpoints tensor by tensor (sorted by name): read
one tensor from each input, do the algebra of :mod:`taskvec.algebra` in
float32, write the result, drop it. Homology (names, shapes, dtypes, base
hash) is checked from the headers before any arithmetic, and every output is
written to a temporary path and renamed into place only when complete.

An applied model folder carries ``taskvec.json``, its *edit ledger*: the base
model and its content hash, then the ordered list of edits (vector sha256, λ,
method), and the content hash of the weights produced. A vector taken from a
base may be applied to a model edited from that same base (the ledger links
them), which is how an edit is rolled back: apply the same vector with −λ.

Outputs never destroy inputs or foreign data (:func:`taskvec.io.check_output`):
an output that is, contains or lies inside an input is refused; an existing
output must be a previous taskvec output (or the caller passes ``force``).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from taskvec import algebra, methods
from taskvec.errors import HomologyError, TaskvecError
from taskvec.io import (
    DEFAULT_SHARD_BYTES,
    PICKLE_INDEX,
    PICKLE_WEIGHTS,
    SAFE_INDEX,
    ContentHasher,
    Scratch,
    ShardedWriter,
    TensorSource,
    TensorSpec,
    _tensor_bytes,
    atomic_dir,
    check_output,
    is_taskvec_folder,
    resolve_model,
    user_path,
    torch_dtype,
)
from taskvec.vector import VectorFile, VectorHeader, VectorWriter, check_vectors_homologous, write_sparse_vector

LEDGER_FILE = "taskvec.json"


# ---------------------------------------------------------------------------
# Helpers


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


def single_threaded(fn):
    """Run a streaming operation with one intra-op thread.

    The element-wise work is memory-bound: extra OpenMP threads add spin and
    barrier waits, and on a busy machine they double wall and CPU time.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False, dynamic_ncols=True)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one reduction pass, no tensor-sized temporaries.

    A NaN or Inf always makes the sum non-finite; only a sum that overflows
    needs the exact element-wise check.
    """
    if t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, what: str, name: str) -> None:
    if not _all_finite(t):
        raise TaskvecError(f"{what} has NaN or Inf values in tensor {name!r}")


def _check_result(t: torch.Tensor, name: str, inputs: Sequence[tuple[str, Callable[[], torch.Tensor]]], what: str) -> None:
    """A non-finite result names its cause: the first non-finite input, or an overflow."""
    if _all_finite(t):
        return
    for label, read in inputs:
        _check_finite(read(), label, name)
    raise TaskvecError(f"{what} tensor {name!r} overflows float32 (are the λ too large?)")


def _float_names(src: TensorSource) -> list[str]:
    return sorted(n for n, i in src.infos().items() if i.is_float)


def read_ledger(model_dir: Path) -> dict | None:
    path = Path(model_dir) / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise TaskvecError(f"{path}: corrupt edit ledger (not JSON)") from None


def root_hash(src: TensorSource, model_dir: Path) -> tuple[str, str, dict | None]:
    """(own content hash, hash of the base it descends from, valid ledger or None).

    A model written by :func:`apply` descends from the base named in its
    ledger, provided the ledger's recorded output hash matches the weights.
    """
    own = src.content_hash()
    ledger = read_ledger(model_dir) if model_dir.is_dir() else None
    if ledger and ledger.get("output_hash") == own:
        return own, ledger["base_hash"], ledger
    return own, own, None


# ---------------------------------------------------------------------------
# extract


@dataclass
class VectorResult:
    path: Path
    sha256: str
    param_count: int
    tensors: int
    base_hash: str


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
) -> VectorResult:
    """τ = θ_ft − θ_base over the shared floating tensors selected by include/exclude.

    ``finetuned`` may be a PEFT LoRA adapter folder: τ = scaling·B·A (:mod:`taskvec.adapters`).
    """
    from taskvec.adapters import extract_adapter, is_adapter_dir

    if is_adapter_dir(finetuned):
        return extract_adapter(base, finetuned, out, include=include, exclude=exclude, dtype=dtype, allow_pickle=allow_pickle, progress=progress, force=force)
    bdir, fdir = resolve_model(base), resolve_model(finetuned)
    dest = check_output(out, [bdir, fdir], kind="file", force=force)
    with TensorSource(bdir, allow_pickle=allow_pickle) as b, TensorSource(fdir, allow_pickle=allow_pickle) as f:
        selected = select_names(_float_names(b), include, exclude)
        ft_selected = select_names(_float_names(f), include, exclude)
        extra = sorted(set(ft_selected) - set(selected))
        if extra:
            raise HomologyError(f"tensor {extra[0]!r} is in the fine-tuned model but not in the base (exclude it with --exclude)")
        for name in selected:
            bi = b.info(name)
            if name not in f:
                raise HomologyError(f"tensor {name!r} is in the base but not in the fine-tuned model (exclude it with --exclude)")
            fi = f.info(name)
            if fi.shape != bi.shape:
                raise HomologyError(f"tensor {name!r} has shape {list(fi.shape)} in the fine-tuned model but {list(bi.shape)} in the base")
            if fi.dtype != bi.dtype:
                raise HomologyError(f"tensor {name!r} has dtype {fi.dtype} in the fine-tuned model but {bi.dtype} in the base")
        if not selected:
            raise TaskvecError("empty task vector: no floating tensors left after --include/--exclude")
        header = VectorHeader(
            base_model=str(base),
            base_hash="0" * 64,
            dtype=dtype,
            recipe={"op": "extract", "finetuned_hash": f.content_hash(), "include": list(include), "exclude": list(exclude)},  # path-free: same τ, same sha256
        )
        selected_set = set(selected)
        hasher = ContentHasher()
        total = sum(b.info(n).nbytes for n in b.names())
        with VectorWriter(dest, {n: b.info(n).shape for n in selected}, header) as w, _progress(total, "extract", progress) as bar:
            scratch = Scratch()  # two buffers in flight: base and fine-tuned
            for name in sorted(b.names()):
                t = b.read(name, scratch, "base")
                info = b.info(name)
                hasher.update(name, info.dtype, info.shape, _tensor_bytes(t))
                if name in selected_set:
                    tau = f.read_float32(name, scratch, "ft").sub_(t.to(torch.float32))
                    _check_result(tau, name, [("base model", lambda n=name: b.read(n)), ("fine-tuned model", lambda n=name: f.read(n))], "task-vector")
                    w.write(name, tau)
                bar.update(info.nbytes)
            base_hash = hasher.hexdigest()
            w.set_base_hash(base_hash)
        b.remember_content_hash(base_hash)
        return VectorResult(Path(out), w.sha256, w.param_count, len(selected), base_hash)


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

    def combine(self, name: str, taus: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
        seeds = [algebra.tensor_seed(self.seed, i, name) for i in range(len(taus))]
        return algebra.merge(self.method, taus, lambdas, density=self.density, drop=self.drop, seeds=seeds)


def _open_vectors(vectors: Sequence[tuple[str | os.PathLike, float]]) -> list[VectorFile]:
    if not vectors:
        raise TaskvecError("no task vectors given")
    for _, lam in vectors:
        algebra.check_lambda(lam)
    vfs = [VectorFile(p) for p, _ in vectors]
    check_vectors_homologous(vfs)
    return vfs


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
        total = sum(4 * math.prod(ref.shape(n)) for n in ref.names) * len(vfs)
        with VectorWriter(dest, ref.shapes(), header) as w, _progress(total, "combine", progress) as bar:
            for name in ref.names:
                taus = [v.read(name) for v in vfs]
                merged = options.combine(name, taus, lambdas)
                _check_result(merged, name, [(f"vector {v.path.name}", lambda v=v: v.read(name)) for v in vfs], "combined")
                w.write(name, merged)
                bar.update(4 * merged.numel() * len(vfs))
        return VectorResult(Path(out), w.sha256, w.param_count, len(ref.names), ref.base_hash)
    finally:
        for v in vfs:
            v.close()


# ---------------------------------------------------------------------------
# apply and merge: write a complete model folder


_WEIGHT_FILE = re.compile(r"(.*\.safetensors|.*\.bin|.*\.pt|.*\.pth|.*\.ckpt|.*\.h5|.*\.msgpack|.*\.onnx|.*\.gguf|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json)$")
_SKIP = {".git", ".cache", LEDGER_FILE, SAFE_INDEX, PICKLE_INDEX, PICKLE_WEIGHTS, "onnx", "openvino"}


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files (and sub-folders) of a model folder."""
    if not src.is_dir():
        return
    for item in src.iterdir():
        if item.name in _SKIP or _WEIGHT_FILE.fullmatch(item.name) or user_path(item) != str(item):
            continue  # weights, ledgers, and temp files of taskvec writers
        if item.is_dir():
            if is_taskvec_folder(item):
                continue  # an earlier taskvec output saved inside the model folder: not part of the model
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns(*_SKIP))
        else:
            shutil.copy2(item, dst / item.name)


class _BackgroundWriter:
    """Write and hash each output tensor on worker threads while the next one is read and computed.

    File writes and sha256 release the GIL, so writing, hashing and reading
    overlap (one thread each). At most one tensor is in the workers' hands:
    :meth:`submit` waits for the previous one, so the caller may reuse a
    buffer two submissions later.
    """

    def __init__(self, writer: ShardedWriter, hasher: ContentHasher):
        self._writer, self._hasher = writer, hasher
        self._write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-write")
        self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-hash")
        self._pending: list = []

    def submit(self, name: str, info, t: torch.Tensor) -> None:
        self.wait()
        self._pending = [
            self._write_pool.submit(self._writer.write, name, t),
            self._hash_pool.submit(self._hasher.update, name, info.dtype, info.shape, _tensor_bytes(t)),
        ]

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a write error here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._write_pool.shutdown(wait=True)
            self._hash_pool.shutdown(wait=True)


def _write_model(
    src: TensorSource,
    src_dir: Path,
    out: str | os.PathLike,
    covered: set[str],
    compute,  # (name, scratch, out_slot) -> new float32 tensor, in scratch[out_slot] or fresh memory
    inputs,  # name -> [(label, reader)] of the other inputs, to explain a non-finite result
    ledger: dict,
    *,
    max_shard_bytes: int,
    progress: bool,
    desc: str,
) -> dict:
    names = sorted(src.names())
    specs = [TensorSpec(n, torch_dtype(src.info(n).dtype), src.info(n).shape) for n in names]
    scratch = Scratch()
    total = sum(src.info(n).nbytes for n in names)
    hasher = ContentHasher()
    with atomic_dir(out) as tmp:
        copy_model_files(src_dir, tmp)
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        background = _BackgroundWriter(writer, hasher)
        try:
            with _progress(total, desc, progress) as bar:
                for i, spec in enumerate(specs):
                    out_slot = f"out{i % 2}"  # the writer may still hold the other one
                    info = src.info(spec.name)
                    if spec.name in covered:
                        new = compute(spec.name, scratch, out_slot)
                        _check_result(new, spec.name, [("base model", lambda n=spec.name: src.read(n))] + inputs(spec.name), "edited")
                        t = new.to(spec.dtype)
                    else:
                        t = src.read(spec.name, scratch, out_slot)
                    background.submit(spec.name, info, t)
                    bar.update(info.nbytes)
        finally:
            background.close()
        writer.close()
        ledger = {**ledger, "output_hash": hasher.hexdigest(), "weight_files": writer.files}
        (tmp / LEDGER_FILE).write_text(json.dumps(ledger, indent=2, sort_keys=True) + "\n")
    return ledger


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
            own, root, parent = root_hash(b, bdir)
            if root != ref.base_hash:
                raise HomologyError(
                    f"base content hash {own[:12]} differs from the hash {ref.base_hash[:12]} recorded in vector {ref.path.name} "
                    f"(taken from {ref.base_model}); apply it to the model it was extracted from"
                )
            edits = list(parent["edits"]) if parent else []
            edits += [
                {"vector_sha256": v.sha256, "vector": v.path.name, "lambda": lam, **options.record()}
                for v, lam in zip(vfs, lambdas)
            ] if options.method == "sum" else [
                {"merge": [{"vector_sha256": v.sha256, "vector": v.path.name, "lambda": lam} for v, lam in zip(vfs, lambdas)], **options.record()}
            ]
            ledger = {
                "format": 1,
                "base_model": parent["base_model"] if parent else str(base),
                "base_hash": root,
                "edits": edits,
            }

            def compute(name: str, scratch: Scratch, out_slot: str) -> torch.Tensor:
                tb = b.read_float32(name, scratch, out_slot)  # the result is built in place
                if options.method == "sum":  # θ + λ_1 τ_1 + λ_2 τ_2 …, one vector in flight
                    for v, lam in zip(vfs, lambdas):
                        tb.add_(v.read(name, scratch, "vector"), alpha=lam)
                    return tb
                return tb.add_(options.combine(name, [v.read(name) for v in vfs], lambdas))

            def inputs(name: str):
                return [(f"vector {v.path.name}", lambda v=v: v.read(name)) for v in vfs]

            return _write_model(b, bdir, dest, set(ref.names), compute, inputs, ledger, max_shard_bytes=max_shard_bytes, progress=progress, desc="apply")
    finally:
        for v in vfs:
            v.close()


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
                for name in covered:
                    if name not in s:
                        raise HomologyError(f"tensor {name!r} is in the base but not in {path}")
                    if s.info(name).shape != b.info(name).shape:
                        raise HomologyError(f"tensor {name!r} has shape {list(s.info(name).shape)} in {path} but {list(b.info(name).shape)} in the base")
                    if s.info(name).dtype != b.info(name).dtype:
                        raise HomologyError(f"tensor {name!r} has dtype {s.info(name).dtype} in {path} but {b.info(name).dtype} in the base")
            ledger = {
                "format": 1,
                "base_model": str(base),
                "base_hash": None,
                "edits": [{"finetuned": str(p), "lambda": lam, "include": list(include), "exclude": list(exclude), **options.record()} for p, lam in finetuned],
            }
            sum_fast = options.method == "sum"

            def compute(name: str, scratch: Scratch, out_slot: str) -> torch.Tensor:
                tb = b.read_float32(name, scratch, "base")
                if sum_fast:  # Σ λ_t (θ_t − θ), then + θ (mergekit's order), built in the output slot
                    acc = srcs[0].read_float32(name, scratch, out_slot).sub_(tb).mul_(lambdas[0])
                    for s, lam in zip(srcs[1:], lambdas[1:]):
                        acc.add_(s.read_float32(name, scratch, "ft").sub_(tb), alpha=lam)
                    return acc.add_(tb)
                taus = [s.read_float32(name).sub_(tb) for s in srcs]
                return torch.add(tb, options.combine(name, taus, lambdas))  # fresh: "base" is reused next

            def inputs(name: str):
                return [(f"fine-tuned model {p}", lambda s=s: s.read(name)) for (p, _), s in zip(finetuned, srcs)]

            return _write_model(b, bdir, dest, set(covered), compute, inputs, ledger, max_shard_bytes=max_shard_bytes, progress=progress, desc="merge")
    finally:
        for s in srcs:
            s.close()


# ---------------------------------------------------------------------------
# compress: sparse and/or low-precision storage


@single_threaded
def compress(
    vector: str | os.PathLike,
    out: str | os.PathLike,
    *,
    density: float | None = None,
    drop: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    force: bool = False,
) -> dict:
    """Store a vector sparsified (top-k by magnitude, or DARE) and/or in float16/bfloat16.

    Returns the reconstruction error against the input: relative L2
    ``‖τ − τ̂‖ / ‖τ‖``, maximum absolute error, kept fraction and sizes.
    """
    if density is not None and drop is not None:
        raise TaskvecError("choose one sparsifier: --density (top-k) or --drop (DARE)")
    if density is not None:
        algebra.check_density(density)
    if drop is not None:
        algebra.check_drop(drop)
    with VectorFile(vector) as vf:
        dest = check_output(out, [vector], kind="file", force=force)
        storage: dict = {"kind": "dense"}
        if density is not None:
            storage = {"kind": "sparse", "method": "topk", "density": density}
        elif drop is not None:
            storage = {"kind": "sparse", "method": "dare", "drop": drop, "seed": seed}
        header = VectorHeader(
            base_model=vf.base_model,
            base_hash=vf.base_hash,
            dtype=dtype,
            recipe={"op": "compress", "input": vf.sha256, **{k: v for k, v in storage.items() if k != "kind"}, "dtype": str(dtype).removeprefix("torch.")},
            storage=storage,
        )
        err2 = norm2 = 0.0
        max_abs = 0.0
        kept = 0
        sparse_items = []
        writer = None if storage["kind"] == "sparse" else VectorWriter(dest, vf.shapes(), header)
        total = 4 * vf.param_count
        with _progress(total, "compress", progress) as bar:
            if writer:
                writer.__enter__()
            try:
                for name in vf.names:
                    tau = vf.read(name)
                    if density is not None:
                        approx = algebra.magnitude_prune(tau, density)
                    elif drop is not None:
                        approx = algebra.dare(tau, drop, algebra.tensor_seed(seed, 0, name))
                    else:
                        approx = tau
                    approx = approx.to(dtype).to(torch.float32)
                    if writer:
                        writer.write(name, approx)
                        kept += approx.numel()
                    else:
                        idx = torch.nonzero(approx.reshape(-1)).reshape(-1)
                        sparse_items.append((name, tuple(tau.shape), idx, approx.reshape(-1)[idx]))
                        kept += idx.numel()
                    diff = tau - approx
                    err2 += float(diff.double().pow(2).sum())
                    norm2 += float(tau.double().pow(2).sum())
                    max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
                    bar.update(4 * tau.numel())
            except BaseException as exc:
                if writer:
                    writer.__exit__(type(exc), exc, None)
                raise
            if writer:
                writer.__exit__(None, None, None)
                sha = writer.sha256
            else:
                sha = write_sparse_vector(dest, header, sparse_items, vf.names, vf.param_count)
        return {
            "path": str(out),
            "sha256": sha,
            "storage": storage["kind"],
            "dtype": str(dtype).removeprefix("torch."),
            "kept_fraction": kept / max(vf.param_count, 1),
            "relative_l2_error": math.sqrt(err2 / norm2) if norm2 else 0.0,
            "max_abs_error": max_abs,
            "input_bytes": vf.path.stat().st_size,
            "output_bytes": dest.stat().st_size,
        }
