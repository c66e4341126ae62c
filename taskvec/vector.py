"""The task-vector file format.

A task vector is a safetensors file. Its tensors are τ = θ_ft − θ_pre under
the base model's own tensor names; its header metadata (safetensors allows
string → string) records, under ``taskvec.*`` keys:

==========================  ===================================================
``taskvec.format``          format version (``"1"``)
``taskvec.base_model``      id or folder of the base model it was taken from
``taskvec.base_hash``       content hash of the base weights (see
                            :meth:`taskvec.io.TensorSource.content_hash`)
``taskvec.param_count``     number of scalar parameters covered
``taskvec.dtype``           storage dtype of the values (``float32`` …)
``taskvec.names``           JSON list of the included tensor names
``taskvec.recipe``          JSON: how it was made (extract / combine /
                            compress, with inputs, λ, method and options)
``taskvec.storage``         JSON: ``{"kind": "dense"}``, or for a sparsified
                            vector ``{"kind": "sparse", "shapes": {…}}``
``taskvec.version``         taskvec version that wrote it
==========================  ===================================================

A sparse vector stores each tensor as ``NAME::indices`` (flat int32/int64
positions) and ``NAME::values``; readers densify transparently. The header
carries no timestamps, so equal inputs give byte-identical files, and the
file's own sha256 is the vector's identity.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from taskvec.lazy import torch

from taskvec import __version__
from taskvec.errors import FormatError, HomologyError, TaskvecError
from taskvec.io import Scratch, StreamingWriter, TensorSource, TensorSpec, atomic_path, file_sha256, regular_file_size

FORMAT_VERSION = "1"
SPARSE_SEP = "::"
_RESERVE = 512  # header bytes kept free so the base hash can be filled in at the end
_REQUIRED = ("taskvec.base_model", "taskvec.base_hash", "taskvec.param_count", "taskvec.dtype", "taskvec.names", "taskvec.recipe", "taskvec.storage")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VectorFile:
    """Lazy reader of a task-vector file: header on open, tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not os.path.lexists(self.path) or (self.path.is_symlink() and not self.path.exists()):
            raise TaskvecError(f"task vector not found: {self.path}")
        regular_file_size(self.path, "task-vector file")
        self._src = TensorSource(self.path)
        self._densified: tuple[str, torch.Tensor] | None = None
        try:
            self._validate()
        except BaseException:
            self._src.close()
            raise

    def _validate(self) -> None:
        meta = self._src.metadata
        if meta.get("taskvec.format") is None:
            raise FormatError(f"{self.path}: not a taskvec task vector (no taskvec.format in its header)")
        if meta["taskvec.format"] != FORMAT_VERSION:
            raise FormatError(f"{self.path}: unsupported task-vector format version {meta['taskvec.format']!r}")
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise FormatError(f"{self.path}: corrupt task-vector header (no {missing[0]})")
        self.base_model = meta["taskvec.base_model"]
        self.base_hash = meta["taskvec.base_hash"]
        if not _HEX64.fullmatch(self.base_hash):
            raise FormatError(f"{self.path}: corrupt task-vector header (taskvec.base_hash is not a sha256 hex digest)")
        if not re.fullmatch(r"[0-9]{1,20}", meta["taskvec.param_count"]):
            raise FormatError(f"{self.path}: corrupt task-vector header (taskvec.param_count is not a non-negative integer)")
        self.param_count = int(meta["taskvec.param_count"])
        self.dtype = meta["taskvec.dtype"]
        self.names: list[str] = self._json("taskvec.names", list, "list of tensor names")
        if not all(isinstance(n, str) and n for n in self.names):
            raise FormatError(f"{self.path}: corrupt task-vector header (taskvec.names must be a JSON list of tensor names)")
        if len(set(self.names)) != len(self.names):
            dup = next(n for i, n in enumerate(self.names) if n in self.names[:i])
            raise FormatError(f"{self.path}: corrupt task-vector header (tensor {dup!r} is named twice in taskvec.names)")
        self.recipe: dict = self._json("taskvec.recipe", dict, "object")
        self.storage: dict = self._json("taskvec.storage", dict, "object")
        kind = self.storage.get("kind", "dense")
        if kind not in ("dense", "sparse", "lowrank"):
            raise FormatError(f"{self.path}: corrupt task-vector header (storage kind {kind!r} is not dense, sparse or lowrank)")
        self.metadata = dict(meta)
        self.sparse = kind == "sparse"
        self.lowrank = kind == "lowrank"  # LoRA factors: see taskvec.adapters
        stored = set(self._src.names())
        if self.sparse:
            shapes = self.storage.get("shapes")
            if not isinstance(shapes, dict) or set(shapes) != set(self.names):
                raise FormatError(f"{self.path}: corrupt task-vector header (sparse storage must give a shape for every name in taskvec.names)")
            for name, shape in shapes.items():
                if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                    raise FormatError(f"{self.path}: corrupt task-vector header (shape of {name!r} is not a list of non-negative integers)")
            self._shapes = {k: tuple(v) for k, v in shapes.items()}
            expected = {f"{n}{SPARSE_SEP}{part}" for n in self.names for part in ("indices", "values")}
        elif self.lowrank:
            shapes, factors = self.storage.get("shapes"), self.storage.get("factors")
            if not isinstance(shapes, dict) or set(shapes) != set(self.names) or not isinstance(factors, (list, dict)) or not all(isinstance(f, str) and f in shapes for f in factors):
                raise FormatError(f"{self.path}: corrupt task-vector header (lowrank storage must give a shape for every name and factors of named tensors)")
            for name, shape in shapes.items():
                if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                    raise FormatError(f"{self.path}: corrupt task-vector header (shape of {name!r} is not a list of non-negative integers)")
            self._shapes = {k: tuple(v) for k, v in shapes.items()}
            expected = {f"{n}{SPARSE_SEP}{part}" for n in self.storage["factors"] for part in ("lora_A", "lora_B")}
        else:
            self._shapes = {n: self._src.info(n).shape for n in self._src.names()}
            expected = set(self.names)
        if stored != expected:
            missing = sorted(expected - stored) or sorted(stored - expected)
            raise FormatError(f"{self.path}: header names do not match stored tensors (first: {missing[0]!r})")
        if not self.names:
            raise TaskvecError(f"{self.path}: empty task vector (no tensors)")
        if self.sparse:
            self._check_sparse()
        elif not self.lowrank:
            for name in self.names:
                if not self._src.info(name).is_float:
                    raise FormatError(f"{self.path}: tensor {name!r} is stored as {self._src.info(name).dtype}, not floating point")
        total = sum(_numel(self._shapes[n]) for n in self.names)
        if total != self.param_count:
            raise FormatError(f"{self.path}: corrupt task-vector header (taskvec.param_count {self.param_count} but the tensors hold {total} values)")

    def _json(self, key: str, typ: type, what: str):
        try:
            value = json.loads(self._src.metadata[key])
        except (ValueError, RecursionError):
            raise FormatError(f"{self.path}: corrupt task-vector header ({key} is not valid JSON)") from None
        if not isinstance(value, typ):
            raise FormatError(f"{self.path}: corrupt task-vector header ({key} must be a JSON {what}, not {type(value).__name__})")
        return value

    def _check_sparse(self) -> None:
        """Every declared size bounded before anything is allocated from it."""
        memory = _physical_memory()
        for name in self.names:
            idx = self._src.info(f"{name}{SPARSE_SEP}indices")
            vals = self._src.info(f"{name}{SPARSE_SEP}values")
            numel = _numel(self._shapes[name])
            if idx.dtype not in ("I32", "I64") or len(idx.shape) != 1:
                raise FormatError(f"{self.path}: sparse indices of {name!r} must be a flat int32/int64 tensor")
            if not vals.is_float or len(vals.shape) != 1:
                raise FormatError(f"{self.path}: sparse values of {name!r} must be a flat floating-point tensor")
            if idx.shape != vals.shape:
                raise FormatError(f"{self.path}: sparse tensor {name!r} has {idx.shape[0]} indices but {vals.shape[0]} values")
            if idx.shape[0] > numel:
                raise FormatError(f"{self.path}: sparse tensor {name!r} has {idx.shape[0]} indices for a shape of {numel} values")
            if memory and 4 * numel > memory:
                raise FormatError(
                    f"{self.path}: sparse tensor {name!r} declares a dense shape {list(self._shapes[name])} "
                    f"of {4 * numel / 2**30:.1f} GiB, more than this machine's memory"
                )

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self._shapes[n] for n in self.names}

    def read(self, name: str, scratch: Scratch | None = None, slot: str = "") -> torch.Tensor:
        """Dense float32 values of one tensor (a view into ``scratch[slot]`` if given and dense)."""
        if self.lowrank:
            from taskvec.adapters import read_lowrank

            return read_lowrank(self._src, name, self._shapes[name], self.storage["factors"].get(name))
        if not self.sparse:
            return self._src.read_float32(name, scratch, slot)
        idx = self._src.read(f"{name}{SPARSE_SEP}indices").to(torch.int64)
        vals = self._src.read_float32(f"{name}{SPARSE_SEP}values")
        shape = self._shapes[name]
        numel = _numel(shape)
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
            raise FormatError(f"{self.path}: sparse indices of {name!r} must be strictly increasing positions in [0, {numel})")
        out = torch.zeros(shape, dtype=torch.float32)
        out.view(-1)[idx] = vals
        return out

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._src.stored_dtype(name) if not (self.sparse or self.lowrank) else torch.float32

    def _dense(self, name: str) -> torch.Tensor:
        """The whole densified tensor of a sparse or low-rank vector, kept while its chunks are read."""
        if self._densified is None or self._densified[0] != name:
            self._densified = None
            self._densified = (name, self.read(name).reshape(-1))
        return self._densified[1]

    def read_range_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        if self.sparse or self.lowrank:
            return out.copy_(self._dense(name)[start:stop])
        return self._src.read_range_into(name, start, stop, out)

    def read_range(self, name: str, start: int, stop: int, scratch: Scratch, slot: str) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened (densified) tensor, in ``scratch[slot]`` (the caller may modify them)."""
        if self.sparse or self.lowrank:
            n = 4 * (stop - start)
            return self.read_range_into(name, start, stop, scratch.get(slot, n)[:n].view(torch.float32))
        return self._src.read_range(name, start, stop, scratch, slot)

    def read_range_float32(self, name: str, start: int, stop: int, scratch: Scratch, slot: str) -> torch.Tensor:
        if self.sparse or self.lowrank:
            return self.read_range(name, start, stop, scratch, slot)
        return self._src.read_range_float32(name, start, stop, scratch, slot)

    def advise(self, name: str) -> None:
        if not (self.sparse or self.lowrank):
            self._src.advise(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.read(name)

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> VectorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "base_model": self.base_model,
            "base_hash": self.base_hash,
            "param_count": self.param_count,
            "tensors": len(self.names),
            "dtype": self.dtype,
            "storage": self.storage.get("kind"),
            "recipe": self.recipe,
        }


@dataclass
class VectorHeader:
    """What a writer must know before the first tensor is written."""

    base_model: str
    base_hash: str
    recipe: dict
    dtype: torch.dtype | None = None  # None: float32 (a default that does not import torch)
    storage: dict = field(default_factory=lambda: {"kind": "dense"})

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = torch.float32

    def metadata(self, names: list[str], param_count: int) -> dict[str, str]:
        return {
            "taskvec.format": FORMAT_VERSION,
            "taskvec.base_model": self.base_model,
            "taskvec.base_hash": self.base_hash,
            "taskvec.param_count": str(param_count),
            "taskvec.dtype": _dtype_name(self.dtype),
            "taskvec.names": json.dumps(names),
            "taskvec.recipe": json.dumps(self.recipe, sort_keys=True),
            "taskvec.storage": json.dumps(self.storage, sort_keys=True),
            "taskvec.version": __version__,
        }


class VectorWriter:
    """Stream a dense task vector to ``dest`` atomically.

    Use as a context manager; :meth:`write` each tensor in the declared order.
    ``base_hash`` may be filled in by :meth:`set_base_hash` before the end
    (extract learns it while streaming).
    """

    def __init__(self, dest: str | os.PathLike, shapes: dict[str, tuple[int, ...]], header: VectorHeader, *, hash_file: bool = True):
        self.dest = Path(dest)
        self.header = header
        self.names = list(shapes)
        if not self.names:
            raise TaskvecError("empty task vector: no tensors selected")
        self.param_count = sum(_numel(s) for s in shapes.values())
        self._specs = [TensorSpec(n, header.dtype, tuple(s)) for n, s in shapes.items()]
        self._atomic = None
        self._writer: StreamingWriter | None = None
        self._hash_file = hash_file  # sha256 while writing (useless when set_base_hash will rewrite the header)
        self.sha256: str | None = None

    def __enter__(self) -> VectorWriter:
        self._atomic = atomic_path(self.dest)
        tmp = self._atomic.__enter__()
        self._writer = StreamingWriter(tmp, self._specs, self.header.metadata(self.names, self.param_count), reserve=_RESERVE, hash_file=self._hash_file)
        return self

    def write(self, name: str, tau: torch.Tensor) -> None:
        """Append τ of ``name`` (whole, or its next flat part), stored in the header's dtype."""
        self._writer.write(name, tau.to(self.header.dtype))

    def set_base_hash(self, digest: str) -> None:
        self.header.base_hash = digest
        self._writer.update_metadata({"taskvec.base_hash": digest})

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._writer.close()
            else:
                self._writer.__exit__(exc_type, exc, tb)
        finally:
            self._atomic.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.sha256 = self._writer.sha256 or file_sha256(self.dest)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def write_sparse_vector(dest: str | os.PathLike, header: VectorHeader, items: Iterable[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor]], names: list[str], param_count: int) -> str:
    """Write a sparse vector; ``items`` yields (name, shape, flat indices, values).

    Sparse tensors are small (that is the point), so they are collected before
    writing. Returns the file's sha256.
    """
    specs: list[TensorSpec] = []
    data: list[tuple[str, torch.Tensor]] = []
    shapes: dict[str, list[int]] = {}
    for name, shape, idx, vals in items:
        idx = idx.to(torch.int32 if _numel(shape) < 2**31 else torch.int64)
        vals = vals.to(header.dtype)
        specs += [TensorSpec(f"{name}{SPARSE_SEP}indices", idx.dtype, tuple(idx.shape)), TensorSpec(f"{name}{SPARSE_SEP}values", vals.dtype, tuple(vals.shape))]
        data += [(specs[-2].name, idx), (specs[-1].name, vals)]
        shapes[name] = list(shape)
    header.storage = {**header.storage, "kind": "sparse", "shapes": shapes}
    with atomic_path(dest) as tmp:
        with StreamingWriter(tmp, specs, header.metadata(names, param_count)) as w:
            for name, t in data:
                w.write(name, t)
    return file_sha256(dest)


