"""Merge methods, one module each, and the registry every merge-option check goes through.

Each module (:mod:`~taskvec.methods.sum`, :mod:`~taskvec.methods.ties`,
:mod:`~taskvec.methods.dare` — ``dare`` and ``dare_ties`` —,
:mod:`~taskvec.methods.magnitude`) exports its per-tensor math and a
:class:`~taskvec.methods.base.Method` declaring its options. :data:`METHODS`
collects them; :func:`validate` is the one check of a method name and its
options, used by the engine (``taskvec.engine.MergeOptions``), the pipeline's
edit plan (``pipeline.params.EditPlan``) and the paper benchmark
(``benchmarks.paper.experiments.MethodSpec``), so all three refuse the same
things with the same one-line message.

Rules: the method must be known; every option must have its declared type and
range; an option the method does not take must keep its default (mergekit's
conventions: TIES' ``--density`` is the kept fraction in (0, 1], DARE's
``--drop`` is p in [0, 1)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from taskvec.errors import TaskvecError
from taskvec.methods import dare, magnitude, sum, ties  # noqa: A004 - the module named after the method
from taskvec.methods.base import Method, Option, check_lambda

METHODS: dict[str, Method] = {m.name: m for m in (sum.METHOD, ties.METHOD, dare.METHOD, dare.TIES_METHOD, magnitude.METHOD)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

# every option, once, in declaration order (density, drop, seed)
OPTIONS: dict[str, Option] = {o.name: o for m in METHODS.values() for o in m.options}

__all__ = ["METHODS", "METHOD_NAMES", "OPTIONS", "Method", "Option", "check_lambda", "check_method", "get", "methods_taking", "takes", "validate", "merge"]


def check_method(method: object) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise TaskvecError(f"unknown merge method {method!r}: choose one of {', '.join(METHOD_NAMES)}")
    return method


def get(method: object) -> Method:
    return METHODS[check_method(method)]


def methods_taking(option: str) -> tuple[str, ...]:
    """The methods that declare ``option``, in registry order."""
    return tuple(name for name, m in METHODS.items() if option in m.option_names)


def takes(method: str, option: str) -> bool:
    return option in get(method).option_names


def validate(method: object, options: Mapping[str, object]) -> dict[str, float | int]:
    """Check ``method`` and ``options`` (any subset of :data:`OPTIONS`); return every option with defaults filled in.

    Order: the method name, then each option's type and range, then whether
    the method takes it (an option it does not take must equal its default).
    Raises a one-line :class:`TaskvecError`.
    """
    m = get(method)
    for name in options:
        if name not in OPTIONS:
            raise TaskvecError(f"unknown merge option {name!r}: options are {', '.join(OPTIONS)}")
    for name, value in options.items():
        OPTIONS[name].check(value)
    for name, opt in OPTIONS.items():
        if name in options and name not in m.option_names and options[name] != opt.default:
            raise TaskvecError(f"{opt.flag} applies to {' and '.join(methods_taking(name))}, not {m.name}")
    return {name: options.get(name, opt.default) for name, opt in OPTIONS.items()}


def merge(
    method: str,
    taus: Sequence,
    lambdas: Sequence[float],
    *,
    density: float = 1.0,
    drop: float = 0.0,
    seeds: Sequence[int] = (),
):
    """One merged tensor by ``method``: sum | ties | dare | dare_ties | magnitude.

    ``seeds`` (one per vector, for this tensor) are needed by the DARE methods.
    """
    m = get(method)
    given = {"density": density, "drop": drop}
    kwargs = {name: given[name] for name in m.merge_options}
    if m.needs_seeds:
        if len(seeds) != len(taus):
            raise ValueError("DARE needs one seed per vector")
        kwargs["seeds"] = seeds
    return m.merge(taus, lambdas, **kwargs)
