"""Chunked streaming gives the whole-tensor bits: every method, every command, every chunk size."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from taskvec import algebra, engine, streaming
from taskvec.engine import MergeOptions
from taskvec.io import TensorSource, dtypes, file_sha256
from taskvec.methods.streamed import ChunkedMerge, TopK
from taskvec.methods.ties import topk_mask

METHODS = [
    MergeOptions(),
    MergeOptions("ties", density=0.3),
    MergeOptions("ties", density=1.0),
    MergeOptions("magnitude", density=0.45),
    MergeOptions("dare", drop=0.4, seed=3),
    MergeOptions("dare_ties", drop=0.25, seed=1),
]


def _taus(shape, n=3, seed=0):
    """Vectors with many exact ties and zeros (values on a coarse grid), so the top-k tie-break matters."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-4, 5, shape, generator=g).to(torch.float32) / 4 for _ in range(n)]


@pytest.mark.parametrize("options", METHODS, ids=lambda o: f"{o.method}")
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 10**6])
def test_chunked_merge_equals_whole_tensor_bits(options, chunk):
    shape = (37, 29)
    taus = _taus(shape)
    lambdas = [0.7, -1.3, 0.4]
    want = options.combine("layer.weight", taus, lambdas)
    flat = [t.reshape(-1) for t in taus]
    n = want.numel()
    ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    seeds = [algebra.tensor_seed(options.seed, i, "layer.weight") for i in range(3)]
    cm = ChunkedMerge(options.method, lambdas, lambda t, s, e: flat[t][s:e].clone(), n, ranges, density=options.density, drop=options.drop, seeds=seeds)
    got = torch.cat([cm.chunk(s, e) for s, e in ranges])
    assert torch.equal(got.view(torch.int32), want.reshape(-1).view(torch.int32))


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999])
def test_radix_top_k_is_kthvalue_top_k(density):
    x = _taus((4001,), 1, seed=5)[0] * torch.linspace(-3, 3, 4001)
    topk = TopK(x.numel(), density)
    topk.fit(lambda: iter(x.split(333)))
    got = torch.cat([topk.mask(c) for c in x.split(333)])
    assert torch.equal(got, topk_mask(x, density))