# ---------------------------------------------------------------------------
# Homology between vectors


def check_vectors_homologous(vectors: list[VectorFile]) -> None:
    """Same base hash, same tensor names and shapes — or a one-line error naming the first mismatch."""
    if not vectors:
        raise TaskvecError("no task vectors given")
    ref = vectors[0]
    for v in vectors[1:]:
        if v.base_hash != ref.base_hash:
            raise HomologyError(
                f"{v.path.name} was taken from base {v.base_hash[:12]} but {ref.path.name} from base {ref.base_hash[:12]}; "
                "vectors must share their base model"
            )
        if v.names != ref.names:
            a, b = set(ref.names), set(v.names)
            diff = sorted(a ^ b)
            first = diff[0] if diff else next(x for x, y in zip(ref.names, v.names) if x != y)
            where = ref.path.name if first in a else v.path.name
            raise HomologyError(f"tensor {first!r} is only in {where} (vectors {ref.path.name} and {v.path.name} cover different tensors)")
        for name in ref.names:
            if v.shape(name) != ref.shape(name):
                raise HomologyError(f"tensor {name!r} has shape {list(v.shape(name))} in {v.path.name} but {list(ref.shape(name))} in {ref.path.name}")


# ---------------------------------------------------------------------------
# In-memory task vectors (the idea in one small class)


