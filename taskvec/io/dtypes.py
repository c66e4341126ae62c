"""safetensors dtype codes <-> torch dtypes, and a tensor's raw bytes."""

from __future__ import annotations

import os
from functools import cache

from taskvec.errors import FormatError, TaskvecError
from taskvec.lazy import torch

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


@cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """safetensors dtype code <-> torch dtype (built on first use: importing this module does not import torch)."""
    dtypes = {
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
    return dtypes, {v: k for k, v in dtypes.items()}


class _Dtypes:
    """``_DTYPES[code]``: the torch dtype of a safetensors code."""

    def __getitem__(self, code: str) -> torch.dtype:
        return _tables()[0][code]

    def __contains__(self, code: object) -> bool:
        return code in _tables()[0]


_DTYPES = _Dtypes()


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return _tables()[1][dtype]
    except KeyError:
        raise TaskvecError(f"unsupported tensor dtype {dtype}") from None


# bytes per element of each safetensors code (header checks need no torch)
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def element_size(code: str) -> int:
    """Bytes per element of safetensors dtype ``code``; a FormatError for a code taskvec does not read."""
    try:
        return _ITEM_SIZES[code]
    except KeyError:
        raise FormatError(f"unsupported safetensors dtype {code!r}") from None


def torch_dtype(code: str) -> torch.dtype:
    try:
        return _tables()[0][code]
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



def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def env_size(name: str, default: int) -> int:
    """A positive integer from environment variable ``name`` (``default`` when unset); anything else is refused in one line."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise TaskvecError(f"{name}={raw!r}: expected a positive integer")
    return value


#: Bytes of one streamed chunk (float32 elements × 4): tensors are read, computed and written in
#: flat slices of this size, so memory does not grow with the largest tensor. ``TASKVEC_CHUNK_BYTES`` overrides.
CHUNK_BYTES = env_size("TASKVEC_CHUNK_BYTES", 4 << 20)


def chunk_ranges(numel: int, itemsize: int = 4, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` element ranges covering ``numel`` elements in chunks of about ``chunk_bytes``."""
    step = max(1, (chunk_bytes or CHUNK_BYTES) // max(itemsize, 4))
    return [(s, min(s + step, numel)) for s in range(0, numel, step)]