def test_dare_mask_drawn_in_chunks_is_the_whole_mask():
    whole = torch.rand((123, 45), generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    parts = torch.cat([torch.rand((n,), generator=g) for n in (1, 100, 4000, 1434)])
    assert torch.equal(parts, whole.reshape(-1))


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 96 bytes (24 float32) and a 2-chunk write-behind queue: every tensor is split."""
    monkeypatch.setattr(dtypes, "CHUNK_BYTES", 96)
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 96)
    monkeypatch.setattr(streaming, "QUEUE_BYTES", 192)


def _outputs(tiny_models, root, vector_dtype=torch.float32):
    base, ft1, ft2 = tiny_models
    got = {}
    v1 = engine.extract(base, ft1, root / "v1.safetensors", dtype=vector_dtype)
    v2 = engine.extract(base, ft2, root / "v2.safetensors")
    got["v1"], got["v2"] = v1.sha256, v2.sha256
    pairs = [(root / "v1.safetensors", 0.6), (root / "v2.safetensors", -0.9)]
    for o in METHODS:
        got[f"combine {o.method}"] = engine.combine(pairs, root / f"c-{o.method}.safetensors", options=o).sha256
        got[f"apply {o.method}"] = engine.apply(base, pairs, root / f"a-{o.method}", options=o, max_shard_bytes=20_000)["output_hash"]
        got[f"merge {o.method}"] = engine.merge(base, [(ft1, 0.6), (ft2, -0.9)], root / f"m-{o.method}", options=o)["output_hash"]
    return got


@pytest.fixture(scope="module")
def whole(tiny_models, tmp_path_factory):
    """The outputs with the default chunk size (every tiny tensor in one chunk)."""
    return _outputs(tiny_models, tmp_path_factory.mktemp("whole"))


def test_commands_give_the_same_bits_in_tiny_chunks(tiny_models, whole, tmp_path, tiny_chunks):
    assert _outputs(tiny_models, tmp_path) == whole
    for name, sha in whole.items():
        if name.startswith(("v", "combine")):
            path = tmp_path / ("c-" + name.split()[1] + ".safetensors" if name.startswith("combine") else name + ".safetensors")
            assert file_sha256(path, use_cache=False) == sha  # the sha streamed while writing is the file's
        else:
            folder = tmp_path / (("a-" if name.startswith("apply") else "m-") + name.split()[1])
            assert TensorSource(folder).content_hash(use_cache=False) == sha


def test_commands_give_the_same_bits_in_tiny_blocks(tiny_models, whole, tmp_path, monkeypatch):
    """The arithmetic runs in blocks within each chunk (cache-sized); any blocking gives the same bits."""
    monkeypatch.setattr(streaming, "BLOCK_ELEMS", 7)  # every tensor computed 7 elements at a time, chunks unchanged
    calls = []
    real = streaming.stream_tensor

    def spy(sink, name, code, shape, dtype, produce):
        def counted(start, stop, out):
            calls.append(stop - start)
            return produce(start, stop, out)

        return real(sink, name, code, shape, dtype, counted)

    monkeypatch.setattr(streaming, "stream_tensor", spy)
    monkeypatch.setattr(engine, "stream_tensor", spy)
    assert _outputs(tiny_models, tmp_path) == whole
    assert calls and max(calls) == 7  # the blocks really were 7 elements


def test_cold_hash_cache_apply_hashes_the_base_while_streaming(tiny_models, whole, tmp_path, monkeypatch, tiny_chunks):
    base, ft1, _ = tiny_models
    engine.extract(base, ft1, tmp_path / "v.safetensors")
    monkeypatch.setenv("TASKVEC_NO_HASH_CACHE", "1")
    calls = []
    real = TensorSource._hash_tensors
    monkeypatch.setattr(TensorSource, "_hash_tensors", lambda self: calls.append(self.path) or real(self))
    ledger = engine.apply(base, [(tmp_path / "v.safetensors", 1.0)], tmp_path / "out")
    assert ledger["base_hash"] == real(TensorSource(base))
    assert calls == []  # no separate hashing pass over the base


def test_write_error_on_the_writer_thread_reaches_the_caller(tiny_models, tmp_path, monkeypatch, tiny_chunks):
    from taskvec.errors import TaskvecError
    from taskvec.io import writer

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    base, ft1, _ = tiny_models
    monkeypatch.setattr(writer.StreamingWriter, "write", full)
    with pytest.raises(TaskvecError, match="No space left on device"):
        engine.merge(base, [(ft1, 1.0)], tmp_path / "m")
    assert not (tmp_path / "m").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("dtype", "fits", "overflows"),
    [
        # float16's largest value is 65504; halfway to the next power of two (65520) rounds to Inf
        (torch.float16, 65519.0, 65520.0),
        # bfloat16's largest is (2 - 2^-7) x 2^127; from (2 - 2^-8) x 2^127 it rounds to Inf
        (torch.bfloat16, 3.3961e38, 3.3962e38),
    ],
)
def test_fits_is_exactly_whether_rounding_to_the_dtype_stays_finite(dtype, fits, overflows):
    for sign in (1.0, -1.0):
        ok = torch.tensor([0.5, sign * fits, 1.0])
        bad = torch.tensor([0.5, sign * overflows, 1.0])
        assert torch.isfinite(ok.to(dtype)).all() and streaming.fits(ok, dtype)
        assert not torch.isfinite(bad.to(dtype)).all() and not streaming.fits(bad, dtype)
        assert streaming.fits(bad, torch.float32)  # float32 holds it
    nan = torch.tensor([0.5, float("nan")])
    assert not streaming.fits(nan, torch.float16) and not streaming.fits(nan, torch.float32)
    assert streaming.fits(torch.empty(0), torch.float16)
