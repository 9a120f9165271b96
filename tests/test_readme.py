"""Every Python snippet of the README runs, in order, in one namespace, and prints what the
README says it prints (the comment lines right after a block's last ``print``)."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from rpg_jax.train import train_and_evaluate
from tiny_config import tiny_config

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def expected_output(code: str) -> str | None:
    """The trailing comment lines after the last print(...) of a block, if any."""
    lines = code.rstrip().splitlines()
    tail = []
    while lines and lines[-1].startswith("# "):
        tail.insert(0, lines.pop()[2:])
    if not tail or not lines or not lines[-1].lstrip().startswith("print("):
        return None
    return " ".join(tail)


def test_readme_has_the_snippets_this_test_expects():
    codes = [code for _, code in python_blocks()]
    assert len(codes) >= 6
    assert any("load_checkpoint" in c for c in codes) and any("nnx" in c for c in codes)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    # What the snippets assume exists: a trained workdir and a batch of raw images.
    config = tiny_config(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2)
    train_and_evaluate(config, str(tmp_path / "workdirs" / "fashion_mnist"))
    monkeypatch.chdir(tmp_path)
    namespace = {"images_uint8": np.zeros((2, 32, 32, 3), np.uint8)}
    for line, code in python_blocks():
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README.md snippet at line {line} raised {type(e).__name__}: {e}")
        want = expected_output(code)
        if want is not None:
            assert " ".join(out.getvalue().split()) == " ".join(want.split()), (
                f"README.md snippet at line {line} printed {out.getvalue()!r}")
    assert namespace["logits"].shape == (2, 10)
