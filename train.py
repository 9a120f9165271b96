"""Trains an RPG (or plain) ResNet: python train.py --config=configs/NAME.py --workdir=DIR.

Config fields can be overridden on the command line, e.g. ``--config.batch_size=256
--config.rpg.ring_size=0.05``; see ``rpg_jax/config.py`` for every field.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

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
