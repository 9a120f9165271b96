"""Trains an RPG (or plain) ResNet: python train.py --config=configs/NAME.py --workdir=DIR.

Config fields can be overridden on the command line, e.g. ``--config.batch_size=256
--config.rpg.ring_size=0.05``; every field is listed below (defaults of ``base_config()``,
which the config files change), as ``rpg_jax/config.py`` describes them.
"""

import importlib.util
import json
import os
import textwrap

from absl import app, flags, logging
from ml_collections import config_flags


def fields_help() -> str:
    """Every config field with its default and description, for ``--help``.

    Reads ``rpg_jax/config.py`` next to this file as a standalone module, so ``--help``
    imports neither the rpg_jax package nor JAX.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rpg_jax", "config.py")
    if os.path.exists(path):
        spec = importlib.util.spec_from_file_location("_rpg_jax_config_for_help", path)
        config_lib = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config_lib)
    else:  # an installed package without the source tree
        from rpg_jax import config as config_lib
    lines = ["Config fields (--config.FIELD=VALUE), with their base_config() defaults:"]
    for name, default, description in config_lib.describe_fields():
        lines.append(f"  {name}={default!r}")
        lines.append(textwrap.fill(description, 96, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))
    return "\n".join(lines).replace("%", "%%")  # absl %-formats the usage text


__doc__ += "\n" + fields_help() + "\n"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() first "
                               "(overrides config.multihost).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    multihost = config.multihost if _MULTIHOST.value is None else _MULTIHOST.value
    import jax  # imported after flag parsing so --jax_* flags and env vars apply

    if multihost:
        jax.distributed.initialize()
    from rpg_jax.train import quiet_library_logs, train_and_evaluate

    logging.get_absl_handler().addFilter(quiet_library_logs)
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.default_backend())
    summary = train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
