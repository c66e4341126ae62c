"""Reading: validated safetensors headers and lazy, positional tensor reads (:class:`TensorSource`)."""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from taskvec.lazy import torch

from taskvec.errors import FormatError, TaskvecError
from taskvec.io.dtypes import _DTYPES, FLOAT_CODES, _tensor_bytes, chunk_ranges, dtype_code, element_size
from taskvec.io.hashing import ContentHasher, _cached, _hash_cache_put, _stat_key

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(ValueError):
    pass


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def regular_file_size(path: Path, what: str = "file") -> int:
    """Size of ``path`` if it is a regular file (symlinks followed); never opens a FIFO or device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TaskvecError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{path} is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path} is not a regular file (a device, FIFO or socket), not a {what}")
    return st.st_size


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    At least as strict as the safetensors library: a header length within the
    file, a JSON object without duplicate names, ``__metadata__`` a string →
    string map, every entry a known dtype, a shape of non-negative ints and
    two offsets with dtype size × shape = byte length, and the tensors'
    byte ranges contiguous, non-overlapping and covering the data exactly.
    Nothing is allocated from declared sizes before they are bounded by the
    file size.
    """
    path = Path(path)
    size = regular_file_size(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: corrupt safetensors header (declared length {n} bytes)")
            header_bytes = f.read(n)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(header_bytes, object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except _Duplicate as exc:
        raise FormatError(f"{path}: corrupt safetensors header (name {exc.args[0]!r} appears twice)") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: corrupt safetensors header entry for {name!r}")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise FormatError(f"{path}: corrupt safetensors header entry for {name!r}")
        if not all(_is_int(s) for s in shape) or not all(_is_int(o) for o in offsets):
            raise FormatError(f"{path}: corrupt safetensors header entry for {name!r} (shape and offsets must be integers)")
        if any(s < 0 for s in shape):
            raise FormatError(f"{path}: corrupt safetensors header: {name!r} has a negative dimension {shape}")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise FormatError(f"{path}: corrupt safetensors header: {name!r} has offsets {offsets}")
        info = TensorInfo(name, code, tuple(shape), path, data_start + begin, data_start + end)
        expected = info.numel * element_size(code)
        if info.nbytes != expected:
            raise FormatError(f"{path}: corrupt safetensors header: {name!r} spans {end - begin} bytes, shape needs {expected}")
        if end > data_len:
            raise FormatError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {info.end} of {size}")
        infos[name] = info
    pos = data_start
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else f"leaves a gap of {info.start - pos} bytes before it"
            raise FormatError(f"{path}: corrupt safetensors header: the byte range of {info.name!r} {what}")
        pos = info.end
    if pos != size:
        raise FormatError(f"{path}: corrupt safetensors header: {size - pos} bytes after the last tensor are not described")
    return infos, dict(metadata)


def _pread_into(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` with positional reads (no seek; the GIL is released)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            raise FormatError(f"{info.file}: truncated while reading {info.name!r}")
        got += n


def _read_exact(f, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with positional reads into ``out`` (a uint8 buffer) or fresh memory."""
    dtype = _DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[: info.nbytes]
    _pread_into(f.fileno(), memoryview(buf.numpy()), info.start, info)
    return buf.view(dtype).reshape(info.shape)


class Scratch:
    """Reusable read buffers for the streaming loops.

    Touching freshly allocated pages costs more than the arithmetic on large
    tensors, so each loop reads every tensor into the same few buffers
    (``slot`` names one), grown to the largest tensor seen. A tensor read into
    a slot is valid until the next read into that slot.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, slot: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf


def _confined(folder: Path, target: Path) -> bool:
    """``target`` (symlinks followed) lies inside ``folder``, or in the blob store of a Hugging Face cache snapshot."""
    real_folder = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(target))
    if real_folder in real.parents:
        return True
    if folder.parent.name == "snapshots":  # hub cache: snapshots/<rev>/FILE -> ../../blobs/<sha>
        blobs = Path(os.path.realpath(folder.parent.parent / "blobs"))
        return blobs in real.parents
    return False


def read_shard_index(index: Path, folder: Path) -> dict[str, Path]:
    """The ``weight_map`` of a shard index as name -> shard path, every shard confined to ``folder``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise FormatError(f"{index}: corrupt shard index") from None
    except OSError as exc:
        raise FormatError(f"{index}: cannot read ({exc.strerror})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: corrupt shard index (weight_map is not a non-empty map)")
    out: dict[str, Path] = {}
    for name, entry in weight_map.items():
        if not isinstance(entry, str) or not entry or "\0" in entry:
            raise FormatError(f"{index}: corrupt shard index (shard of {name!r} is not a file name)")
        rel = Path(entry)
        if rel.is_absolute() or entry.startswith(("/", "\\")) or ".." in rel.parts or ".." in entry.split("\\"):
            raise FormatError(f"{index}: shard path {entry!r} leaves the model folder (absolute or '..'); refused")
        shard = folder / rel
        if not os.path.lexists(shard):
            raise FormatError(f"{index}: shard {entry} is missing")
        if not _confined(folder, shard):
            raise FormatError(f"{index}: shard {entry} is a link to a file outside the model folder; refused")
        if not shard.is_file():
            raise FormatError(f"{index}: shard {entry} is missing" if not shard.exists() else f"{index}: shard {entry} is not a regular file")
        out[name] = shard
    return out


def _check_index_agrees(index: Path, weight_map: dict[str, Path], found: dict[str, Path]) -> None:
    """Every tensor the index names is in the shard it names, and every tensor of the shards is in the index."""
    for name, shard in weight_map.items():
        if name not in found:
            raise FormatError(f"{index}: tensor {name!r} is listed in the index but no shard holds it")
        if found[name] != shard:
            raise FormatError(f"{index}: tensor {name!r} is listed in {shard.name} but stored in {found[name].name}")
    extra = sorted(set(found) - set(weight_map))
    if extra:
        raise FormatError(f"{index}: shard {found[extra[0]].name} holds tensor {extra[0]!r}, which the index does not list")


class TensorSource:
    """Lazy, read-only view of the tensors of one checkpoint (file or folder).

    ``allow_pickle`` admits pickle ``.bin`` checkpoints, loaded with
    ``torch.load(weights_only=True)``; they are refused by default.
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: dict[Path, object] = {}
        self._weight_map: dict[str, Path] | None = None
        files = self._safetensors_files()
        if files is None:
            self._load_pickle(allow_pickle)
        else:
            for file in files:
                infos, meta = read_safetensors_header(file)
                self.metadata.update(meta)
                for name, info in infos.items():
                    if name in self._infos:
                        raise FormatError(f"{self.path}: tensor {name!r} appears in two shards")
                    self._infos[name] = info
            if self._weight_map is not None:
                _check_index_agrees(self.path / SAFE_INDEX, self._weight_map, {n: i.file for n, i in self._infos.items()})

    def _safetensors_files(self) -> list[Path] | None:
        p = self.path
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                return None
            raise FormatError(f"{p}: not a safetensors file")
        if not p.is_dir():
            if os.path.lexists(p):
                regular_file_size(p, "model file or folder")
            raise TaskvecError(f"not found: {p}")
        index = p / SAFE_INDEX
        if index.is_file():
            self._weight_map = read_shard_index(index, p)
            return sorted(set(self._weight_map.values()))
        if os.path.lexists(p / SAFE_WEIGHTS):
            regular_file_size(p / SAFE_WEIGHTS, "safetensors file")  # a FIFO or device is never opened
            return [p / SAFE_WEIGHTS]
        singles = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if len(singles) == 1:
            return singles
        if (p / PICKLE_WEIGHTS).is_file() or (p / PICKLE_INDEX).is_file():
            return None
        raise TaskvecError(f"{p}: no safetensors weights found (expected {SAFE_WEIGHTS} or {SAFE_INDEX})")

    def _load_pickle(self, allow: bool) -> None:
        if not allow:
            raise TaskvecError(
                f"{self.path}: pickle checkpoint refused (it can run code when loaded); "
                "convert it to safetensors or pass --allow-pickle to load it with weights_only=True"
            )
        p = self.path
        weight_map = None
        if p.is_file():
            files = [p]
        elif (p / PICKLE_INDEX).is_file():
            weight_map = read_shard_index(p / PICKLE_INDEX, p)
            files = sorted(set(weight_map.values()))
        else:
            files = [p / PICKLE_WEIGHTS]
        tensors: dict[str, torch.Tensor] = {}
        where: dict[str, Path] = {}
        for f in files:
            regular_file_size(f, "pickle checkpoint")
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise FormatError(f"{f}: cannot load pickle checkpoint with weights_only=True ({type(exc).__name__})") from None
            if not isinstance(state, dict):
                raise FormatError(f"{f}: pickle checkpoint does not hold a state dict")
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    if k in tensors:
                        raise FormatError(f"{p}: tensor {k!r} appears in two shards")
                    tensors[k] = v.contiguous()
                    where[k] = f
        if weight_map is not None:
            _check_index_agrees(p / PICKLE_INDEX, weight_map, where)
        self._pickled = tensors
        for k, v in tensors.items():
            self._infos[k] = TensorInfo(k, dtype_code(v.dtype), tuple(v.shape), p, 0, v.numel() * v.element_size())

    # -- mapping interface -------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str, scratch: Scratch | None = None, slot: str = "") -> torch.Tensor:
        """The tensor with its stored dtype and shape: fresh memory, or a view
        into ``scratch[slot]`` (valid until the next read into that slot)."""
        if self._pickled is not None:
            return self._pickled[name].clone()  # callers may modify what they read
        info = self._infos[name]
        return _read_exact(self._handle(info.file), info, None if scratch is None else scratch.get(slot, info.nbytes))

    def read_float32(self, name: str, scratch: Scratch | None = None, slot: str = "") -> torch.Tensor:
        t = self.read(name, scratch, slot)
        return t if t.dtype == torch.float32 else t.to(torch.float32)

    def _handle(self, file: Path):
        f = self._handles.get(file)
        if f is None:
            f = self._handles[file] = open(file, "rb", buffering=0)
        return f

    def stored_dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._infos[name].dtype]

    def read_range(self, name: str, start: int, stop: int, scratch: Scratch, slot: str) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, stored dtype, as a view into ``scratch[slot]``."""
        dtype = self.stored_dtype(name)
        n = (stop - start) * dtype.itemsize
        return self.read_range_into(name, start, stop, scratch.get(slot, n)[:n].view(dtype))

    def read_range_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Read elements ``[start, stop)`` straight into ``out`` (flat, the stored dtype): no copy."""
        info = self._infos[name]
        if stop > start:
            if self._pickled is not None:
                out.copy_(self._pickled[name].reshape(-1)[start:stop])
            else:
                size = out.element_size()
                _pread_into(self._handle(info.file).fileno(), memoryview(out.view(torch.uint8).numpy()), info.start + start * size, info)
        return out

    def read_range_float32(self, name: str, start: int, stop: int, scratch: Scratch, slot: str) -> torch.Tensor:
        """:meth:`read_range` converted to float32 (in ``scratch[slot + "/f32"]`` when the stored dtype differs)."""
        t = self.read_range(name, start, stop, scratch, slot)
        if t.dtype == torch.float32:
            return t
        return scratch.get(slot + "/f32", 4 * t.numel())[: 4 * t.numel()].view(torch.float32).copy_(t)

    def advise(self, name: str) -> None:
        """Ask the kernel to start reading ``name`` ahead of use (a hint; ignored where unsupported)."""
        info = self._infos[name]
        if self._pickled is None and info.nbytes and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._handle(info.file).fileno(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def content_hash(self, *, use_cache: bool = True) -> str:
        """sha256 over (name, dtype, shape, bytes) of every tensor, sorted by name.

        Independent of sharding, file layout and header metadata, so the same
        weights saved two ways hash the same. Results are cached per set of
        files keyed by (path, device, inode, size, mtime, ctime), as git keys its index;
        set ``TASKVEC_NO_HASH_CACHE=1`` or ``use_cache=False`` to always re-read.
        """
        return _cached(self._cache_key() if use_cache else None, self._hash_tensors)

    def cached_content_hash(self) -> str | None:
        """The content hash if the hash cache holds a trusted entry for these files, else None (nothing is read)."""
        key = self._cache_key()
        return None if key is None else _cached(key, lambda: None, store=False)

    def remember_content_hash(self, digest: str) -> None:
        """Cache a content hash computed elsewhere while streaming these same files."""
        key = self._cache_key()
        if key is not None:
            _hash_cache_put(key, digest)

    def _hash_tensors(self) -> str:
        h = ContentHasher()
        scratch = Scratch()
        for name in sorted(self._infos):
            info = self._infos[name]
            h.begin(name, info.dtype, info.shape)
            for start, stop in chunk_ranges(info.numel, element_size(info.dtype)):
                h.feed(_tensor_bytes(self.read_range(name, start, stop, scratch, "hash")))
        return h.hexdigest()

    def _cache_key(self) -> str | None:
        if self._pickled is not None:
            return None
        return _stat_key("tensors:", {i.file for i in self._infos.values()})
