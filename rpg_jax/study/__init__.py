"""A resumable study runner: many training runs, then one report over all of them.

    python -m rpg_jax.study --study=studies/fashion_mnist.py --workdir=DIR \\
        [--out=results/fashion_mnist] [--only=REGEX] [--report_only] [--list]

A study file defines ``get_study()`` returning a :class:`Study`: named runs (a config and
tags each) and the experiments of the report, which select runs by their tags. Runs train in
order into ``DIR/<run name>`` with ``train_and_evaluate``; a run whose ``summary.json`` says
it finished is skipped, an interrupted one resumes from its checkpoints. SIGTERM or Ctrl-C
saves the running run and stops the study; the same command resumes it. The report
(``results.json``, ``study.md``, one PNG per experiment, in ``--out``, default DIR) is
written after running, or alone with ``--report_only``; every number in it is read from the
runs' ``summary.json`` and ``metrics.jsonl``, and runs not finished yet are listed as missing.

The package: ``report`` (runs, studies and the report kinds with their statistics; no I/O,
no JAX), ``runner`` (costs, training, collecting and writing the report) and ``__main__``
(the command line). The runner's names are imported on first use (PEP 562), so
``python -m rpg_jax.study --help`` answers before JAX is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rpg_jax.study.report import (
    SPREAD,
    Comparison,
    Curves,
    Run,
    Scaling,
    Study,
    Where,
    fit_log_linear,
    select_runs,
)

# rpg_jax.study.runner's public names, imported on first use
_RUNNER = {"collect", "is_finished", "list_runs", "load_study", "param_counts", "plan",
           "run_study", "write_report"}

__all__ = [
    "SPREAD", "Comparison", "Curves", "Run", "Scaling", "Study", "Where", "collect",
    "fit_log_linear", "is_finished", "list_runs", "load_study", "param_counts", "plan",
    "run_study", "select_runs", "write_report",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from rpg_jax.study.runner import (
        collect,
        is_finished,
        list_runs,
        load_study,
        param_counts,
        plan,
        run_study,
        write_report,
    )


def __getattr__(name: str) -> Any:
    if name not in _RUNNER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.runner"), name)
    globals()[name] = value
    return value
