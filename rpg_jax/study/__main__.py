"""The command line of the study runner (``rpg_jax.study``):

    python -m rpg_jax.study --study=studies/fashion_mnist.py --workdir=DIR \\
        [--out=results/fashion_mnist] [--only=REGEX] [--report_only] [--list]

Flags are defined in ``rpg_jax.cli``; ``--help`` and flag errors answer before JAX is
imported.
"""

from __future__ import annotations

import sys

from rpg_jax import cli

if __name__ == "__main__":
    cli.check_study_args(sys.argv)  # --help and flag errors answer before JAX is imported

import os
from collections.abc import Sequence

from absl import app, logging

from rpg_jax import train
from rpg_jax.study.runner import list_runs, load_study, run_study, write_report

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped early, rerun the same command to resume


def parse_args(argv: Sequence[str]):
    """Parses the command line (``argv[0]`` is the program name; flags: ``rpg_jax.cli``)."""
    return cli.parse_study_args(argv)


def main(args) -> int:
    """Runs the command line parsed by :func:`parse_args`; returns the exit status."""
    study = load_study(args.study)
    if args.list:
        print(list_runs(study, args.workdir, args.only))
        return 0
    if not args.report_only and not run_study(study, args.workdir, args.only):
        print(f"Study {study.name!r} stopped before all runs finished; run the same command "
              "again to resume (--report_only writes the report of the finished runs).",
              file=sys.stderr)
        return EXIT_STOPPED
    out = args.out or args.workdir
    report = write_report(study, args.workdir, out)
    print(f"Report of {report['finished']}/{report['total']} finished runs: "
          f"{os.path.join(out, 'study.md')}, results.json and "
          f"{len(study.experiments)} plots in {out}")
    return 0


def _cli(args) -> None:
    logging.get_absl_handler().addFilter(train.quiet_library_logs)
    sys.exit(main(args))


if __name__ == "__main__":
    app.run(_cli, flags_parser=parse_args)
