"""The streaming pipeline under every engine command: chunks in, arithmetic, write-behind out.

Each output tensor is produced in flat chunks of :data:`taskvec.io.dtypes.CHUNK_BYTES`,
computed in cache-sized blocks of :data:`BLOCK_ELEMS` (element-wise arithmetic gives the
same bits whatever the chunking and blocking), so memory
does not grow with the largest tensor: the inputs are read with positional
reads straight into reused buffers (a float32 fine-tuned chunk lands in the
very buffer that is then written), the result is computed in place, and a
write-behind queue, bounded by bytes, writes and hashes finished chunks on
two worker threads while the next chunk is read and computed (file writes,
reads, sha256 and torch's kernels all release the GIL).
"""

from __future__ import annotations

import functools
import itertools
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from taskvec import kernels
from taskvec.errors import TaskvecError
from taskvec.io import ContentHasher, Scratch, ShardedWriter, TensorSource, TensorSpec, _tensor_bytes, atomic_dir, torch_dtype
from taskvec.io.dtypes import CHUNK_BYTES, chunk_ranges, env_size
from taskvec.ledger import copy_model_files, write_ledger

#: Bytes the write-behind queue may hold (finished chunks not yet written and hashed).
QUEUE_BYTES = 8 * CHUNK_BYTES

#: Elements computed at a time within a chunk. Reads and writes move whole chunks (few system
#: calls), but the arithmetic runs on blocks whose float32 work areas (512 KiB each) stay in a
#: core's L2 cache. In isolation the bfloat16 merge arithmetic ran 2.5x faster per element in
#: such blocks than in whole 4 MiB chunks; end to end, where reads, hashing and writes share the
#: two cores, `taskvec merge` of a 3 GB bfloat16 model gained ~5 %.
BLOCK_ELEMS = env_size("TASKVEC_BLOCK_ELEMS", 1 << 17)


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


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False, dynamic_ncols=True)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one reduction pass, no tensor-sized temporaries.

    A NaN or Inf always makes the sum non-finite; only a sum that overflows
    needs the exact element-wise check.
    """
    if t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, what: str, name: str) -> None:
    if not all_finite(t):
        raise TaskvecError(f"{what} has NaN or Inf values in tensor {name!r}")


def fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN/Inf in the float32 ``t``, and none made by rounding it to ``dtype``.

    float32 outputs need only :func:`all_finite`. A float16 output overflows
    from |x| ≥ 65520 while float32 holds it, so narrower outputs are checked
    by the extremes: rounding is monotonic, so if the minimum and maximum
    round to finite values, every element does (one ``aminmax`` pass, which
    propagates NaN).
    """
    if dtype.itemsize >= t.dtype.itemsize or t.numel() == 0:
        return all_finite(t)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(torch.stack([lo, hi]).to(dtype)).all())


def check_result(t: torch.Tensor, name: str, inputs: Sequence[tuple[str, Callable[[], torch.Tensor]]], what: str, dtype: torch.dtype = torch.float32, fix: str = "use smaller λ") -> None:
    """A non-finite result names its cause: the first non-finite input, an overflow of float32, or of the output ``dtype`` (``fix`` says what to do)."""
    if fits(t, dtype):
        return
    for label, read in inputs:
        check_finite(read(), label, name)
    check_fits(t, dtype, f"{what} tensor {name!r}", fix)
    raise TaskvecError(f"{what} tensor {name!r} overflows float32 (are the λ too large?)")


def check_fits(t: torch.Tensor, dtype: torch.dtype, what: str, fix: str) -> None:
    """Refuse a finite float32 ``t`` whose values are beyond ``dtype``'s range (they would be stored as ±Inf)."""
    if dtype.itemsize < t.dtype.itemsize and not fits(t, dtype) and all_finite(t):  # the common case costs one pass
        name = str(dtype).removeprefix("torch.")
        raise TaskvecError(f"{what} does not fit {name}: it reaches {t.abs().max().item():.6g}, beyond {name}'s largest value {torch.finfo(dtype).max:.6g} ({fix})")


