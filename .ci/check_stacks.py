"""Fails unless the test suite really ran on both supported stacks.

    python3 .ci/check_stacks.py --floor=FLOOR.json --newest=NEWEST.json \
        --constraints=.ci/floor-constraints.txt [--tests=tests]

Each JSON file is what tests/conftest.py writes with RPG_JAX_STACK_REPORT set. The floor must
be Python 3.11 with exactly the pinned lower bounds and PyTorch (the importer tests); the
newest must be Python >= 3.12 with a newer JAX than the floor. On both, the run must have
passed (--runslow included), with at least one passed test in every test module (the importer
module may be all skipped on the newest stack, which has no PyTorch).
Standard library only: it runs with whatever python3 CI has.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OPTIONAL_ON_NEWEST = {"tests/test_interop.py"}  # needs PyTorch, kept off the newest stack


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a pip constraints file (comments and blanks ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
        if not match:
            raise ValueError(f"{path}: expected 'name==version', got {line!r}")
        pins[match[1].lower()] = match[2]
    return pins


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def check_run(name: str, report: dict, modules: list[str], optional: set[str]) -> list[str]:
    """Problems with one stack's run: failures, slow tests left out, modules that ran nothing."""
    problems = []
    if report.get("exitstatus") != 0:
        problems.append(f"{name}: pytest exit status {report.get('exitstatus')}, expected 0")
    if not report.get("runslow"):
        problems.append(f"{name}: ran without --runslow")
    ran = report.get("modules", {})
    for module in modules:
        counts = ran.get(module, {})
        bad = counts.get("failed", 0) + counts.get("error", 0)
        if bad:
            problems.append(f"{name}: {module} has {bad} failed or erroring tests")
        if counts.get("passed", 0) == 0 and module not in optional:
            problems.append(f"{name}: {module} passed no test (got {counts or 'nothing'})")
    return problems


def check(floor: dict, newest: dict, pins: dict[str, str], modules: list[str]) -> list[str]:
    """Every reason the two reports do not show both stacks tested; empty when they do."""
    problems = []
    fv, nv = floor.get("versions", {}), newest.get("versions", {})
    if not str(fv.get("python", "")).startswith("3.11."):
        problems.append(f"floor: Python {fv.get('python')}, expected 3.11")
    for package, version in pins.items():
        if fv.get(package) != version:
            problems.append(f"floor: {package} {fv.get(package)}, expected the pinned {version}")
    if not fv.get("torch"):
        problems.append("floor: PyTorch is not installed, so the importer tests did not run")
    if _version_tuple(str(nv.get("python", "0")))[:2] < (3, 12):
        problems.append(f"newest: Python {nv.get('python')}, expected 3.12 or newer")
    if not nv.get("jax") or not fv.get("jax") or (
            _version_tuple(nv["jax"]) <= _version_tuple(fv["jax"])):
        problems.append(f"newest: jax {nv.get('jax')} is not newer than the floor's "
                        f"{fv.get('jax')}")
    problems += check_run("floor", floor, modules, set())
    problems += check_run("newest", newest, modules, OPTIONAL_ON_NEWEST)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor", type=Path, required=True)
    parser.add_argument("--newest", type=Path, required=True)
    parser.add_argument("--constraints", type=Path, required=True)
    parser.add_argument("--tests", type=Path, default=Path("tests"))
    args = parser.parse_args(argv)
    modules = sorted(p.as_posix() for p in args.tests.glob("test_*.py"))
    if not modules:
        print(f"no test_*.py files in {args.tests}", file=sys.stderr)
        return 1
    reports = {}
    for name in ("floor", "newest"):
        path = getattr(args, name)
        if not path.is_file():
            print(f"{name}: no stack report at {path} (did that test run happen?)",
                  file=sys.stderr)
            return 1
        reports[name] = json.loads(path.read_text())
    problems = check(reports["floor"], reports["newest"], read_pins(args.constraints), modules)
    for name, report in reports.items():
        versions = ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items()) if v)
        print(f"stack {name}: {versions}")
    for problem in problems:
        print(f"stack check: {problem}", file=sys.stderr)
    if not problems:
        print(f"stack check: both stacks passed the full suite ({len(modules)} test modules)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
