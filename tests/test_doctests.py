"""The Examples in the public functions' docstrings run and print what they say."""

import doctest

import pytest

from rpg_jax import generator, spec

DOCUMENTED = [(spec, "make_spec"), (generator, "init_bank"), (generator, "generate_params")]


@pytest.mark.parametrize(("module", "name"), DOCUMENTED, ids=[n for _, n in DOCUMENTED])
def test_docstring_examples(module, name):
    [test] = doctest.DocTestFinder().find(getattr(module, name), name, module=module, globs={})
    assert len(test.examples) >= 5, f"{name} has {len(test.examples)} examples"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0, "".join(failures)
