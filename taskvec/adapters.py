"""PEFT LoRA adapters as task vectors.

``taskvec extract BASE ADAPTER_DIR -o tau.safetensors`` accepts a PEFT adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors``) as the
fine-tuned side. For each adapted module the task vector is what peft's
``merge_and_unload`` adds to the base weight::

    τ = scaling · B·A        (transposed when fan_in_fan_out, and for embeddings)
    scaling = α / r          (α / √r with use_rslora)

with ``r`` and ``α`` taken per module from ``rank_pattern`` / ``alpha_pattern``
(peft's rule: the first pattern ``p`` with ``re.match(r"(.*\\.)?(p)$", module)``),
else ``r`` / ``lora_alpha``. The values are written under the base's tensor
names (``<module>.weight``; a leading prefix of the module path that the
base's names lack — ``bert.`` of a task model over a headless base — is
dropped), every other selected floating tensor of the base gets τ = 0, so the
vector is homologous with one extracted from a full fine-tuned model and the
rest of the pipeline (combine, apply, merge, search…) works unchanged.

``--low-rank`` stores the factors instead (``NAME::lora_A``, ``NAME::lora_B``,
scaling and transpose in the ``taskvec.storage`` record, kind ``lowrank``), so
an adapter-sized vector stays adapter-sized; :class:`taskvec.vector.VectorFile`
densifies each tensor on read with :func:`delta`, giving the dense file's bits.

Refused with one line: non-LoRA PEFT types, DoRA, trained biases
(``bias`` ≠ none, ``lora_bias``), ``modules_to_save`` weights,
``layer_replication``, ``target_parameters``, trainable tokens, and
convolution adapters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from taskvec.errors import HomologyError, TaskvecError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except ValueError:
        raise TaskvecError(f"{path}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise TaskvecError(f"{path}: not a PEFT adapter config")
    where = f"adapter {adapter_dir}"
    if cfg.get("peft_type") != "LORA":
        raise TaskvecError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA adapters become task vectors)")
    refusals = [
        (cfg.get("use_dora"), "DoRA (use_dora) is not supported: its update is not a low-rank delta"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r} is not supported (trained biases are not in B·A); use bias='none'"),
        (cfg.get("lora_bias"), "lora_bias is not supported"),
        (cfg.get("modules_to_save"), f"modules_to_save {cfg.get('modules_to_save')} is not supported (fully trained modules are not in B·A)"),
        (cfg.get("layer_replication"), "layer_replication is not supported"),
        (cfg.get("target_parameters"), "target_parameters is not supported"),
        (cfg.get("trainable_token_indices"), "trainable_token_indices is not supported"),
    ]
    for bad, message in refusals:
        if bad:
            raise TaskvecError(f"{where}: {message}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise TaskvecError(f"{where}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _read_weights(adapter_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, pt = adapter_dir / WEIGHTS[0], adapter_dir / WEIGHTS[1]
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(st)
    if pt.is_file():
        if not allow_pickle:
            raise TaskvecError(f"adapter {adapter_dir}: only {WEIGHTS[1]} (pickle) found; pass --allow-pickle to load it with weights_only=True")
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise TaskvecError(f"adapter {adapter_dir}: no {WEIGHTS[0]} next to {CONFIG}")


def lora_deltas(adapter_dir: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]]:
    """(config, {module path: (A, B, scaling, transpose)}) of a LoRA adapter folder; A and B in float32."""
    adapter_dir = Path(adapter_dir)
    cfg = load_config(adapter_dir)
    where = f"adapter {adapter_dir}"
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    for key, value in _read_weights(adapter_dir, allow_pickle).items():
        m = _LORA_KEY.match(key)
        if not m:
            raise TaskvecError(f"{where}: tensor {key!r} is not a LoRA factor (only lora_A/lora_B weights are supported)")
        module = m.group("module") or m.group("emodule")
        kind = (m.group("kind") or m.group("ekind")).replace("embedding_", "")
        if m.group("emodule"):
            embedding.add(module)
        parts.setdefault(module.removeprefix(PREFIX), {})[kind] = value
    if not parts:
        raise TaskvecError(f"{where}: no LoRA weights in the adapter")
    out = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise TaskvecError(f"{where}: module {module!r} has {sorted(ab)} but needs both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2:
            raise TaskvecError(f"{where}: module {module!r} has {a.dim()}-d LoRA factors; only linear and embedding adapters are supported")
        is_emb = PREFIX + module in embedding or module in embedding
        r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        r = a.shape[0]
        if b.shape[1] != r or r != r_cfg:
            raise TaskvecError(f"{where}: module {module!r} has factors {list(b.shape)}·{list(a.shape)} but rank {r_cfg} in the config")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        transpose = is_emb or bool(cfg.get("fan_in_fan_out"))
        out[module] = (a.to(torch.float32), b.to(torch.float32), scaling, transpose)
    return cfg, out


def delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    """peft's merge delta: ``(B @ A)ᵀ? · scaling`` in float32."""
    w = b @ a
    return (w.T if transpose else w) * scaling