class WriteBehind:
    """Write (and hash) finished chunks on worker threads; at most :data:`QUEUE_BYTES` in flight.

    ``write(name, part)`` runs on one thread and ``hasher`` (a
    :class:`ContentHasher` of the output, optional) on another, in submission
    order. Chunks are computed into buffers of a fixed pool (:meth:`buffer`),
    handed back once both threads are done with them, so the queue's memory
    is bounded. A worker's error is re-raised in the caller by the next
    :meth:`buffer`, :meth:`submit` or :meth:`close`.
    """

    def __init__(self, write: Callable[[str, torch.Tensor], None], hasher: ContentHasher | None = None, *, queue_bytes: int = QUEUE_BYTES):
        self._write, self._hasher = write, hasher
        self._free: queue.Queue = queue.Queue()
        self._slots = max(2, queue_bytes // CHUNK_BYTES)
        self._made = 0
        self._error: BaseException | None = None
        self._queues = [queue.Queue() for _ in range(2 if hasher else 1)]
        self._threads = [threading.Thread(target=self._work, args=(q, i), name=f"taskvec-{'write' if i == 0 else 'hash'}", daemon=True) for i, q in enumerate(self._queues)]
        self._pending: dict[int, int] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        for t in self._threads:
            t.start()

    def _work(self, q: queue.Queue, role: int) -> None:
        while (item := q.get()) is not None:
            key, name, part, buf, first = item
            if self._error is None:
                try:
                    if role == 0:
                        self._write(name, part)
                    else:
                        if first is not None:
                            self._hasher.begin(*first)
                        self._hasher.feed(_tensor_bytes(part))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    self._error = exc
            with self._lock:
                self._pending[key] -= 1
                done = self._pending[key] == 0
                if done:
                    del self._pending[key]
            if done and buf is not None:
                self._free.put(buf)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> torch.Tensor:
        """A free chunk buffer (``CHUNK_BYTES`` uint8), waiting for the writer when all are in flight."""
        self._raise()
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._slots:
            self._made += 1
            return torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._raise()

    def submit(self, name: str, part: torch.Tensor, buf: torch.Tensor | None, first: tuple | None) -> None:
        """Queue ``part`` of tensor ``name`` (``first`` = (name, dtype code, shape) on its first part)."""
        self._raise()
        key = next(self._keys)
        with self._lock:
            self._pending[key] = len(self._queues)
        for q in self._queues:
            q.put((key, name, part, buf, first))

    def close(self) -> None:
        """Wait for everything queued; re-raise a worker's error unless an exception is already on its way."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        if sys.exc_info()[0] is None:
            self._raise()


def stream_tensor(sink: WriteBehind, name: str, code: str, shape: tuple[int, ...], dtype: torch.dtype, produce) -> None:
    """Produce tensor ``name`` chunk by chunk into the sink's buffers.

    ``produce(start, stop, out)`` fills ``out`` (a flat ``dtype`` view of a
    pooled buffer) with elements ``[start, stop)`` of the result, or returns
    another tensor holding them. It is called block by block
    (:data:`BLOCK_ELEMS`), in flat order; each chunk is submitted whole.
    """
    numel = 1
    for s in shape:
        numel *= s
    first = (name, code, shape)
    if numel == 0:
        sink.submit(name, torch.empty(shape, dtype=dtype), None, first)
        return
    for start, stop in chunk_ranges(numel, 4):
        buf = sink.buffer()
        out = buf[: (stop - start) * dtype.itemsize].view(dtype)
        for lo in range(start, stop, BLOCK_ELEMS):  # element-wise: any blocking gives the same bits
            hi = min(lo + BLOCK_ELEMS, stop)
            part = out[lo - start : hi - start]
            got = produce(lo, hi, part)
            if got is not None and got is not part:
                part.copy_(got)
        sink.submit(name, out, buf, first)
        first = None


class Reader:
    """Chunks of one input (a :class:`TensorSource` or :class:`VectorFile`) into named scratch slots."""

    def __init__(self, src, scratch: Scratch, slot: str):
        self.src, self.scratch, self.slot = src, scratch, slot

    def raw(self, name: str, start: int, stop: int, slot: str | None = None) -> torch.Tensor:
        return self.src.read_range(name, start, stop, self.scratch, slot or self.slot)

    def f32(self, name: str, start: int, stop: int, slot: str | None = None) -> torch.Tensor:
        return self.src.read_range_float32(name, start, stop, self.scratch, slot or self.slot)

    def f32_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Read float32 elements into ``out`` directly when stored as float32 (zero copy), else convert."""
        if out.dtype == torch.float32 and self.src.stored_dtype(name) == torch.float32:
            return self.src.read_range_into(name, start, stop, out)
        return out.copy_(self.f32(name, start, stop))


def scratch_f32(scratch: Scratch, slot: str, n: int) -> torch.Tensor:
    """A float32 work area of ``n`` elements in ``scratch[slot]``."""
    return scratch.get(slot, 4 * n)[: 4 * n].view(torch.float32)


# ---------------------------------------------------------------------------
# a whole model folder (apply, merge)


class ModelStream:
    """Stream a model folder: every tensor of the base, covered ones computed by ``make(name)``.

    ``make(name)`` returns ``produce(start, stop, out, base32)``: ``base32``
    holds the base's elements as float32 — in ``out`` itself when the base is
    float32, so the result is computed in the buffer that is written — and
    ``produce`` returns the float32 result. The output's content hash is
    computed by the write-behind queue; the base's, only when ``hash_base``.
    """

    def __init__(self, b: TensorSource, covered: set[str], make, causes, *, hash_base: bool, base_in_out: bool = True):
        self.b, self.covered, self.make, self.causes = b, covered, make, causes
        self.base_hasher = ContentHasher() if hash_base else None
        self.base_in_out = base_in_out
        self.scratch = Scratch()

    def _base32(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        if out.dtype == torch.float32 and self.base_in_out:
            raw = self.b.read_range_into(name, start, stop, out)
        else:
            raw = self.b.read_range(name, start, stop, self.scratch, "base")
        if self.base_hasher:
            self.base_hasher.feed(_tensor_bytes(raw))
        return raw if raw.dtype == torch.float32 else scratch_f32(self.scratch, "base/f32", stop - start).copy_(raw)

    def _base_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """The base's elements ``[start, stop)`` into ``out`` (its stored dtype), fed to the base's content hash."""
        self.b.read_range_into(name, start, stop, out)
        if self.base_hasher:
            self.base_hasher.feed(_tensor_bytes(out))

    def _check(self, name: str, new: torch.Tensor, dtype: torch.dtype) -> None:
        """Refuse a result that is not finite or does not fit ``dtype``, naming the input at fault."""
        check_result(new, name, [("base model", lambda: self.b.read(name)), *self.causes(name)], "edited", dtype)

    def _fused(self, name: str, dtype: torch.dtype, compute):
        """``produce`` on the fused kernel when ``compute`` declares its sum (``compute.fused``) and every dtype has a kernel; else None.

        The base is read into the output buffer (same dtype), each input into
        scratch in its stored dtype, and :func:`kernels.combine` writes the
        result over the base. A result the kernel flags (NaN/Inf, or beyond the
        output dtype) is recomputed on the torch path, whose check names the cause.
        """
        spec = getattr(compute, "fused", None)
        if spec is None:
            return None
        mode, inputs, lambdas = spec
        if not kernels.supports(dtype, self.b.stored_dtype(name), *(src.stored_dtype(name) for src in inputs)):
            return None
        b, scratch = self.b, self.scratch
        slots = [f"in{t}" for t in range(len(inputs))]

        def produce(start, stop, out):
            self._base_into(name, start, stop, out)
            xs = [src.read_range(name, start, stop, scratch, slot) for src, slot in zip(inputs, slots)]
            if kernels.combine(mode, out, out, xs, lambdas):
                return None
            again = scratch.get("retry", out.nbytes)[: out.nbytes].view(out.dtype)  # ``out`` holds garbage now
            self._check(name, compute(start, stop, again, b.read_range_float32(name, start, stop, scratch, "base/retry")), out.dtype)
            raise AssertionError(f"the fused kernel refused tensor {name!r} [{start}:{stop}] but the torch path accepts it")

        return produce

    def write(self, tmp: Path, max_shard_bytes: int, desc: str, progress: bool) -> tuple[ShardedWriter, str]:
        b = self.b
        names = sorted(b.names())
        specs = [TensorSpec(n, torch_dtype(b.info(n).dtype), b.info(n).shape) for n in names]
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        hasher = ContentHasher()
        sink = WriteBehind(writer.write, hasher)
        try:
            with progress_bar(sum(b.info(n).nbytes for n in names), desc, progress) as bar:
                for i, spec in enumerate(specs):
                    for nxt in names[i + 1 : i + 2]:
                        b.advise(nxt)
                    info = b.info(spec.name)
                    if self.base_hasher:
                        self.base_hasher.begin(spec.name, info.dtype, info.shape)
                    if spec.name in self.covered:
                        compute = self.make(spec.name)
                        fused = self._fused(spec.name, spec.dtype, compute)
                        if fused:
                            produce = fused
                        else:
                            def produce(start, stop, out, name=spec.name, compute=compute):
                                new = compute(start, stop, out, self._base32(name, start, stop, out))
                                self._check(name, new, out.dtype)
                                return new

                    else:

                        def produce(start, stop, out, name=spec.name):
                            self._base_into(name, start, stop, out)

                    stream_tensor(sink, spec.name, info.dtype, info.shape, spec.dtype, produce)
                    bar.update(info.nbytes)
        finally:
            sink.close()
        writer.close()
        return writer, hasher.hexdigest()


def write_model(m: ModelStream, src_dir: Path, out, finish, *, max_shard_bytes: int, progress: bool, desc: str) -> dict:
    """Write the folder atomically; ``finish(base hash or None)`` gives the ledger (and may still refuse)."""
    with atomic_dir(out) as tmp:
        copy_model_files(src_dir, tmp)
        writer, output_hash = m.write(tmp, max_shard_bytes, desc, progress)
        ledger = {**finish(m.base_hasher.hexdigest() if m.base_hasher else None), "output_hash": output_hash, "weight_files": writer.files}
        write_ledger(tmp, ledger)
    if m.base_hasher:
        m.b.remember_content_hash(m.base_hasher.hexdigest())
    return ledger


def whole_tensor(options, name: str, read_taus, lambdas) -> "callable":
    """Merge options without a chunked form (mergekit recipes): merge whole tensors once, serve slices."""
    merged = options.combine(name, read_taus(), lambdas).reshape(-1)
    return lambda t, s, e: merged[s:e]


def add_into(tb: torch.Tensor, merged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """θ + merged (``torch.add``), into ``out`` when it is float32 (``tb`` may be ``out`` itself)."""
    return torch.add(tb, merged, out=out) if out.dtype == torch.float32 else torch.add(tb, merged)


class Memo:
    """The last chunk read, re-read only when another range is asked for."""

    def __init__(self, read):
        self.read, self.key, self.value = read, None, None

    def __call__(self, s: int, e: int) -> torch.Tensor:
        if self.key != (s, e):
            self.key, self.value = (s, e), self.read(s, e)
        return self.value
