"""Test setup: 8 simulated CPU devices, fast compiles, and a --runslow switch."""

import os

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
