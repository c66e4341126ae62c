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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from taskvec import __version__
from taskvec.errors import FormatError, HomologyError, TaskvecError
from taskvec.io import Scratch, StreamingWriter, TensorSource, TensorSpec, atomic_path, file_sha256

FORMAT_VERSION = "1"
SPARSE_SEP = "::"
_RESERVE = 512  # header bytes kept free so the base hash can be filled in at the end


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VectorFile:
    """Lazy reader of a task-vector file: header on open, tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TaskvecError(f"task vector not found: {self.path}")
        self._src = TensorSource(self.path)
        meta = self._src.metadata
        if meta.get("taskvec.format") is None:
            raise FormatError(f"{self.path}: not a taskvec task vector (no taskvec.format in its header)")
        if meta["taskvec.format"] != FORMAT_VERSION:
            raise FormatError(f"{self.path}: unsupported task-vector format version {meta['taskvec.format']!r}")
        try:
            self.base_model = meta["taskvec.base_model"]
            self.base_hash = meta["taskvec.base_hash"]
            self.param_count = int(meta["taskvec.param_count"])
            self.dtype = meta["taskvec.dtype"]
            self.names: list[str] = json.loads(meta["taskvec.names"])
            self.recipe: dict = json.loads(meta["taskvec.recipe"])
            self.storage: dict = json.loads(meta["taskvec.storage"])
        except (KeyError, ValueError) as exc:
            raise FormatError(f"{self.path}: corrupt task-vector header ({exc})") from None
        self.metadata = dict(meta)
        self.sparse = self.storage.get("kind") == "sparse"
        self.lowrank = self.storage.get("kind") == "lowrank"  # LoRA factors: see taskvec.adapters
        if self.sparse:
            self._shapes = {k: tuple(v) for k, v in self.storage["shapes"].items()}
            expected = {f"{n}{SPARSE_SEP}{part}" for n in self.names for part in ("indices", "values")}
        elif self.lowrank:
            self._shapes = {k: tuple(v) for k, v in self.storage["shapes"].items()}
            expected = {f"{n}{SPARSE_SEP}{part}" for n in self.storage["factors"] for part in ("lora_A", "lora_B")}
        else:
            self._shapes = {n: self._src.info(n).shape for n in self._src.names()}
            expected = set(self.names)
        if set(self._src.names()) != expected:
            missing = sorted(expected - set(self._src.names())) or sorted(set(self._src.names()) - expected)
            raise FormatError(f"{self.path}: header names do not match stored tensors (first: {missing[0]!r})")
        if not self.names:
            raise TaskvecError(f"{self.path}: empty task vector (no tensors)")

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
        out = torch.zeros(shape, dtype=torch.float32)
        out.view(-1)[idx] = vals
        return out

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
    dtype: torch.dtype = torch.float32
    storage: dict = field(default_factory=lambda: {"kind": "dense"})

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

    def __init__(self, dest: str | os.PathLike, shapes: dict[str, tuple[int, ...]], header: VectorHeader):
        self.dest = Path(dest)
        self.header = header
        self.names = list(shapes)
        if not self.names:
            raise TaskvecError("empty task vector: no tensors selected")
        self.param_count = sum(_numel(s) for s in shapes.values())
        self._specs = [TensorSpec(n, header.dtype, tuple(s)) for n, s in shapes.items()]
        self._atomic = None
        self._writer: StreamingWriter | None = None
        self.sha256: str | None = None

    def __enter__(self) -> VectorWriter:
        self._atomic = atomic_path(self.dest)
        tmp = self._atomic.__enter__()
        self._writer = StreamingWriter(tmp, self._specs, self.header.metadata(self.names, self.param_count), reserve=_RESERVE)
        return self

    def write(self, name: str, tau: torch.Tensor) -> None:
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
            self.sha256 = file_sha256(self.dest)


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


def parse_vector_arg(arg: str) -> tuple[str, float]:
    """``PATH[:LAMBDA]`` → (path, λ); λ defaults to 1 (mergekit's convention)."""
    path, sep, lam = arg.rpartition(":")
    if not sep or not path:
        return arg, 1.0
    try:
        value = float(lam)
    except ValueError:
        if os.path.exists(arg):
            return arg, 1.0
        raise TaskvecError(f"bad vector argument {arg!r}: λ after ':' must be a number") from None
    from taskvec.algebra import check_lambda

    return path, check_lambda(value)


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
