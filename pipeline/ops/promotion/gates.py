"""Promotion gates: the ``promotion:`` params section, per-task gate results and the challenger/champion comparison.

Control tasks may not drop more than ``max_control_drop`` accuracy points
against the champion; target tasks must reach their floor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.params import PromotionSpec
from taskvec.errors import TaskvecError


# ---------------------------------------------------------------------------
# Parameters (the ``promotion:`` section of params.yaml)


def load_spec(params_file: str | os.PathLike = "params.yaml") -> PromotionSpec:
    """``promotion:`` from params.yaml (through PipelineParams when it declares it), targets/controls from ``edit``."""
    from pipeline.params import load_section, read_raw

    raw = read_raw(params_file)
    spec = load_section(params_file, "promotion", PromotionSpec, raw)
    edit = raw.get("edit") or {}
    if not spec.targets and isinstance(edit, dict):
        targets = list(edit.get("learn") or []) + [a.get("target") for a in edit.get("analogies") or [] if isinstance(a, dict) and a.get("target")]
        spec.targets = list(dict.fromkeys(targets))
    if not spec.controls and isinstance(edit, dict):
        spec.controls = list(dict.fromkeys(edit.get("control") or []))
    return spec


# ---------------------------------------------------------------------------
# Gates


@dataclass
class GateResult:
    gate: str
    task: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass
class Comparison:
    challenger: dict[str, float]
    champion: dict[str, float] | None
    gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def rows(self, spec: PromotionSpec) -> list[dict]:
        out = []
        for task in sorted(set(self.challenger) | set(self.champion or {})):
            role = "target" if task in spec.targets else "control" if task in spec.controls else "other"
            ch = self.challenger.get(task)
            cp = (self.champion or {}).get(task)
            gates = [g for g in self.gates if g.task == task]
            out.append(
                {
                    "task": task,
                    "role": role,
                    "champion": None if cp is None else round(cp, 6),
                    "challenger": None if ch is None else round(ch, 6),
                    "delta_points": None if ch is None or cp is None else round((ch - cp) * 100, 4),
                    "gates": "; ".join(g.detail for g in gates) or "-",
                    "passed": all(g.passed for g in gates),
                }
            )
        return out

    def record(self) -> dict:
        return {
            "passed": self.passed,
            "challenger": self.challenger,
            "champion": self.champion,
            "gates": [g.__dict__ for g in self.gates],
        }

    def markdown(self, spec: PromotionSpec, title: str) -> str:
        lines = [f"# {title}", "", f"**Gates: {'PASSED' if self.passed else 'FAILED'}**", ""]
        lines += ["| task | role | champion | challenger | Δ points | gate | ok |", "|---|---|---|---|---|---|---|"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for r in self.rows(spec):
            delta = "-" if r["delta_points"] is None else f"{r['delta_points']:+.2f}"
            lines.append(f"| {r['task']} | {r['role']} | {fmt(r['champion'])} | {fmt(r['challenger'])} | {delta} | {r['gates']} | {'✅' if r['passed'] else '❌'} |")
        return "\n".join(lines) + "\n"


def apply_gates(challenger: dict[str, float], champion: dict[str, float] | None, spec: PromotionSpec) -> Comparison:
    """Control tasks may not drop more than ``max_control_drop`` points; targets must reach their floor."""
    cmp = Comparison(dict(challenger), None if champion is None else dict(champion))
    for task in spec.targets:
        floor = spec.target_floors.get(task, spec.default_target_floor)
        acc = challenger.get(task)
        if acc is None:
            cmp.gates.append(GateResult("target_evaluated", task, False, None, None, "target task not evaluated"))
            continue
        if floor is not None:
            ok = acc >= floor
            cmp.gates.append(GateResult("target_floor", task, ok, acc, floor, f"acc {acc:.4f} {'>=' if ok else '<'} floor {floor:.4f}"))
    for task in spec.controls:
        acc = challenger.get(task)
        if acc is None:
            cmp.gates.append(GateResult("control_evaluated", task, False, None, None, "control task not evaluated"))
            continue
        ref = None if champion is None else champion.get(task)
        if ref is None:
            cmp.gates.append(GateResult("control_drop", task, True, None, spec.max_control_drop, "no champion score to compare"))
            continue
        drop = (ref - acc) * 100
        ok = drop <= spec.max_control_drop + 1e-9
        cmp.gates.append(GateResult("control_drop", task, ok, round(drop, 6), spec.max_control_drop, f"drop {drop:.2f} pt {'<=' if ok else '>'} {spec.max_control_drop:g}"))
    for task in sorted(set(spec.target_floors) - set(spec.targets)):
        raise TaskvecError(f"promotion.target_floors names {task!r}, which is not a target task ({', '.join(spec.targets) or 'none'})")
    return cmp


