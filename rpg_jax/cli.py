"""The command lines of ``python -m rpg_jax.compress`` and ``python -m rpg_jax.study``.

Their flags are defined and checked here, in a module that imports neither JAX nor Flax
(absl and NumPy only), so ``--help`` and flag errors answer in well under a second: each
command's module parses its arguments with this module before its own heavy imports run.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from absl import app
from absl.flags import argparse_flags

from rpg_jax.quantize import QUANT_BITS

COMPRESS_DESCRIPTION = """\
Post-training compression of a run's checkpoint: magnitude pruning and symmetric
quantisation of its rings (RPG) or of the conv kernels RPG would generate (plain run),
optionally fine-tuned in between. Evaluates the model before and after on the eval split and
prints a JSON report (accuracy, non-zeros, stored bytes); --out writes the compressed RPG
model file (load it with rpg_jax.load_export)."""

STUDY_DESCRIPTION = "Runs a study of training runs (resumable), then writes its report."


def compress_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m rpg_jax.compress``."""
    parser = argparse.ArgumentParser(prog="python -m rpg_jax.compress",
                                     description=COMPRESS_DESCRIPTION)
    parser.add_argument("--workdir", required=True,
                        help="the run's directory (its checkpoints/ are read, never written)")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint step to compress (default: the latest)")
    parser.add_argument("--prune", type=float, default=0.0,
                        help="fraction in [0, 1) of the compressed entries set to zero, by one "
                             "global magnitude threshold (default: 0, no pruning)")
    parser.add_argument("--bits", type=int, default=32, choices=QUANT_BITS,
                        help="bits per kept entry: 8 or 4 (symmetric integer codes with "
                             "float32 scales) or 32 (float32, pruning only; the default)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="entries per quantisation scale (default: one scale per array)")
    parser.add_argument("--finetune_steps", type=int, default=0,
                        help="training steps of the run's optimizer after pruning, pruned "
                             "entries held at zero, before quantising (default: 0)")
    parser.add_argument("--finetune_lr", type=float, default=0.01,
                        help="constant learning rate of those steps (default: 0.01)")
    parser.add_argument("--out", default=None,
                        help="write the compressed RPG model file here (RPG runs only)")
    return parser


def parse_compress_args(argv: Sequence[str] | None = None
                        ) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, args) of the compress command line (``argv`` without the program name;
    None: ``sys.argv[1:]``); exits with a usage error for a flag that is wrong on its own,
    before any checkpoint is read."""
    parser = compress_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.prune < 1:
        parser.error(f"--prune={args.prune}: expected a fraction in [0, 1)")
    if args.chunk is not None and args.chunk < 1:
        parser.error(f"--chunk={args.chunk}: expected a positive number of entries")
    if args.finetune_steps < 0:
        parser.error(f"--finetune_steps={args.finetune_steps}: expected >= 0")
    if not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):
        parser.error(f"--finetune_lr={args.finetune_lr}: expected a positive finite number")
    if args.out:
        if os.path.isdir(args.out):
            parser.error(f"--out={args.out!r} is a directory; expected a file path")
        existing = os.path.dirname(os.path.abspath(args.out))
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK):
            parser.error(f"--out={args.out!r}: cannot write in {existing!r}")
    return parser, args


def study_parser() -> argparse_flags.ArgumentParser:
    """The parser of ``python -m rpg_jax.study`` (absl flags such as ``--verbosity`` too)."""
    parser = argparse_flags.ArgumentParser(prog="python -m rpg_jax.study",
                                           description=STUDY_DESCRIPTION)
    parser.add_argument("--study", required=True, help="study file defining get_study()")
    parser.add_argument("--workdir", required=True, help="runs train into WORKDIR/<run name>")
    parser.add_argument("--out", default=None, help="report directory (default: WORKDIR)")
    parser.add_argument("--only", default=None, help="train only runs whose name matches")
    parser.add_argument("--report_only", action="store_true", help="write the report only")
    parser.add_argument("--list", action="store_true",
                        help="list runs, parameter counts, status and estimated cost")
    return parser


def parse_study_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses the study command line (``argv[0]`` is the program name)."""
    return study_parser().parse_args(list(argv[1:]))


def check_study_args(argv: Sequence[str]) -> None:
    """Answers ``--help`` and errors in the study's own flags before the heavy imports.

    The absl flags of libraries imported later (grain's, for instance) are not defined yet:
    they are left for the full parse, as is ``--helpfull``, which lists them.
    """
    if any(a == "--helpfull" or a.startswith("--helpfull=") for a in argv[1:]):
        return
    app.define_help_flags()  # as app.run does before parsing (--only_check_args, ...)
    study_parser().parse_known_args(list(argv[1:]))
