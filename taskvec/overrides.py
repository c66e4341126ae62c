"""``-S key.path=value``: one override mechanism for params, as ``dvc exp run -S``.

``taskvec run -S train.steps=4 -S search.strategy=grid`` and the core commands
(``taskvec finetune/evaluate/search -S …``) apply each override to the raw
params mapping *before* schema validation, so an unknown key or a wrong type
is refused exactly like a typo in ``params.yaml`` (one line naming the key).
The value is parsed as a YAML scalar/flow value (``4`` → int, ``1e-3`` → float,
``[a, b]`` → list, ``null`` → None, ``grid`` → str). The params file itself
is never modified.

There is deliberately no environment form: an override that the DVC stages
picked up silently would let ``dvc.lock`` claim that ``params.yaml`` produced
outputs it did not. ``taskvec run -S`` records the effective params instead
(see ``pipeline/cli/run.py``).
"""

from __future__ import annotations

import copy
import re

import yaml

from taskvec.errors import TaskvecError

#: exponent floats without a dot (``1e-3``), which YAML 1.1 (PyYAML) reads as strings
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse(item: str) -> tuple[list[str], object]:
    """``"a.b.c=value"`` → (["a", "b", "c"], parsed value); one-line error when malformed."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise TaskvecError(f"bad override {item!r}: expected KEY.PATH=VALUE (e.g. train.steps=4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(raw.strip()):
            value = float(value)
    except yaml.YAMLError as exc:
        raise TaskvecError(f"bad override {item!r}: value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...] | None) -> dict:
    """A copy of ``data`` with every ``a.b.c=value`` set (intermediate mappings created as needed).

    Unknown keys are *not* checked here: the result goes through the params
    schema, which refuses them (``extra="forbid"``). A path through a value
    that is not a mapping (``train.steps.x=1``) is refused here.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TaskvecError(f"cannot apply overrides: params must be a mapping, got {type(data).__name__}")
    out = copy.deepcopy(data)
    for item in overrides or ():
        parts, value = parse(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise TaskvecError(f"bad override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out

