"""What every merge method module declares: its options, and the shared λ check.

A merge method is one module under :mod:`taskvec.methods` (like mergekit's
``merge_methods``) that exports its per-tensor math and a :class:`Method`
naming the :class:`Option` s it takes. Nothing here imports torch at import
time (``taskvec.config`` and the CLI import the registry to build schemas and
``--help``; torch is loaded on first use of the math, see :mod:`taskvec.lazy`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from taskvec.errors import TaskvecError
from taskvec.lazy import torch  # noqa: F401 - the method modules' torch, imported on first use



# float32's largest finite value (== torch.finfo(torch.float32).max), without importing torch
F32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]


def check_lambda(lam: float) -> float:
    """A per-vector weight λ: a finite number within float32's range."""
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam):
        raise TaskvecError(f"lambda must be a finite number, got {lam!r}")
    if abs(lam) > F32_MAX:
        raise TaskvecError(f"lambda {lam!r} is beyond the float32 range")
    return float(lam)


@dataclass(frozen=True)
class Option:
    """One merge option: its name (``--name`` on the CLI, ``name:`` in YAML), type, range and default.

    ``low``/``high`` bound the value (``None`` = unbounded), each end open or
    closed; ``message`` is the one-line refusal (``{value!r}`` is filled in).
    """

    name: str
    type: type
    default: float | int
    help: str
    message: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def range(self) -> str:
        """The admitted range in interval notation, e.g. ``(0, 1]``; ``""`` when unbounded."""
        if self.low is None and self.high is None:
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: object) -> float | int:
        """``value`` if it has this option's type and lies in its range; else a one-line TaskvecError."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.type is float else self.type):
            raise TaskvecError(self.message.format(value=value))
        if self.type is float and not math.isfinite(value):
            raise TaskvecError(self.message.format(value=value))
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise TaskvecError(self.message.format(value=value))
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise TaskvecError(self.message.format(value=value))
        return value


def option(name: str, type: type, default: float | int, *, within: str = "", help: str, message: str) -> Option:
    """Declare an :class:`Option` with its range in interval notation: ``"(0, 1]"``, ``"[0, 1)"``, ``""`` (unbounded)."""
    if not within:
        return Option(name, type, default, help, message)
    low, high = (float(x) for x in within[1:-1].split(","))
    return Option(name, type, default, help, message, low=low, high=high, low_open=within[0] == "(", high_open=within[-1] == ")")


@dataclass(frozen=True)
class Method:
    """A merge method: its name, the options it takes, and its per-tensor merge.

    ``merge(taus, lambdas, **{option: value}, seeds=...)`` merges one tensor
    of every vector; it receives every declared option but ``seed``
    (:attr:`merge_options`): a method taking ``seed`` gets one seed per vector
    and tensor instead, ``seeds``, made by the engine (:attr:`needs_seeds`).
    """

    name: str
    options: tuple[Option, ...]
    merge: Callable
    help: str

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def merge_options(self) -> tuple[str, ...]:
        return tuple(n for n in self.option_names if n != "seed")

    @property
    def needs_seeds(self) -> bool:
        return "seed" in self.option_names
