"""Code dependencies of the pipeline steps, derived from what each entry point imports.

A step's code is the project-internal import closure of its entry point
``pipeline.steps.<step>``: every module of the project's packages that it
imports, directly or through another project module, at module level or
inside a function (lazy imports count: they run when the step does). The
closure is computed by reading the sources (``ast``), not by importing them,
so it is cheap and sees imports on every code path. Package ``__init__``
files are included, because importing a submodule runs them.

The same closure feeds both consumers of "what code does this step run":

* the Prefect cache key (:func:`code_hash`, used by ``tasks.common``), so a
  change to any module a step imports invalidates that step's cached result;
* the code ``deps`` of the step's stage in ``dvc.yaml``, which
  ``python -m pipeline.deps --write`` regenerates (other deps — data, upstream
  outputs — are kept as they are) and ``python -m pipeline.deps --check``
  verifies (a test runs the check), so ``dvc status`` sees the same change.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import threading
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: top-level packages of this project (anything else is third-party or stdlib)
PACKAGES = ("taskvec", "pipeline", "tasks", "flows", "benchmarks")
#: the pipeline's steps, in flow order; each has an entry point ``pipeline.steps.<step>``
STEPS = ("finetune", "extract", "compose", "search", "evaluate", "register")
DVC_FILE = "dvc.yaml"


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a project module (package ``__init__.py``, ``.py``, or the ``.c`` of a C extension), or None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py"), base.with_suffix(".c")):
        if candidate.is_file():
            return candidate
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


#: CPython 3.11's ast.parse is not thread-safe ("AST constructor recursion depth mismatch" when two
#: Prefect tasks compute their cache keys at once), so parsing is serialised
_PARSE_LOCK = threading.Lock()


def _imports(path: Path, module: str, root: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (``module`` is its dotted name)."""
    if path.suffix == ".c":  # a C extension (taskvec/_kernels.c) imports no project module
        return set()
    with _PARSE_LOCK:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: name may be a submodule or an attribute of pkg
            names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        for name in names:
            if _module_file(name, root) is not None:
                found.add(name)
    return found


@lru_cache(maxsize=None)
def _closure(entry: str, root: Path, stamp: tuple) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module, root)
        if path is None:
            continue
        seen.add(module)
        todo.extend(_parents(module))
        todo.extend(_imports(path, module, root) - seen)
    files = {_module_file(m, root).relative_to(root).as_posix() for m in seen}
    return tuple(sorted(files))


def _stamp(root: Path) -> tuple:
    """Changes whenever a project source file changes (keys the closure memo)."""
    out = []
    for package in PACKAGES:
        for path in sorted([*(root / package).rglob("*.py"), *(root / package).rglob("*.c")]):
            st = path.stat()
            out.append((path.as_posix(), st.st_mtime_ns, st.st_size, st.st_ctime_ns))
    return tuple(out)


def step_code(step: str, root: Path = ROOT) -> list[str]:
    """Project files (relative POSIX paths, sorted) that the entry point of ``step`` imports."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r} (steps: {', '.join(STEPS)})")
    return list(_closure(f"pipeline.steps.{step}", Path(root), _stamp(Path(root))))


def code_hash(step: str, root: Path = ROOT) -> str:
    """sha256 over the names and bytes of the files :func:`step_code` lists."""
    h = hashlib.sha256()
    for rel in step_code(step, root):
        h.update(rel.encode() + b"\0")
        h.update((Path(root) / rel).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------
# dvc.yaml: the code deps of each stage are generated from step_code


def _is_code_dep(dep: object) -> bool:
    return isinstance(dep, str) and dep.endswith((".py", ".c")) and dep.split("/")[0] in PACKAGES


def _stage_deps(stage) -> list:
    body = stage["do"] if "do" in stage else stage
    return body.setdefault("deps", [])


def dvc_code_deps(dvc_file: Path) -> dict[str, list[str]]:
    """``{stage: [code deps listed in dvc.yaml]}`` for the step stages."""
    from ruamel.yaml import YAML

    doc = YAML(typ="safe").load(dvc_file.read_text())
    return {name: [d for d in _stage_deps(stage) if _is_code_dep(d)] for name, stage in doc.get("stages", {}).items() if name in STEPS}


def sync_dvc(root: Path = ROOT, *, write: bool) -> list[str]:
    """Compare (and with ``write`` rewrite) dvc.yaml's code deps with the derived ones; returns the stages that differ."""
    from ruamel.yaml import YAML

    path = Path(root) / DVC_FILE
    rt = YAML(typ="rt")  # round-trip (safe: builds only plain YAML types); comments and order survive
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(path.read_text())
    stale = []
    for name, stage in doc.get("stages", {}).items():
        if name not in STEPS:
            continue
        deps = _stage_deps(stage)
        wanted = step_code(name, root)
        if [d for d in deps if _is_code_dep(d)] == wanted:
            continue
        stale.append(name)
        others = [d for d in deps if not _is_code_dep(d)]
        deps.clear()
        deps.extend(wanted + others)
    if stale and write:
        import io

        buf = io.StringIO()
        rt.dump(doc, buf)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(buf.getvalue())
        tmp.replace(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Derived code dependencies of the pipeline steps.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps differ from the derived ones")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps from the derived ones")
    args = parser.parse_args(argv)
    if args.check or args.write:
        stale = sync_dvc(ROOT, write=args.write)
        if stale and args.check:
            print(f"error: dvc.yaml code deps are stale for: {', '.join(stale)} (run: python -m pipeline.deps --write)", file=sys.stderr)
            return 1
        print(("rewrote" if args.write else "up to date:") + f" {DVC_FILE}" + (f" ({', '.join(stale)})" if stale else ""))
        return 0
    for step in STEPS:
        print(f"{step}:")
        for rel in step_code(step):
            print(f"  {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
