"""Test setup: 8 simulated CPU devices, fast compiles, and a --runslow switch."""

import json
import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,  # set per session below
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """Persistent compilation cache for this module (restored afterwards)."""
    from jax._src import compilation_cache

    path = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    for name, value in _CACHE_OPTIONS.items():
        jax.config.update(name, str(path) if value is None else value)
    compilation_cache.reset_cache()  # the "is the cache used" decision is taken once
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a run gets as far as initialising a train state."""
    from rpg_jax import experiment

    def fail(*args, **kwargs):
        raise AssertionError("train_and_evaluate started training despite a bad config")

    monkeypatch.setattr(experiment, "initial_state", fail)


# ------------------------------------------------------------------ which stack ran the tests

STACK_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                  "tensorflow-datasets", "numpy", "torch")


def stack_versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages that define a stack (None: absent)."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in STACK_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def pytest_report_header(config):
    return "stack: " + ", ".join(f"{k} {v}" for k, v in stack_versions().items() if v)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With RPG_JAX_STACK_REPORT=FILE, writes FILE: this stack's versions and, per test
    module, how many tests passed, failed and were skipped (read by .ci/check_stacks.py)."""
    path = os.environ.get("RPG_JAX_STACK_REPORT")
    if not path:
        return
    modules: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid:
                continue
            counts = modules.setdefault(nodeid.split("::")[0], {})
            counts[outcome] = counts.get(outcome, 0) + 1
    report = {"versions": stack_versions(), "exitstatus": int(exitstatus),
              "runslow": bool(config.getoption("--runslow")), "modules": modules}
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
