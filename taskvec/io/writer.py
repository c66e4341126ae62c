"""Writing: safetensors files streamed tensor by tensor, and sharded model weights."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from taskvec.lazy import torch

from taskvec.io.atomic import durable_writes
from taskvec.io.dtypes import _tensor_bytes, dtype_code
from taskvec.io.reader import SAFE_INDEX, SAFE_WEIGHTS

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class StreamingWriter:
    """Write one safetensors file whose tensors arrive one at a time, in order.

    The header (names, dtypes, shapes, offsets, metadata) is written first,
    then :meth:`write` appends each tensor's bytes — the whole tensor, or its
    flattened elements in consecutive parts; :meth:`close` checks that every
    declared tensor arrived. With ``hash_file`` the file's sha256 is computed
    from the bytes as they are written (:attr:`sha256`, None if the header was
    rewritten since).
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None, *, reserve: int = 0, hash_file: bool = False):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._done = 0  # bytes of specs[_next] written so far
        self._metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._tensors: dict[str, object] = {}
        offset = 0
        for spec in self.specs:
            self._tensors[spec.name] = {
                "dtype": dtype_code(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = self._header()
        raw += b" " * (-(len(raw) + reserve) % 8 + reserve)
        self._header_len = len(raw)
        self._sha = hashlib.sha256() if hash_file else None
        self._f = open(self.path, "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data) -> None:
        self._f.write(data)
        if self._sha is not None:
            self._sha.update(data)

    @property
    def sha256(self) -> str | None:
        return None if self._sha is None else self._sha.hexdigest()

    def _header(self) -> bytes:
        header: dict[str, object] = {}
        if self._metadata:
            header["__metadata__"] = self._metadata
        header.update(self._tensors)
        return json.dumps(header, separators=(",", ":")).encode()

    def update_metadata(self, metadata: dict[str, str]) -> None:
        """Change header metadata before :meth:`close` (within the ``reserve`` bytes)."""
        self._metadata.update({str(k): str(v) for k, v in metadata.items()})
        raw = self._header()
        if len(raw) > self._header_len:
            raise RuntimeError(f"{self.path}: metadata update needs {len(raw) - self._header_len} more reserved bytes")
        pos = self._f.tell()
        self._f.seek(8)
        self._f.write(raw + b" " * (self._header_len - len(raw)))
        self._f.seek(pos)
        self._sha = None  # the streamed hash no longer describes the file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (the declared tensor ``name``, or the next flat part of it)."""
        if self._next >= len(self.specs):
            raise RuntimeError(f"unexpected tensor {name!r}")
        spec = self.specs[self._next]
        whole = self._done == 0 and tuple(tensor.shape) == spec.shape
        data = _tensor_bytes(tensor)
        if name != spec.name or tensor.dtype != spec.dtype or not (whole or (tensor.dim() == 1 and self._done + len(data) <= spec.nbytes)):
            raise RuntimeError(f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match declared {spec}")
        self._put(data)
        self._done += len(data)
        if self._done == spec.nbytes:
            self._next += 1
            self._done = 0

    @property
    def at_tensor_start(self) -> bool:
        return self._done == 0

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            if self._next != len(self.specs):
                raise RuntimeError(f"{self.path}: only {self._next} of {len(self.specs)} tensors written")
            self._f.flush()
            if durable_writes():
                os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


DEFAULT_SHARD_BYTES = 5 * 1024**3


class ShardedWriter:
    """Hugging Face style model weights: one file, or shards plus an index.

    Shard assignment is decided up front from the specs (in order, greedy by
    ``max_shard_bytes``), so each shard can be streamed.
    """

    def __init__(self, folder: str | os.PathLike, specs: Iterable[TensorSpec], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        specs = list(specs)
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        self.total_size = sum(s.nbytes for s in specs)
        if len(groups) == 1:
            self.files = [SAFE_WEIGHTS]
        else:
            n = len(groups)
            self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._groups = groups
        self._metadata = {"format": "pt", **(metadata or {})}
        self._shard = -1
        self._left = 0
        self._writer: StreamingWriter | None = None
        self.weight_map = {spec.name: self.files[i] for i, g in enumerate(groups) for spec in g}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (whole, or the next flat part of it) to its shard."""
        if self._writer is not None and not self._writer.at_tensor_start:
            self._writer.write(name, tensor)
            if self._writer.at_tensor_start:
                self._left -= 1
            return
        while self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            group = self._groups[self._shard]
            self._writer = StreamingWriter(self.folder / self.files[self._shard], group, self._metadata)
            self._left = len(group)
        self._writer.write(name, tensor)
        if self._writer.at_tensor_start:
            self._left -= 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._shard != len(self._groups) - 1 or self._left:
            if self._groups != [[]]:
                raise RuntimeError("not every tensor was written")
            StreamingWriter(self.folder / SAFE_WEIGHTS, [], self._metadata).close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
