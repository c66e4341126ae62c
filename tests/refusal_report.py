"""Run the refusal suite and print its counts for the README's reliability section.

    .venv/bin/python tests/refusal_report.py          # prints: cases tried N, refused correctly M
    .venv/bin/python tests/refusal_report.py --json   # also writes tests/.refusal-report.json

A case is *tried* when its test ran (xfail-marked cases included); it is
*refused correctly* when every assertion of ``test_refusal`` passed: exit
status 2, exactly one ``error: ...`` line naming the cause, nothing written.
Cases marked xfail (known bugs, reported) count as tried and not refused
correctly, and are listed by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


class _Counter:
    def __init__(self) -> None:
        self.results: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if "test_refusal[" not in report.nodeid:
            return
        case = report.nodeid.split("[", 1)[1].rstrip("]")
        if report.when == "call" or report.outcome != "passed":
            if hasattr(report, "wasxfail"):
                outcome = "xfail" if report.outcome == "skipped" else "xpass"
            else:
                outcome = report.outcome
            if self.results.get(case) in (None, "passed"):
                self.results[case] = outcome


def main(argv: list[str]) -> int:
    counter = _Counter()
    rc = pytest.main([str(HERE / "test_refusals.py"), "-q", "-p", "no:cacheprovider", "-k", "test_refusal"], plugins=[counter])
    tried = len(counter.results)
    ok = sorted(c for c, r in counter.results.items() if r == "passed")
    bad = {c: r for c, r in sorted(counter.results.items()) if r != "passed"}
    print(f"\ncases tried {tried}, refused correctly {len(ok)}")
    for c, r in bad.items():
        print(f"  not refused correctly ({r}): {c}")
    if "--json" in argv:
        (HERE / ".refusal-report.json").write_text(json.dumps({"tried": tried, "refused_correctly": len(ok), "not_refused_correctly": bad}, indent=2) + "\n")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