class TaskVector:
    """A task vector held in memory: ``dict[name, float32 tensor]`` plus metadata.

    For small models and for the λ search; the engine streams files instead.
    Supports ``+``, ``-``, unary ``-`` and scalar ``*`` like the paper's class.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
        self.tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
        self.metadata = dict(metadata or {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        with VectorFile(path) as vf:
            tv = cls(dict(vf), vf.describe())
        return tv

    @classmethod
    def from_state_dicts(cls, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> TaskVector:
        return cls({k: finetuned[k].float() - base[k].float() for k in base if k in finetuned and base[k].is_floating_point()})

    def _check(self, other: TaskVector) -> None:
        if set(self.tensors) != set(other.tensors):
            raise HomologyError("task vectors cover different tensors")

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check(other)
        return TaskVector({k: v + other.tensors[k] for k, v in self.tensors.items()})

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.tensors.items()})

    def __mul__(self, lam: float) -> TaskVector:
        return TaskVector({k: v * float(lam) for k, v in self.tensors.items()})

    __rmul__ = __mul__

    def apply_to(self, state_dict: dict[str, torch.Tensor], lam: float = 1.0) -> dict[str, torch.Tensor]:
        out = dict(state_dict)
        for k, v in self.tensors.items():
            if k not in state_dict:
                raise HomologyError(f"tensor {k!r} is in the vector but not in the model")
            base = state_dict[k]
            out[k] = (base.float() + lam * v).to(base.dtype)
        return out


#: λ in ``PATH:LAMBDA``: a plain decimal or scientific number (no ``_``, ``inf``, ``nan`` or hex).
LAMBDA_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_vector_arg(arg: str) -> tuple[str, float]:
    """``PATH[:LAMBDA]`` → (path, λ); λ defaults to 1 (mergekit's convention).

    LAMBDA must match :data:`LAMBDA_RE`. A path that itself contains ``:``
    is taken whole when no λ follows it; ``PATH:λ`` is refused as ambiguous
    when a file literally named ``PATH:λ`` exists beside ``PATH``.
    """
    path, sep, lam = arg.rpartition(":")
    if not sep or not path:
        return arg, 1.0
    literal = os.path.lexists(arg)
    if not LAMBDA_RE.fullmatch(lam):
        if literal:
            return arg, 1.0
        raise TaskvecError(
            f"bad vector argument {arg!r}: lambda must be a finite number in plain decimal after ':' (such as 0.5, -1 or 2e-3)"
        )
    if literal:
        if os.path.lexists(path):
            raise TaskvecError(
                f"ambiguous vector argument {arg!r}: both a file named {arg!r} and {path!r} exist; "
                f"write {arg + ':1'!r} for the first, or rename it"
            )
        return arg, 1.0
    from taskvec.algebra import check_lambda

    return path, check_lambda(float(lam))


__all__ = [
    "FORMAT_VERSION",
    "TaskVector",
    "VectorFile",
    "VectorHeader",
    "VectorWriter",
    "check_vectors_homologous",
    "parse_vector_arg",
    "write_sparse_vector",
]
