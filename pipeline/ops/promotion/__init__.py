"""Audited promotion, split by concern; this package re-exports the public names.

* :mod:`~pipeline.ops.promotion.gates` — the ``promotion:`` params section
  (:func:`load_spec`), :class:`GateResult`, :class:`Comparison`, :func:`apply_gates`;
* :mod:`~pipeline.ops.promotion.evaluator` — :func:`load_evaluator`,
  :func:`default_evaluator` (named ``pipeline.ops.promotion:default_evaluator``
  in params);
* :mod:`~pipeline.ops.promotion.protocol` — :class:`Ops`, :func:`audited_append`,
  :func:`record_gates`, :func:`record_decision`, :func:`move_alias`,
  :func:`promote`, :func:`revert_champion`, :func:`verify`.

Registry access (client, versions, aliases, downloads) is
:mod:`pipeline.ops.registry`; its names are re-exported here for callers of
the former single module.
"""

from pipeline.ops.promotion.evaluator import Evaluator, default_evaluator, load_evaluator
from pipeline.ops.promotion.gates import Comparison, GateResult, apply_gates, load_spec
from pipeline.ops.promotion.protocol import (
    ANCHOR_TAG,
    DECISIONS,
    MOVES,
    Move,
    Ops,
    actor,
    anchors,
    artifact_key,
    audited_append,
    check_promotable,
    is_move,
    move_alias,
    previous_champion,
    promote,
    record_decision,
    record_gates,
    rejection,
    revert_champion,
    verify,
)
from pipeline.ops.registry import LEDGER_TAG, alias_version, download_version, get_version, ledger_of, mlflow_client, model_folder
from pipeline.params import CHAMPION, PromotionSpec

__all__ = [
    "ANCHOR_TAG", "CHAMPION", "DECISIONS", "LEDGER_TAG", "MOVES",
    "Comparison", "Evaluator", "GateResult", "Move", "Ops", "PromotionSpec",
    "actor", "alias_version", "anchors", "apply_gates", "artifact_key", "audited_append", "check_promotable",
    "default_evaluator", "download_version", "get_version", "is_move", "ledger_of", "load_evaluator",
    "load_spec", "mlflow_client", "model_folder", "move_alias", "previous_champion", "promote",
    "record_decision", "record_gates", "rejection", "revert_champion", "verify",
]
