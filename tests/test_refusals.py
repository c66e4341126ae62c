"""The refusal suite (issue 6): bad input is refused with one clear line, a non-zero exit, nothing written.

ONE table of named cases. Each case builds its bad input under ``tmp_path``
and returns an :class:`Invocation`: the real CLI's argv (run in-process via
``taskvec.cli.main``) or, where no CLI command reaches the check yet, a call
into the library (whose ``TaskvecError`` the CLI would print the same way).
Every case asserts:

* exit status 2 (a user error), through ``SystemExit`` or ``TaskvecError.exit_code``;
* stderr is exactly one non-empty line, ``error: ...``, containing a fragment
  that names the cause;
* nothing was written: the case's outputs and their temporary siblings
  (``.NAME.*``) do not exist, and the whole ``tmp_path`` tree is unchanged
  (same files, sizes and mtimes as before the command);
* where a case touches the model registry: no new registered version.

``python tests/refusal_report.py`` runs this module and prints
"cases tried N, refused correctly M" for the README.

Cases already covered one by one in ``tests/test_engine.py`` (shape, name and
dtype mismatch, base hash, NaN, empty selection, pickle, truncated/corrupt
vector, bad λ/density/drop/method, missing vector, different bases) are
folded in here too, so this table is the single place that lists every
refusal.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from taskvec import engine
from pipeline.cli import main as cli_main
from taskvec.errors import TaskvecError
from tests.conftest import make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
ENGINE_COMMANDS = {"extract", "combine", "apply", "merge", "compress"}

# ---------------------------------------------------------------------------
# The harness


@dataclass
class Invocation:
    """What a case runs: CLI ``argv`` or a library ``call``; ``outputs`` must not appear."""

    argv: list[str] | None = None
    call: Callable[[], object] | None = None
    outputs: list[Path] = field(default_factory=list)
    registry: Callable[[], int] | None = None  # counts registered versions, if the case can register
    timeout: float | None = None  # for cases that could hang: run the CLI as a subprocess with this limit
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the subprocess


@dataclass
class Ctx:
    """Shared inputs (built once per module) plus this case's own ``tmp`` folder."""

    tmp: Path
    base: Path
    ft1: Path
    ft2: Path
    v1: Path
    v2: Path
    request: object = None

    def store(self) -> Path:
        """A shared MLflow registry + audit log (model ``m``, version 1 with a ledger), built on first use."""
        return self.request.getfixturevalue("registry_store")

    # -- helpers for building bad input --------------------------------------
    def weights(self, model: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(Path(model).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    def model(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        d = self.tmp / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        return d

    def copy_vector(self, name: str, edit: Callable[[dict, dict], None], src: Path | None = None) -> Path:
        """A copy of a task vector whose tensors/metadata ``edit(tensors, metadata)`` changed in place."""
        src = src or self.v1
        with safe_open(src, "pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        edit(tensors, meta)
        save_file(tensors, self.tmp / name, metadata=meta)
        return self.tmp / name

    def data(self, task: str, splits: dict[str, str]) -> Path:
        """A mirror folder ``data/<task>`` with the given CSV texts."""
        d = self.tmp / "data" / task
        d.mkdir(parents=True, exist_ok=True)
        for split, text in splits.items():
            (d / f"{split}.csv").write_text(text)
        return d

    def params(self, text: str, name: str = "params.yaml") -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name


GOOD_CSV = "text,label\na fine film,positive\na dull film,negative\n"
TASK_YAML = """\
data_dir: data
tasks:
  toy:
    source: toy
    labels: [negative, positive]
"""


def good_task(ctx: Ctx, **splits: str) -> Path:
    ctx.data("toy", {"train": GOOD_CSV, "validation": GOOD_CSV, "test": GOOD_CSV} | splits)
    # the full CLI validates the whole file: its pipeline sections must name declared tasks only
    return ctx.params(TASK_YAML + "finetune:\n  tasks: [toy]\nedit:\n  learn: [toy]\n")


CASES: list = []


def case(case_id: str, expect: str, build: Callable[[Ctx], Invocation] | None = None, *, marks=()):
    """Register ``build(ctx) -> Invocation`` as a refusal case expecting ``expect`` in the message (as a decorator without ``build``)."""

    def deco(fn: Callable[[Ctx], Invocation]):
        CASES.append(pytest.param(fn, expect, id=case_id, marks=list(marks)))
        return fn

    return deco if build is None else deco(build)


def _extract(ctx: Ctx, base, ft, *extra) -> Invocation:
    out = ctx.tmp / "v.safetensors"
    return Invocation(["extract", str(base), str(ft), "-o", str(out), *map(str, extra)], outputs=[out])


def _apply(ctx: Ctx, base, *vectors, extra=()) -> Invocation:
    out = ctx.tmp / "out"
    return Invocation(["apply", str(base), *map(str, vectors), "-o", str(out), *map(str, extra)], outputs=[out])


def _combine(ctx: Ctx, *vectors, extra=()) -> Invocation:
    out = ctx.tmp / "c.safetensors"
    return Invocation(["combine", *map(str, vectors), "-o", str(out), *map(str, extra)], outputs=[out])


def _finetune(ctx: Ctx, params: Path, task: str = "toy") -> Invocation:
    out = ctx.tmp / "ft-out"
    return Invocation(["finetune", task, "-o", str(out), "--params", str(params), "--base", str(ctx.base), "-q"], outputs=[out])


# ---------------------------------------------------------------------------
# Engine: homology (names, shapes, dtypes, base hash)


case("extract-shape-mismatch", "'embeddings.word_embeddings.weight' has shape", lambda ctx: _extract(ctx, ctx.base, make_tiny_bert(ctx.tmp / "wide", vocab_size=120)))
@case("extract-extra-tensor", "'extra.weight' is in the fine-tuned model but not in the base")
def _(ctx):
    w = ctx.weights(ctx.ft1) | {"extra.weight": torch.zeros(3)}
    return _extract(ctx, ctx.base, ctx.model("ft", w))


@case("extract-missing-tensor", "is in the base but not in the fine-tuned model")
def _(ctx):
    w = ctx.weights(ctx.ft1)
    del w["pooler.dense.bias"]
    return _extract(ctx, ctx.base, ctx.model("ft", w))


@case("extract-dtype-mismatch", "has dtype F16 in the fine-tuned model but F32 in the base")
def _(ctx):
    w = {k: v.half() if v.is_floating_point() else v for k, v in ctx.weights(ctx.ft1).items()}
    return _extract(ctx, ctx.base, ctx.model("ft", w))


def _merge_with_env(ctx: Ctx, **env: str) -> Invocation:
    """``taskvec merge`` in a fresh process (the chunk and block sizes are read at import) with ``env``."""
    out = ctx.tmp / "m"
    argv = [str(Path(sys.executable).with_name("taskvec")), "merge", str(ctx.base), f"{ctx.ft1}:1", "-o", str(out), "-q"]
    return Invocation(argv=argv, outputs=[out], timeout=120, env=env)


case("merge-block-size-not-positive", "TASKVEC_BLOCK_ELEMS='0': expected a positive integer", lambda ctx: _merge_with_env(ctx, TASKVEC_BLOCK_ELEMS="0"))
case("merge-chunk-size-not-a-number", "TASKVEC_CHUNK_BYTES='4MB': expected a positive integer", lambda ctx: _merge_with_env(ctx, TASKVEC_CHUNK_BYTES="4MB"))
case("apply-base-hash-differs", "differs from the hash", lambda ctx: _apply(ctx, ctx.ft2, ctx.v1))
@case("apply-vector-shape-differs-from-base", "has shape [120, 32] in vector")
def _(ctx):
    wide = make_tiny_bert(ctx.tmp / "wide", vocab_size=120)
    wide_ft = ctx.model("wide_ft", {k: v + 0.01 if v.is_floating_point() else v for k, v in ctx.weights(wide).items()})
    vec = engine.extract(wide, wide_ft, ctx.tmp / "wide.safetensors").path
    return _apply(ctx, ctx.base, vec)


@case("apply-vector-tensor-not-in-base", "'extra.weight' of vector")
def _(ctx):
    w = ctx.weights(ctx.base) | {"extra.weight": torch.zeros(3)}
    b2 = ctx.model("b2", w)
    f2 = ctx.model("f2", {k: v + 0.5 if v.is_floating_point() else v for k, v in w.items()})
    vec = engine.extract(b2, f2, ctx.tmp / "x.safetensors").path
    return _apply(ctx, ctx.base, vec)


@case("combine-different-bases", "must share their base model")
def _(ctx):
    other = engine.extract(ctx.ft1, ctx.ft2, ctx.tmp / "o.safetensors").path
    return _combine(ctx, ctx.v1, other)


@case("combine-different-tensors", "cover different tensors")
def _(ctx):
    part = engine.extract(ctx.base, ctx.ft2, ctx.tmp / "part.safetensors", include=["encoder.*"]).path
    return _combine(ctx, ctx.v1, part)


# ---------------------------------------------------------------------------
# Engine: damaged files


@case("vector-truncated", "truncated")
def _(ctx):
    data = ctx.v1.read_bytes()
    (ctx.tmp / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    return _apply(ctx, ctx.base, ctx.tmp / "trunc.safetensors")


@case("vector-shorter-than-header", "truncated safetensors file (no header)")
def _(ctx):
    (ctx.tmp / "tiny.safetensors").write_bytes(b"\x01\x02\x03")
    return _combine(ctx, ctx.tmp / "tiny.safetensors")


@case("model-truncated", "truncated safetensors file")
def _(ctx):
    d = ctx.tmp / "cut"
    d.mkdir()
    data = (ctx.ft1 / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _extract(ctx, ctx.base, d)


@case("vector-header-not-json", "corrupt safetensors header (not valid JSON)")
def _(ctx):
    data = ctx.v1.read_bytes()
    (ctx.tmp / "bad.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    return _apply(ctx, ctx.base, ctx.tmp / "bad.safetensors")


@case("vector-header-length-absurd", "corrupt safetensors header (declared length")
def _(ctx):
    data = ctx.v1.read_bytes()
    (ctx.tmp / "bad.safetensors").write_bytes(struct.pack("<Q", 2**40) + data[8:])
    return _apply(ctx, ctx.base, ctx.tmp / "bad.safetensors")


@case("vector-header-offsets-wrong", "corrupt safetensors header")
def _(ctx):
    data = ctx.v1.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s + 1 for s in header[name]["shape"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (ctx.tmp / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return _apply(ctx, ctx.base, ctx.tmp / "bad.safetensors")


case("vector-is-a-plain-model-file", "not a taskvec task vector", lambda ctx: _apply(ctx, ctx.base, ctx.ft1 / "model.safetensors"))
case("vector-unknown-format-version", "unsupported task-vector format version", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("v9.safetensors", lambda t, m: m.update({"taskvec.format": "9"}))))
@case("sharded-model-missing-shard", ".safetensors is missing")
def _(ctx):
    from transformers import AutoModel

    AutoModel.from_pretrained(ctx.ft1).save_pretrained(ctx.tmp / "sh", max_shard_size="30KB")
    shards = sorted((ctx.tmp / "sh").glob("model-*.safetensors"))
    assert len(shards) > 1, shards
    shards[-1].unlink()
    return _extract(ctx, ctx.base, ctx.tmp / "sh")


@case("apply-corrupt-edit-ledger", "corrupt edit ledger")
def _(ctx):
    d = ctx.tmp / "based"
    d.mkdir()
    (d / "model.safetensors").write_bytes((ctx.base / "model.safetensors").read_bytes())
    (d / "taskvec.json").write_text("{oops")
    return _apply(ctx, d, ctx.v1)


# ---------------------------------------------------------------------------
# Engine: values (NaN/Inf, empty)


def _poison(ctx: Ctx, src: Path, name: str, value: float, dtype: torch.dtype | None = None) -> Path:
    """A copy of model ``src`` (its floating tensors cast to ``dtype``, if given) with one element set to ``value``."""
    w = ctx.weights(src)
    if dtype is not None:
        w = {k: v.to(dtype) if v.is_floating_point() else v for k, v in w.items()}
    key = sorted(k for k, v in w.items() if v.is_floating_point())[3]
    w[key] = w[key].clone()
    w[key].view(-1)[0] = value
    return ctx.model(name, w)


case("finetuned-model-has-nan", "fine-tuned model has NaN or Inf values in tensor", lambda ctx: _extract(ctx, ctx.base, _poison(ctx, ctx.ft1, "ft", math.nan)))
case("base-model-has-inf", "base model has NaN or Inf values in tensor", lambda ctx: _extract(ctx, _poison(ctx, ctx.base, "b", math.inf), ctx.ft1))
@case("vector-has-nan", "NaN or Inf values in tensor")
def _(ctx):
    def edit(t, m):
        k = json.loads(m["taskvec.names"])[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = math.nan

    return _apply(ctx, ctx.base, ctx.copy_vector("nan.safetensors", edit))


@case("vector-has-inf-combine", "vector inf.safetensors has NaN or Inf values in tensor")
def _(ctx):
    def edit(t, m):
        k = json.loads(m["taskvec.names"])[-1]
        t[k] = t[k].clone()
        t[k].view(-1)[-1] = -math.inf

    return _combine(ctx, ctx.copy_vector("inf.safetensors", edit), ctx.v2)


@case("result-overflows-to-inf", "overflows float32")
def _(ctx):
    def edit(t, m):
        k = json.loads(m["taskvec.names"])[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = 3e38  # finite, but 2 x 3e38 is Inf in float32

    return _apply(ctx, ctx.base, f"{ctx.copy_vector('huge.safetensors', edit)}:2")


def _half_pair(ctx: Ctx, dtype: torch.dtype, base_value: float, ft_value: float) -> tuple[Path, Path]:
    """The base and first fine-tune cast to ``dtype``, the same element of each set to the given values."""
    return _poison(ctx, ctx.base, "hb", base_value, dtype), _poison(ctx, ctx.ft1, "hf", ft_value, dtype)


def _merge_half(ctx: Ctx, dtype: torch.dtype, base_value: float, ft_value: float, lam: float) -> Invocation:
    base, ft = _half_pair(ctx, dtype, base_value, ft_value)
    return Invocation(["merge", str(base), f"{ft}:{lam}", "-o", str(ctx.tmp / "out")], outputs=[ctx.tmp / "out"])


# a result float32 holds but the output's dtype cannot (float16's largest value is 65504): stored
# as Inf before this check. 60000 + 3 x (65000 - 60000) = 75000; bfloat16 overflows only near 3.4e38
case("merge-result-beyond-float16", "does not fit float16: it reaches 74976", lambda ctx: _merge_half(ctx, torch.float16, 60000.0, 65000.0, 3))
# 2^127 + 1.999 x 2^126 = 1.9995 x 2^127: below float32's largest value (1.99999994 x 2^127), above the
# point where bfloat16 rounds to Inf ((2 - 2^-8) x 2^127)
case("merge-result-beyond-bfloat16", "does not fit bfloat16: it reaches 3.40", lambda ctx: _merge_half(ctx, torch.bfloat16, 2.0**127, 2.0**127 + 2.0**126, 1.999))
case("extract-vector-beyond-float16", "does not fit float16: it reaches 80000", lambda ctx: _extract(ctx, *_half_pair(ctx, torch.float32, -40000.0, 40000.0), "--dtype", "float16"))


@case("combine-result-beyond-float16", "combined tensor")
def _(ctx):
    def edit(t, m):
        k = json.loads(m["taskvec.names"])[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = 40000.0  # fits float16 alone; 2 x 40000 does not

    return _combine(ctx, f"{ctx.copy_vector('big.safetensors', edit)}:2", extra=["--dtype", "float16"])


@case("compress-beyond-float16", "compressed tensor")
def _(ctx):
    def edit(t, m):
        k = json.loads(m["taskvec.names"])[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = 1e6

    out = ctx.tmp / "s.safetensors"
    return Invocation(["compress", str(ctx.copy_vector("big.safetensors", edit)), "--dtype", "float16", "-o", str(out)], outputs=[out])


case("lambda-beyond-float32", "lambda", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:1e300"))  # finite as a Python float, not as a float32
@case("empty-vector-file", "empty task vector")
def _(ctx):
    with safe_open(ctx.v1, "pt") as f:
        meta = dict(f.metadata())
    meta["taskvec.names"] = "[]"
    meta["taskvec.param_count"] = "0"
    save_file({}, ctx.tmp / "empty.safetensors", metadata=meta)
    return _apply(ctx, ctx.base, ctx.tmp / "empty.safetensors")


case("extract-everything-excluded", "empty task vector", lambda ctx: _extract(ctx, ctx.base, ctx.ft1, "--exclude", "*"))
# ---------------------------------------------------------------------------
# Engine: pickle


def _pickled_model(ctx: Ctx, payload) -> Path:
    d = ctx.tmp / "pk"
    d.mkdir()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(payload, f)
    return d


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@case("pickle-checkpoint-refused", "pickle checkpoint refused")
def _(ctx):
    d = ctx.tmp / "pk"
    d.mkdir()
    torch.save(ctx.weights(ctx.ft1), d / "pytorch_model.bin")
    return _extract(ctx, ctx.base, d)


case("pickle-allowed-but-carries-code", "cannot load pickle checkpoint with weights_only=True", lambda ctx: _extract(ctx, ctx.base, _pickled_model(ctx, {"embeddings.word_embeddings.weight": _RunsCode()}), "--allow-pickle"))
# ---------------------------------------------------------------------------
# Engine: unknown ids, bad parameters


case("vector-not-found", "task vector not found", lambda ctx: _apply(ctx, ctx.base, ctx.tmp / "missing.safetensors"))
case("base-model-not-found", "model folder not found", lambda ctx: _apply(ctx, ctx.tmp / "no-such-model", ctx.v1))
case("hub-model-unresolvable-offline", "cannot resolve model 'no-such-org/no-such-model'", lambda ctx: _extract(ctx, "no-such-org/no-such-model", ctx.ft1))
@case("model-folder-without-weights", "no safetensors weights found")
def _(ctx):
    (ctx.tmp / "empty-model").mkdir()
    (ctx.tmp / "empty-model" / "config.json").write_text("{}")
    return _extract(ctx, ctx.tmp / "empty-model", ctx.ft1)


case("unknown-merge-method", "unknown merge method 'mean'", lambda ctx: _apply(ctx, ctx.base, ctx.v1, extra=["--method", "mean"]))
case("lambda-nan", "lambda must be a finite number", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:nan"))
case("lambda-inf", "lambda must be a finite number", lambda ctx: _combine(ctx, ctx.v1, f"{ctx.v2}:-inf"))
case("lambda-not-a-number", "lambda must be a finite number in plain decimal", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:abc"))
case("dare-p-equals-1", "DARE drop probability p must be in [0, 1)", lambda ctx: _apply(ctx, ctx.base, ctx.v1, extra=["--method", "dare", "--drop", "1"]))
case("dare-p-negative", "DARE drop probability p must be in [0, 1)", lambda ctx: _combine(ctx, ctx.v1, ctx.v2, extra=["--method", "dare_ties", "--drop", "-0.1"]))
case("ties-k-zero", "density must be the kept fraction in (0, 1]", lambda ctx: _apply(ctx, ctx.base, ctx.v1, extra=["--method", "ties", "--density", "0"]))
case("ties-k-above-100", "density must be the kept fraction in (0, 1]", lambda ctx: _combine(ctx, ctx.v1, ctx.v2, extra=["--method", "ties", "--density", "1.01"]))
case("ties-k-as-percent", "density must be the kept fraction in (0, 1]", lambda ctx: _apply(ctx, ctx.base, ctx.v1, extra=["--method", "ties", "--density", "50"]))
case("ties-k-nan", "density must be the kept fraction in (0, 1]", lambda ctx: _apply(ctx, ctx.base, ctx.v1, extra=["--method", "ties", "--density", "nan"]))
case("drop-with-ties", "--drop applies to dare and dare_ties, not ties", lambda ctx: _combine(ctx, ctx.v1, ctx.v2, extra=["--method", "ties", "--drop", "0.5"]))
@case("compress-two-sparsifiers", "choose one sparsifier")
def _(ctx):
    out = ctx.tmp / "s.safetensors"
    return Invocation(["compress", str(ctx.v1), "--density", "0.1", "--drop", "0.5", "-o", str(out)], outputs=[out])


case("unknown-dtype", "unknown dtype 'int8'", lambda ctx: _extract(ctx, ctx.base, ctx.ft1, "--dtype", "int8"))
case("bad-shard-size", "bad size '5 parsecs'", lambda ctx: _apply(ctx, ctx.base, ctx.v1, extra=["--max-shard-size", "5 parsecs"]))
@case("apply-output-is-a-file", "exists and is not a folder")
def _(ctx):
    (ctx.tmp / "out").write_text("keep me")
    inv = _apply(ctx, ctx.base, ctx.v1)
    inv.outputs = []  # the file pre-exists; the tree snapshot checks it is untouched
    return inv


# ---------------------------------------------------------------------------
# Issue 11: outputs never destroy inputs or data taskvec did not write


def _model_copy(ctx: Ctx, src: Path, name: str, *, extras: bool = False) -> Path:
    """A copy of a model folder; with ``extras``, the things a real checkout holds beside the weights."""
    d = ctx.tmp / name
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    if extras:
        (d / ".git").mkdir()
        (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (d / "onnx").mkdir()
        (d / "onnx" / "model.onnx").write_bytes(b"onnx")
        (d / "pytorch_model.bin").write_bytes(b"pickle")
    return d


def _vcopy(ctx: Ctx, name: str = "mine.safetensors") -> Path:
    (ctx.tmp / name).write_bytes(ctx.v1.read_bytes())
    return ctx.tmp / name


@case("apply-output-is-the-base", "is the input")
def _(ctx):
    b = _model_copy(ctx, ctx.base, "B", extras=True)
    return Invocation(["apply", str(b), str(ctx.v1), "-o", str(b)])


@case("merge-output-is-a-finetuned-input", "is the input")
def _(ctx):
    f = _model_copy(ctx, ctx.ft1, "F")
    return Invocation(["merge", str(ctx.base), f"{f}:0.5", "-o", str(f)])


@case("extract-output-is-the-base-weight-file", "lies inside the input")
def _(ctx):
    b = _model_copy(ctx, ctx.base, "B")
    return Invocation(["extract", str(b), str(ctx.ft1), "-o", str(b / "model.safetensors")])


@case("apply-output-inside-the-base", "lies inside the input")
def _(ctx):
    b = _model_copy(ctx, ctx.base, "B")
    return Invocation(["apply", str(b), str(ctx.v1), "-o", str(b / "edited")], outputs=[b / "edited"])


@case("apply-output-contains-a-vector-input", "contains the input")
def _(ctx):
    d = ctx.tmp / "D"
    d.mkdir()
    v = d / "v.safetensors"
    v.write_bytes(ctx.v1.read_bytes())
    return Invocation(["apply", str(ctx.base), str(v), "-o", str(d)])


@case("apply-output-symlink-to-the-base", "is the input")
def _(ctx):
    b = _model_copy(ctx, ctx.base, "B")
    (ctx.tmp / "link").symlink_to(b, target_is_directory=True)
    return Invocation(["apply", str(b), str(ctx.v1), "-o", str(ctx.tmp / "link")])


@case("combine-output-is-an-input-vector", "is the input")
def _(ctx):
    v = _vcopy(ctx)
    return Invocation(["combine", str(v), str(ctx.v2), "-o", str(v)])


@case("compress-output-is-its-input", "is the input")
def _(ctx):
    v = _vcopy(ctx)
    return Invocation(["compress", str(v), "--density", "0.5", "-o", str(v)])


@case("apply-output-foreign-folder", "was not written by taskvec")
def _(ctx):
    (ctx.tmp / "D" / "docs").mkdir(parents=True)
    (ctx.tmp / "D" / "docs" / "f").write_text("x\n")
    return Invocation(["apply", str(ctx.base), str(ctx.v1), "-o", str(ctx.tmp / "D")])


@case("merge-output-foreign-folder", "pass --force")
def _(ctx):
    (ctx.tmp / "D").mkdir()
    (ctx.tmp / "D" / "notes.txt").write_text("mine\n")
    return Invocation(["merge", str(ctx.base), str(ctx.ft1), "-o", str(ctx.tmp / "D")])


@case("extract-output-foreign-file", "is not a taskvec task vector")
def _(ctx):
    (ctx.tmp / "notes.safetensors").write_text("my notes\n")
    return Invocation(["extract", str(ctx.base), str(ctx.ft1), "-o", str(ctx.tmp / "notes.safetensors")])


@case("combine-output-plain-model-file", "is not a taskvec task vector")
def _(ctx):
    b = _model_copy(ctx, ctx.ft2, "M")
    return Invocation(["combine", str(ctx.v1), str(ctx.v2), "-o", str(b / "model.safetensors")])


@case("extract-output-zero-byte-file", "is not a taskvec task vector")
def _(ctx):
    (ctx.tmp / "empty.safetensors").touch()
    return Invocation(["extract", str(ctx.base), str(ctx.ft1), "-o", str(ctx.tmp / "empty.safetensors")])


def _device(ctx: Ctx) -> Path:
    """A character device like /dev/null, made under tmp (never the real one: a regression would replace it)."""
    node = ctx.tmp / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        os.mkfifo(node)  # without CAP_MKNOD: another non-regular file
    return node


case("extract-output-dev-null", "is not a regular file", lambda ctx: Invocation(["extract", str(ctx.base), str(ctx.ft1), "-o", str(_device(ctx))]))
@case("extract-output-fifo", "is not a regular file")
def _(ctx):
    os.mkfifo(ctx.tmp / "pipe")
    return Invocation(["extract", str(ctx.base), str(ctx.ft1), "-o", str(ctx.tmp / "pipe")])


@case("extract-output-is-a-folder", "is a folder; give a file path")
def _(ctx):
    (ctx.tmp / "vecs").mkdir()
    return Invocation(["extract", str(ctx.base), str(ctx.ft1), "-o", str(ctx.tmp / "vecs")])


case("apply-output-is-a-device", "exists and is not a folder", lambda ctx: Invocation(["apply", str(ctx.base), str(ctx.v1), "-o", str(_device(ctx))]))
@case("finetune-output-foreign-folder", "was not written by taskvec")
def _(ctx):
    p = good_task(ctx)
    (ctx.tmp / "outputs" / "agnews").mkdir(parents=True)
    (ctx.tmp / "outputs" / "agnews" / "finetune.json").write_text("{}\n")
    return Invocation(["finetune", "toy", "-o", str(ctx.tmp / "outputs"), "--params", str(p), "--base", str(ctx.base), "-q"])


@case("finetune-output-inside-the-base", "lies inside the input")
def _(ctx):
    p = good_task(ctx)
    b = _model_copy(ctx, ctx.base, "B")
    return Invocation(["finetune", "toy", "-o", str(b / "ft"), "--params", str(p), "--base", str(b), "-q"], outputs=[b / "ft"])


@case("inspect-png-over-an-input-vector", "is the input")
def _(ctx):
    v = _vcopy(ctx)
    return Invocation(["inspect", str(v), "--png", str(v)])


@case("finetune-output-is-the-task-data", "is the input")
def _(ctx):
    p = good_task(ctx)
    return Invocation(["finetune", "toy", "-o", str(ctx.tmp / "data" / "toy"), "--params", str(p), "--base", str(ctx.base), "-q"])


# ---------------------------------------------------------------------------
# Issue 11: crafted headers, indices and shard indexes


def _raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _inspect_raw(ctx: Ctx, name: str, header: dict, data: bytes) -> Invocation:
    """``taskvec inspect`` of a file with this raw safetensors header."""
    return Invocation(["inspect", str(_raw(ctx.tmp / name, header, data))])


def _raw_text(path: Path, header_text: str, data: bytes) -> Path:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _vector_meta(ctx: Ctx, **changes: str) -> dict:
    with safe_open(ctx.v1, "pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    return meta


def _sparse(ctx: Ctx, name: str, edit: Callable[[dict, dict], None]) -> Path:
    src = engine.compress(ctx.v1, ctx.tmp / "sparse-src.safetensors", density=0.25)["path"]
    out = ctx.copy_vector(name, edit, Path(src))
    Path(src).unlink()
    return out


def _first_sparse(t: dict) -> str:
    return sorted(k for k in t if k.endswith("::indices"))[0]


@case("sparse-index-negative", "strictly increasing positions in [0,")
def _(ctx):
    def edit(t, m):
        k = _first_sparse(t)
        t[k] = t[k].clone()
        t[k][0] = -1

    return _apply(ctx, ctx.base, _sparse(ctx, "neg.safetensors", edit))


@case("sparse-index-beyond-tensor", "strictly increasing positions in [0,")
def _(ctx):
    def edit(t, m):
        k = _first_sparse(t)
        shape = json.loads(m["taskvec.storage"])["shapes"][k.split("::")[0]]
        t[k] = t[k].clone()
        t[k][-1] = math.prod(shape)

    return _combine(ctx, _sparse(ctx, "far.safetensors", edit))


@case("sparse-duplicate-indices", "strictly increasing")
def _(ctx):
    def edit(t, m):
        k = _first_sparse(t)
        t[k] = t[k].clone()
        t[k][1] = t[k][0]

    return _apply(ctx, ctx.base, _sparse(ctx, "dup.safetensors", edit))


@case("sparse-fewer-values-than-indices", "indices but")
def _(ctx):
    def edit(t, m):
        k = _first_sparse(t).replace("::indices", "::values")
        t[k] = t[k][:-1].clone()

    return _apply(ctx, ctx.base, _sparse(ctx, "short.safetensors", edit))


@case("sparse-dense-shape-terabytes", "more than this machine's memory")
def _(ctx):
    def edit(t, m):
        storage = json.loads(m["taskvec.storage"])
        name = sorted(storage["shapes"])[0]
        storage["shapes"][name] = [10**7, 10**7]
        m["taskvec.storage"] = json.dumps(storage)

    return Invocation(["inspect", str(_sparse(ctx, "bomb.safetensors", edit))])


@case("sparse-shapes-not-a-map", "sparse storage must give a shape")
def _(ctx):
    def edit(t, m):
        m["taskvec.storage"] = json.dumps({"kind": "sparse", "shapes": [1, 2]})

    return Invocation(["inspect", str(_sparse(ctx, "shapes.safetensors", edit))])


@case("header-overlapping-byte-ranges", "overlaps the previous tensor")
def _(ctx):
    meta = _vector_meta(ctx, **{"taskvec.names": '["a", "b"]', "taskvec.param_count": "8"})
    header = {"__metadata__": meta, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    return Invocation(["inspect", str(_raw(ctx.tmp / "overlap.safetensors", header, bytes(16)))])


case("header-gap-between-tensors", "leaves a gap", lambda ctx: _inspect_raw(ctx, "gap.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)))


@case("header-trailing-bytes", "bytes after the last tensor are not described")
def _(ctx):
    (ctx.tmp / "tail.safetensors").write_bytes(ctx.v1.read_bytes() + b"\0" * 64)
    return _apply(ctx, ctx.base, ctx.tmp / "tail.safetensors")


case("header-negative-dimension", "negative dimension", lambda ctx: _inspect_raw(ctx, "neg.safetensors", {"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, bytes(16)))


case("header-float-dimension", "shape and offsets must be integers", lambda ctx: _inspect_raw(ctx, "float.safetensors", {"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, bytes(16)))


@case("header-duplicate-tensor-names", "appears twice")
def _(ctx):
    text = '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    return Invocation(["inspect", str(_raw_text(ctx.tmp / "dup.safetensors", text, bytes(8)))])


@case("header-metadata-not-strings", "__metadata__ is not a map of strings")
def _(ctx):
    header = {"__metadata__": {"taskvec.format": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return _apply(ctx, ctx.base, _raw(ctx.tmp / "meta.safetensors", header, bytes(4)))


case("header-unknown-dtype", "unsupported safetensors dtype 'F8'", lambda ctx: _inspect_raw(ctx, "f8.safetensors", {"a": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)))


@case("header-length-one-past-the-file", "corrupt safetensors header (declared length")
def _(ctx):
    data = ctx.v1.read_bytes()
    (ctx.tmp / "long.safetensors").write_bytes(struct.pack("<Q", len(data) - 7) + data[8:])
    return _apply(ctx, ctx.base, ctx.tmp / "long.safetensors")


@case("vector-zero-byte-file", "truncated safetensors file (no header)")
def _(ctx):
    (ctx.tmp / "zero.safetensors").touch()
    return _apply(ctx, ctx.base, ctx.tmp / "zero.safetensors")


@case("vector-is-a-folder", "is a folder, not a task-vector file")
def _(ctx):
    (ctx.tmp / "d.safetensors").mkdir()
    return _combine(ctx, ctx.tmp / "d.safetensors")


@case("vector-is-a-fifo", "is not a regular file")
def _(ctx):
    os.mkfifo(ctx.tmp / "fifo.safetensors")
    out = ctx.tmp / "out"
    argv = [str(Path(sys.executable).with_name("taskvec")), "apply", str(ctx.base), str(ctx.tmp / "fifo.safetensors"), "-o", str(out), "-q"]
    return Invocation(argv=argv, outputs=[out], timeout=SERVICE_TIMEOUT)  # a read of the FIFO would hang: run it bounded


@case("model-weights-are-a-fifo", "is not a regular file")
def _(ctx):
    d = ctx.tmp / "fifo-model"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    out = ctx.tmp / "v.safetensors"
    argv = [str(Path(sys.executable).with_name("taskvec")), "extract", str(ctx.base), str(d), "-o", str(out), "-q"]
    return Invocation(argv=argv, outputs=[out], timeout=SERVICE_TIMEOUT)


@case("model-weights-dangling-symlink", "safetensors file not found")
def _(ctx):
    d = ctx.tmp / "dangling"
    d.mkdir()
    (d / "model.safetensors").symlink_to(ctx.tmp / "gone.safetensors")
    return _extract(ctx, ctx.base, d)


@case("base-model-is-a-fifo", "is a file, not a model folder")
def _(ctx):
    os.mkfifo(ctx.tmp / "base-fifo")
    return _extract(ctx, ctx.tmp / "base-fifo", ctx.ft1)


case("names-wrong-json-type", "taskvec.names must be a JSON list of tensor names", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("n.safetensors", lambda t, m: m.update({"taskvec.names": '{"a": 1}'}))))
case("names-a-json-string", "taskvec.names must be a JSON list", lambda ctx: Invocation(["inspect", str(ctx.copy_vector("s.safetensors", lambda t, m: m.update({"taskvec.names": '"pooler.dense.bias"'})))]))
case("names-list-of-numbers", "taskvec.names must be a JSON list of tensor names", lambda ctx: _combine(ctx, ctx.copy_vector("num.safetensors", lambda t, m: m.update({"taskvec.names": "[1, 2]"}))))
@case("names-duplicated", "is named twice in taskvec.names")
def _(ctx):
    def edit(t, m):
        names = json.loads(m["taskvec.names"])
        m["taskvec.names"] = json.dumps(names + names[:1])

    return _apply(ctx, ctx.base, ctx.copy_vector("dn.safetensors", edit))


case("recipe-wrong-json-type", "taskvec.recipe must be a JSON object", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("r.safetensors", lambda t, m: m.update({"taskvec.recipe": "[1]"}))))
case("storage-kind-unknown", "is not dense, sparse or lowrank", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("k.safetensors", lambda t, m: m.update({"taskvec.storage": '{"kind": "zip"}'}))))
case("param-count-negative", "taskvec.param_count is not a non-negative integer", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("pc.safetensors", lambda t, m: m.update({"taskvec.param_count": "-5"}))))
case("param-count-wrong", "but the tensors hold", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("pc2.safetensors", lambda t, m: m.update({"taskvec.param_count": "7"}))))
case("base-hash-not-a-digest", "taskvec.base_hash is not a sha256 hex digest", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("bh.safetensors", lambda t, m: m.update({"taskvec.base_hash": "not-a-hash"}))))
case("vector-claims-another-base", "differs from the hash", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("other.safetensors", lambda t, m: m.update({"taskvec.base_hash": "f" * 64}))))
case("vector-header-missing-key", "corrupt task-vector header (no taskvec.recipe)", lambda ctx: _apply(ctx, ctx.base, ctx.copy_vector("mk.safetensors", lambda t, m: m.pop("taskvec.recipe"))))
@case("vector-integer-values", "not floating point")
def _(ctx):
    def edit(t, m):
        k = json.loads(m["taskvec.names"])[0]
        t[k] = t[k].to(torch.int64)

    return _apply(ctx, ctx.base, ctx.copy_vector("int.safetensors", edit))


def _sharded(ctx: Ctx) -> tuple[Path, dict]:
    from transformers import AutoModel

    AutoModel.from_pretrained(ctx.ft1).save_pretrained(ctx.tmp / "sh", max_shard_size="30KB")
    index = json.loads((ctx.tmp / "sh" / "model.safetensors.index.json").read_text())
    return ctx.tmp / "sh", index


def _write_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _remap_first_shard(ctx: Ctx, where: Callable[[Path, str], str]) -> Invocation:
    """``extract`` from a sharded fine-tune whose index sends the first shard's tensors to ``where(folder, shard)``."""
    sh, index = _sharded(ctx)
    first = sorted(set(index["weight_map"].values()))[0]
    target = where(sh, first)
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    _write_index(sh, index)
    return _extract(ctx, ctx.base, sh)


@case("shard-index-dotdot-path", "leaves the model folder")
def _(ctx):
    def outside(sh: Path, first: str) -> str:
        (ctx.tmp / "outside.safetensors").write_bytes((sh / first).read_bytes())
        return "../outside.safetensors"

    return _remap_first_shard(ctx, outside)


case("shard-index-absolute-path", "leaves the model folder", lambda ctx: _remap_first_shard(ctx, lambda sh, first: str(sh / first)))


@case("shard-symlink-escapes-the-folder", "is a link to a file outside the model folder")
def _(ctx):
    sh, index = _sharded(ctx)
    first = sorted(set(index["weight_map"].values()))[0]
    (sh / first).rename(ctx.tmp / "elsewhere.safetensors")
    (sh / first).symlink_to(ctx.tmp / "elsewhere.safetensors")
    return _extract(ctx, ctx.base, sh)


@case("shard-index-names-a-phantom-tensor", "listed in the index but no shard holds it")
def _(ctx):
    sh, index = _sharded(ctx)
    index["weight_map"]["ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    _write_index(sh, index)
    return _extract(ctx, ctx.base, sh)


@case("shard-holds-an-unlisted-tensor", "which the index does not list")
def _(ctx):
    sh, index = _sharded(ctx)
    del index["weight_map"][sorted(index["weight_map"])[0]]
    _write_index(sh, index)
    return _extract(ctx, ctx.base, sh)


@case("shard-index-wrong-shard", "is listed in")
def _(ctx):
    sh, index = _sharded(ctx)
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    _write_index(sh, index)
    return _extract(ctx, ctx.base, sh)


@case("shard-index-weight-map-a-list", "weight_map is not a non-empty map")
def _(ctx):
    sh, index = _sharded(ctx)
    index["weight_map"] = list(index["weight_map"])
    _write_index(sh, index)
    return _extract(ctx, ctx.base, sh)


@case("pickle-index-dotdot-path", "leaves the model folder")
def _(ctx):
    d = ctx.tmp / "pk"
    d.mkdir()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    return _extract(ctx, ctx.base, d, "--allow-pickle")


# ---------------------------------------------------------------------------
# Issue 11: the λ grammar


case("lambda-with-underscore", "lambda must be a finite number in plain decimal", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:1_0"))
case("lambda-hex", "lambda must be a finite number in plain decimal", lambda ctx: _combine(ctx, f"{ctx.v1}:0x10"))
case("lambda-infinity-spelled-out", "lambda must be a finite number in plain decimal", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:Infinity"))
case("lambda-overflows-to-inf", "lambda must be a finite number", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:1e999"))
case("lambda-empty", "lambda must be a finite number in plain decimal", lambda ctx: _apply(ctx, ctx.base, f"{ctx.v1}:"))
@case("lambda-ambiguous-with-a-file-of-that-name", "ambiguous vector argument")
def _(ctx):
    v = _vcopy(ctx, "task.safetensors")
    (ctx.tmp / "task.safetensors:2").write_bytes(ctx.v2.read_bytes())
    return _combine(ctx, f"{v}:2")


# ---------------------------------------------------------------------------
# Issue 11: usage and OS errors are one line too


case("usage-missing-argument", "Missing argument", lambda ctx: Invocation(["apply", str(ctx.base)]))
case("usage-missing-out-option", "Missing option '--out'", lambda ctx: Invocation(["extract", str(ctx.base), str(ctx.ft1)]))
case("usage-bad-option-value", "Invalid value for '--seed'", lambda ctx: Invocation(["combine", str(ctx.v1), "--seed", "many", "-o", str(ctx.tmp / "c.safetensors")], outputs=[ctx.tmp / "c.safetensors"]))
case("usage-unknown-option", "No such option: --bogus", lambda ctx: Invocation(["apply", str(ctx.base), str(ctx.v1), "-o", str(ctx.tmp / "out"), "--bogus"], outputs=[ctx.tmp / "out"]))
case("usage-unknown-command", "No such command 'extrakt'", lambda ctx: Invocation(["extrakt", str(ctx.base)]))
@case("os-read-only-file-system", "cannot write")
def _(ctx):
    import errno
    import tempfile as tf

    def read_only(*a, **k):  # what mkstemp raises on a read-only mount: the temp name, which must not be shown
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(k.get("dir", "."), ".v.safetensors.host-1.x.tmp"))

    ctx.request.getfixturevalue("monkeypatch").setattr(tf, "mkstemp", read_only)
    return _extract(ctx, ctx.base, ctx.ft1)


@case("os-disk-full-while-writing", "No space left on device")
def _(ctx):
    import errno

    from taskvec.io import writer

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.request.getfixturevalue("monkeypatch").setattr(writer.StreamingWriter, "write", full)
    return _combine(ctx, ctx.v1, ctx.v2)


@case("os-permission-denied-names-the-user-path", "Permission denied")
def _(ctx):
    import errno

    from taskvec.io import atomic

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), str(dst))

    ctx.request.getfixturevalue("monkeypatch").setattr(atomic.os, "replace", denied)
    return _apply(ctx, ctx.base, ctx.v1)


# ---------------------------------------------------------------------------
# Data (through `taskvec finetune`, which validates data before touching a model)


case("unknown-task", "unknown task 'nope' (params declare: toy)", lambda ctx: _finetune(ctx, good_task(ctx), "nope"))
case("data-missing-text-column", "has no column 'text'", lambda ctx: _finetune(ctx, good_task(ctx, train="sentence,label\nfine,positive\n")))
case("data-missing-label-column", "has no column 'label'", lambda ctx: _finetune(ctx, good_task(ctx, train="text,target\nfine,positive\n")))
case("data-unknown-label", "data row 2 has unknown label 'neutral'", lambda ctx: _finetune(ctx, good_task(ctx, train="text,label\nfine,positive\nmeh,neutral\n")))
case("data-empty-label", "data row 1 has an empty label", lambda ctx: _finetune(ctx, good_task(ctx, train="text,label\nfine,\n")))
case("data-empty-split", "split train is empty", lambda ctx: _finetune(ctx, good_task(ctx, train="text,label\n")))
@case("data-missing-split-file", "missing file")
def _(ctx):
    p = good_task(ctx)
    (ctx.tmp / "data" / "toy" / "train.csv").unlink()
    return _finetune(ctx, p)


case("data-folder-missing", "data folder not found", lambda ctx: _finetune(ctx, ctx.params("tasks:\n  toy:\n    source: ./nowhere\n    labels: [a, b]\nfinetune:\n  tasks: [toy]\nedit:\n  learn: [toy]\n")))
# ---------------------------------------------------------------------------
# params.yaml (schema-validated with pydantic)


case("params-unknown-top-level-key", "bogus: Extra inputs are not permitted", lambda ctx: _finetune(ctx, ctx.params(TASK_YAML + "bogus: 1\n")))
@case("params-unknown-nested-key", "train.stepz: Extra inputs are not permitted")
def _(ctx):
    ctx.data("toy", {"train": GOOD_CSV})
    return _finetune(ctx, ctx.params(TASK_YAML + "train:\n  stepz: 10\n"))


@case("params-wrong-type", "train.steps: Input should be a valid integer")
def _(ctx):
    ctx.data("toy", {"train": GOOD_CSV})
    return _finetune(ctx, ctx.params(TASK_YAML + "train:\n  steps: many\n"))


@case("params-negative-lr", "train.lr: Input should be greater than 0")
def _(ctx):
    ctx.data("toy", {"train": GOOD_CSV})
    return _finetune(ctx, ctx.params(TASK_YAML + "train:\n  lr: -1\n"))


case("params-task-one-label", "at least 2 labels", lambda ctx: _finetune(ctx, ctx.params("data_dir: data\ntasks:\n  toy:\n    source: toy\n    labels: [only]\n")))
case("params-invalid-yaml", "invalid YAML", lambda ctx: _finetune(ctx, ctx.params("tasks: [unclosed\n")))
case("params-not-a-mapping", "expected a mapping at the top level", lambda ctx: _finetune(ctx, ctx.params("- just\n- a list\n")))
case("params-file-missing", "params file not found", lambda ctx: _finetune(ctx, ctx.tmp / "nope.yaml"))
def _pipeline_params(ctx: Ctx, extra: str) -> Invocation:
    """``taskvec run --params P``: the pipeline validates the whole file before Prefect starts."""
    p = ctx.params(TASK_YAML + "finetune:\n  tasks: [toy]\n" + extra)
    return Invocation(["run", "--params", str(p), "--no-register", "--no-dvc"], outputs=[ctx.tmp / "outputs"])


case("params-unknown-merge-method", "edit.method: unknown merge method 'mean': choose one of sum, ties, dare, dare_ties, magnitude", lambda ctx: _pipeline_params(ctx, "edit:\n  learn: [toy]\n  method: mean\n"))
case("params-ties-k-above-100", "edit.density: density must be the kept fraction in (0, 1] (k% / 100), got 50.0", lambda ctx: _pipeline_params(ctx, "edit:\n  learn: [toy]\n  method: ties\n  density: 50\n"))
case("params-dare-p-1", "edit.drop: DARE drop probability p must be in [0, 1), got 1.0", lambda ctx: _pipeline_params(ctx, "edit:\n  learn: [toy]\n  method: dare\n  drop: 1.0\n"))
case("params-edit-unknown-task", "task 'nope' is used by the edit plan", lambda ctx: _pipeline_params(ctx, "edit:\n  learn: [nope]\n"))
case("params-compress-density-above-1", "register.compress.density: Input should be less than or equal to 1", lambda ctx: _pipeline_params(ctx, "edit:\n  learn: [toy]\nregister:\n  compress: {density: 10}\n"))
case("params-compress-full-weights", "register.compress stores a thin version's vectors; it needs register.weights: thin", lambda ctx: _pipeline_params(ctx, "edit:\n  learn: [toy]\nregister:\n  weights: full\n  compress: {dtype: float16}\n"))
@case(
    "params-lambda-max-infinite",
    "lambda_max",
)
def _(ctx):
    return _pipeline_params(ctx, "edit:\n  learn: [toy]\nsearch:\n  lambda_max: .inf\n")


# ---------------------------------------------------------------------------
# Pipeline: the registry (unknown model, version, alias or vector id; nothing registered or audited)

KNOWN_SHA = "a" * 64


def _count_registry(store: Path) -> Callable[[], tuple[int, int]]:
    def count() -> tuple[int, int]:
        from mlflow import MlflowClient

        from pipeline.ops.audit import AuditLog

        client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db", registry_uri=f"sqlite:///{store}/mlflow.db")
        return len(client.search_model_versions("name='m'")), len(AuditLog(f"sqlite:///{store}/audit.db").entries())

    return count


def _ops_cmd(ctx: Ctx, *args: str) -> Invocation:
    store = ctx.store()
    uris = ["--tracking-uri", f"sqlite:///{store}/mlflow.db", "--audit-url", f"sqlite:///{store}/audit.db"]
    return Invocation([*args, *uris], registry=_count_registry(store))


case("registry-unknown-model", "registered model 'nope' not found", lambda ctx: _ops_cmd(ctx, "approve", "nope", "1", "--approver", "a", "--reason", "r", "--no-resume"))
case("registry-unknown-version", "model 'm' has no version 7", lambda ctx: _ops_cmd(ctx, "approve", "m", "7", "--approver", "a", "--reason", "r", "--no-resume"))
case("registry-unknown-alias", "model 'm' has no version with alias 'champion'", lambda ctx: _ops_cmd(ctx, "reject", "m", "champion", "--approver", "a", "--reason", "r", "--no-resume"))
case("rollback-unknown-vector-id", "unknown vector bbbbbbbbbbbb: no version of m was edited with it", lambda ctx: _ops_cmd(ctx, "rollback", "m", "--remove", "b" * 64, "--version", "1", "--approver", "a", "--reason", "r"))
case("rollback-malformed-vector-id", "bad vector sha256 'xyz'", lambda ctx: _ops_cmd(ctx, "rollback", "m", "--remove", "xyz", "--version", "1", "--approver", "a", "--reason", "r"))
# ---------------------------------------------------------------------------
# Pipeline: unreachable services (subprocess: a hang must not hang the suite)

SERVICE_TIMEOUT = 20.0  # seconds: the stated bound within which an unreachable server must be reported


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TRACKER_PROBE = """
import sys
from pathlib import Path
from types import SimpleNamespace
from taskvec.errors import TaskvecError
from pipeline.ops.tracking import Tracker
p = SimpleNamespace(root=Path(sys.argv[2]), mlflow=SimpleNamespace(tracking_uri=sys.argv[1], artifact_root="mlartifacts", experiment="x"))
try:
    Tracker(p)
except TaskvecError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _tracker(ctx: Ctx, uri: str) -> Invocation:
    env_uri = uri
    # the environment names the same store: an MLFLOW_TRACKING_URI left by another test must not win
    return Invocation(argv=[sys.executable, "-c", _TRACKER_PROBE, env_uri, str(ctx.tmp)], timeout=SERVICE_TIMEOUT, env={"MLFLOW_TRACKING_URI": env_uri})


case("mlflow-server-unreachable", "MLflow tracking server http://127.0.0.1", lambda ctx: _tracker(ctx, f"http://127.0.0.1:{_free_port()}"))
case("mlflow-postgres-unreachable", "MLflow tracking store postgresql", lambda ctx: _tracker(ctx, f"postgresql://mlflow:s3cr3t@127.0.0.1:{_free_port()}/mlflow"))
@case("prefect-server-unreachable", "Prefect API http://127.0.0.1")
def _(ctx):
    p = ctx.params(TASK_YAML + "finetune:\n  tasks: [toy]\nedit:\n  learn: [toy]\n")
    argv = [str(Path(sys.executable).with_name("taskvec")), "run", "--params", str(p), "--no-register", "--no-dvc"]
    return Invocation(argv=argv, outputs=[ctx.tmp / "outputs"], timeout=SERVICE_TIMEOUT, env={"PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"})


# ---------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def shared(tiny_models, tmp_path_factory):
    base, ft1, ft2 = tiny_models
    d = tmp_path_factory.mktemp("refusal-vecs")
    return base, ft1, ft2, engine.extract(base, ft1, d / "v1.safetensors").path, engine.extract(base, ft2, d / "v2.safetensors").path


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory):
    from pipeline.ops.promotion import LEDGER_TAG, Ops

    store = tmp_path_factory.mktemp("registry")
    ops = Ops(f"sqlite:///{store}/mlflow.db", f"sqlite:///{store}/audit.db")
    (store / "art").mkdir()
    ops.client.create_registered_model("m")
    ledger = {"format": 1, "base_model": "b", "base_hash": "0" * 64, "output_hash": "1" * 64,
              "edits": [{"vector_sha256": KNOWN_SHA, "vector": "v.safetensors", "lambda": 1.0, "method": "sum"}]}
    ops.client.create_model_version("m", str(store / "art"), tags={LEDGER_TAG: json.dumps(ledger)})
    return store


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return out


def _run(inv: Invocation, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop the set-up's output
    if inv.timeout is not None:
        started = time.monotonic()
        try:
            proc = subprocess.run(inv.argv, capture_output=True, text=True, timeout=inv.timeout, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", **inv.env})
        except subprocess.TimeoutExpired:
            pytest.fail(f"no answer within the stated {inv.timeout:.0f} s: the command hangs")
        assert time.monotonic() - started <= inv.timeout
        return proc.returncode, proc.stderr
    if inv.argv is not None:
        argv = inv.argv + (["-q"] if inv.argv[0] in ENGINE_COMMANDS else [])
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        code = exc.value.code
        return (code if isinstance(code, int) else 1), capsys.readouterr().err
    try:
        inv.call()
    except TaskvecError as exc:  # what taskvec.cli.main prints for it
        return exc.exit_code, capsys.readouterr().err + f"error: {exc}\n"
    return 0, capsys.readouterr().err


@pytest.fixture
def _restore_environ():
    """Pipeline commands setdefault() environment variables in-process: put the environment back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(("build", "expect"), CASES)
@pytest.mark.usefixtures("_restore_environ")
def test_refusal(build, expect, shared, tmp_path, capsys, request):
    base, ft1, ft2, v1, v2 = shared
    ctx = Ctx(tmp_path, base, ft1, ft2, v1, v2, request)
    inv = build(ctx)
    before = _snapshot(tmp_path)
    versions = inv.registry() if inv.registry else None

    code, err = _run(inv, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}, stderr:\n{err}"
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    for out in inv.outputs:
        assert not out.exists(), f"{out} was written"
        siblings = [p.name for p in out.parent.glob(f".{out.name}.*")]
        assert siblings == [], f"temporary siblings left behind: {siblings}"
    assert _snapshot(tmp_path) == before, "the failed command changed files under tmp_path"
    if inv.registry:
        assert inv.registry() == versions, "a model version was registered"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
