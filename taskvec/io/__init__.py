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
  visible at the destination; :func:`check_output` refuses an output that
  could destroy an input or data taskvec did not write.

One module per concern: ``dtypes``, ``resolve``, ``reader``, ``hashing``,
``writer``, ``atomic``, ``outputs``.
"""

from taskvec.io.atomic import atomic_dir, atomic_path, durable_writes, user_path
from taskvec.io.dtypes import FLOAT_CODES, _tensor_bytes, dtype_code, parse_dtype, torch_dtype
from taskvec.io.hashing import ContentHasher, file_sha256
from taskvec.io.reader import (
    MAX_HEADER,
    PICKLE_INDEX,
    PICKLE_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    Scratch,
    TensorInfo,
    TensorSource,
    read_safetensors_header,
    read_shard_index,
    regular_file_size,
)
from taskvec.io.outputs import check_output, is_taskvec_folder, is_taskvec_vector
from taskvec.io.resolve import OFFLINE_MODELS, resolve_model
from taskvec.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, StreamingWriter, TensorSpec

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FLOAT_CODES",
    "MAX_HEADER",
    "OFFLINE_MODELS",
    "PICKLE_INDEX",
    "PICKLE_WEIGHTS",
    "SAFE_INDEX",
    "SAFE_WEIGHTS",
    "ContentHasher",
    "Scratch",
    "ShardedWriter",
    "StreamingWriter",
    "TensorInfo",
    "TensorSource",
    "TensorSpec",
    "atomic_dir",
    "check_output",
    "is_taskvec_folder",
    "is_taskvec_vector",
    "atomic_path",
    "dtype_code",
    "durable_writes",
    "file_sha256",
    "parse_dtype",
    "read_safetensors_header",
    "read_shard_index",
    "regular_file_size",
    "resolve_model",
    "torch_dtype",
    "user_path",
]