def read_lowrank(src, name: str, shape: Sequence[int], factor: dict | None) -> torch.Tensor:
    """Densify one tensor of a low-rank vector (zeros where the adapter has no factors)."""
    if factor is None:
        return torch.zeros(tuple(shape), dtype=torch.float32)
    a = src.read_float32(f"{name}::lora_A")
    b = src.read_float32(f"{name}::lora_B")
    return delta(a, b, float(factor["scaling"]), bool(factor["transpose"]))


def base_name(module: str, names: Sequence[str] | set[str]) -> str | None:
    """The base tensor ``<module>.weight``, dropping leading module-path components the base lacks."""
    parts = module.split(".")
    for i in range(len(parts)):
        cand = ".".join(parts[i:]) + ".weight"
        if cand in names:
            return cand
    return None


class AdapterSide:
    """A LoRA adapter as the fine-tuned side of :func:`taskvec.engine.extract`.

    τ of each adapted base tensor is :func:`delta` (computed once per tensor,
    served in chunks); every other selected tensor gets τ = 0. ``low_rank``
    output keeps the factors instead (:meth:`write_lowrank`).
    """

    def __init__(self, adapter_dir: str | os.PathLike, allow_pickle: bool):
        from taskvec.io import file_sha256

        self.dir = Path(adapter_dir)
        self.inputs = [self.dir]
        self.cfg, self.factors = lora_deltas(adapter_dir, allow_pickle=allow_pickle)
        # identity: the adapter's content (config and weights), never where it lives
        files = sorted(f for f in self.dir.iterdir() if f.is_file() and f.name.startswith("adapter_"))
        self.hash = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()
        self.targets: dict[str, tuple] = {}
        self._current: tuple[str, torch.Tensor] | None = None

    def select(self, b, base: str, include: Sequence[str], exclude: Sequence[str]) -> list[str]:
        from taskvec.engine import _float_names, select_names

        floats = _float_names(b)
        selected = select_names(floats, include, exclude)
        if not selected:
            raise TaskvecError("empty task vector: no floating tensors left after --include/--exclude")
        for module, f in self.factors.items():
            name = base_name(module, set(floats))
            if name is None:
                raise HomologyError(f"adapter module {module!r} has no '<module>.weight' tensor in the base {base}")
            shape = tuple(b.info(name).shape)
            a, bb, _, transpose = f
            got = (a.shape[1], bb.shape[0]) if transpose else (bb.shape[0], a.shape[1])
            if got != shape:
                raise HomologyError(f"adapter module {module!r} gives a {list(got)} update but {name!r} is {list(shape)} in the base")
            if name not in selected:
                raise TaskvecError(f"tensor {name!r} is adapted by the LoRA adapter but left out by --include/--exclude")
            self.targets[name] = f
        return selected

    def recipe(self) -> dict:
        keys = ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
        return {"finetuned_hash": self.hash, "adapter": {k: self.cfg.get(k) for k in keys} | {"modules": sorted(self.targets)}}

    def tau_into(self, name: str, start: int, stop: int, base32: torch.Tensor, out: torch.Tensor, scratch) -> None:
        if name not in self.targets:
            out.zero_()
            return
        if self._current is None or self._current[0] != name:
            self._current = None
            self._current = (name, delta(*self.targets[name]).reshape(-1))
        out.copy_(self._current[1][start:stop])

    def causes(self, name: str):
        return []

    def advise(self, name: str) -> None:
        pass

    def close(self) -> None:
        self._current = None

    def write_lowrank(self, b, out, header, selected: Sequence[str]):
        """The vector as factors (``NAME::lora_A``, ``NAME::lora_B``), adapter-sized."""
        from taskvec.engine import VectorResult
        from taskvec.io import StreamingWriter, TensorSpec, atomic_path

        targets = self.targets
        base_hash = b.content_hash()
        header.base_hash = base_hash
        header.storage = {
            "kind": "lowrank",
            "shapes": {n: list(b.info(n).shape) for n in selected},
            "factors": {n: {"scaling": f[2], "transpose": f[3]} for n, f in sorted(targets.items())},
        }
        data = []
        for name, (a, bb, _, _) in sorted(targets.items()):
            data += [(f"{name}::lora_A", a.to(header.dtype)), (f"{name}::lora_B", bb.to(header.dtype))]
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in data]
        param_count = sum(math.prod(b.info(n).shape) for n in selected)
        with atomic_path(out) as tmp:
            with StreamingWriter(tmp, specs, header.metadata(list(selected), param_count), hash_file=True) as w:
                for name, t in data:
                    w.write(name, t)
        return VectorResult(Path(out), w.sha256, param_count, len(selected), base_hash)
