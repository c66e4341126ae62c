"""``torch`` imported on first use, so commands that do no tensor math never pay for it.

Modules whose import must stay cheap (the merge-method registry, streaming
I/O, the vector format: ``taskvec --help``, ``taskvec inspect --header`` and
``taskvec lineage`` import them) write ``from taskvec.lazy import torch``:
the name behaves like the module once an attribute is read, and the import
happens then (tests/test_startup.py checks these commands never load it).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)


torch = LazyModule("torch")
