"""CI's stack check (.ci/check_stacks.py): it fails unless both stacks ran the full suite."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stack_versions

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_stacks", REPO / ".ci" / "check_stacks.py")
check_stacks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_stacks)

MODULES = ["tests/test_a.py", "tests/test_interop.py"]
PINS = {"jax": "0.10.2", "flax": "0.12.8"}


def good_reports() -> tuple[dict, dict]:
    floor = {"exitstatus": 0, "runslow": True,
             "versions": {"python": "3.11.7", "jax": "0.10.2", "flax": "0.12.8",
                          "torch": "2.13.0+cpu"},
             "modules": {m: {"passed": 3} for m in MODULES}}
    newest = {"exitstatus": 0, "runslow": True,
              "versions": {"python": "3.13.0", "jax": "0.12.0.1", "flax": "0.12.12",
                           "torch": None},
              "modules": {"tests/test_a.py": {"passed": 3, "skipped": 1},
                          "tests/test_interop.py": {"skipped": 1}}}
    return floor, newest


def test_both_stacks_green_passes():
    assert check_stacks.check(*good_reports(), PINS, MODULES) == []


@pytest.mark.parametrize("break_it, expected", [
    (lambda f, n: f["versions"].update(python="3.12.1"), "floor: Python 3.12.1, expected 3.11"),
    (lambda f, n: f["versions"].update(jax="0.11.0"), "floor: jax 0.11.0, expected the pinned"),
    (lambda f, n: f["versions"].update(torch=None), "floor: PyTorch is not installed"),
    (lambda f, n: f["modules"].pop("tests/test_interop.py"), "floor: tests/test_interop.py"),
    (lambda f, n: n["versions"].update(python="3.11.7"), "newest: Python 3.11.7, expected"),
    (lambda f, n: n["versions"].update(jax="0.10.2"), "newest: jax 0.10.2 is not newer"),
    (lambda f, n: n.update(runslow=False), "newest: ran without --runslow"),
    (lambda f, n: n.update(exitstatus=1), "newest: pytest exit status 1"),
    (lambda f, n: n["modules"]["tests/test_a.py"].update(failed=2),
     "newest: tests/test_a.py has 2"),
    (lambda f, n: n["modules"].pop("tests/test_a.py"), "newest: tests/test_a.py passed no test"),
])
def test_each_missing_piece_is_reported(break_it, expected):
    floor, newest = copy.deepcopy(good_reports())
    break_it(floor, newest)
    problems = check_stacks.check(floor, newest, PINS, MODULES)
    assert any(p.startswith(expected) for p in problems), problems


def test_main_reads_the_reports_and_the_constraints(tmp_path, monkeypatch, capsys):
    floor, newest = good_reports()
    monkeypatch.chdir(tmp_path)  # as in CI: run from the repository root, --tests=tests
    Path("tests").mkdir()
    for module in MODULES:
        Path(module).write_text("")
    Path("floor.json").write_text(json.dumps(floor))
    Path("pins.txt").write_text("# the floor\njax==0.10.2\n\nflax == 0.12.8  # pinned\n")
    args = ["--floor=floor.json", "--newest=newest.json", "--constraints=pins.txt"]
    assert check_stacks.main(args) == 1  # the newest stack's report is missing
    assert "newest: no stack report at newest.json" in capsys.readouterr().err
    Path("newest.json").write_text(json.dumps(newest))
    assert check_stacks.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "stack floor: flax 0.12.8, jax 0.10.2, python 3.11.7, torch 2.13.0+cpu" in out
    assert "both stacks passed the full suite (2 test modules)" in out
    Path("tests/test_b.py").write_text("")  # a module that neither run ran
    assert check_stacks.main(args) == 1
    assert "floor: tests/test_b.py passed no test (got nothing)" in capsys.readouterr().err


def test_read_pins_rejects_ranges(tmp_path):
    (tmp_path / "pins.txt").write_text("jax>=0.10.2\n")
    with pytest.raises(ValueError, match="expected 'name==version', got 'jax>=0.10.2'"):
        check_stacks.read_pins(tmp_path / "pins.txt")


def test_the_shipped_floor_constraints_are_the_requirements_lower_bounds():
    pins = check_stacks.read_pins(REPO / ".ci" / "floor-constraints.txt")
    lower = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if ">=" in line:
            name, version = line.split(">=")
            lower[name.strip().lower()] = version.strip()
    assert pins.pop("jaxlib") == lower["jax"]
    assert {k: lower[k] for k in pins} == pins


def test_this_run_reports_its_stack():
    versions = stack_versions()
    assert versions["python"].count(".") == 2
    assert versions["jax"] and versions["flax"] and versions["jax"] == versions["jaxlib"]


def test_run_finds_interpreters_by_series():
    """``./run python X.Y`` (used by .ci/run and by ./run's default) finds Python X.Y."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = subprocess.run([str(REPO / "run"), "python", want], capture_output=True, text=True,
                           check=True).stdout.strip()
    version = subprocess.run([found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == want
    missing = subprocess.run([str(REPO / "run"), "python", "2.1"], capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stdout == ""
