"""The tiny training config shared by test_train.py and test_checkpoints.py (same runs,
so their compilations are shared through the persistent cache)."""

import ml_collections

from rpg_jax import config as config_lib


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """ResNet-20 x0.25 on 256 synthetic CIFAR images, 8 steps of batch 16 (16 per epoch).

    Overrides use dotted names: ``tiny_config(**{"rpg.enabled": False})``.
    """
    c = config_lib.base_config()
    c.dataset = "synthetic_cifar"
    c.synthetic_size = 256
    c.model = "resnet20"
    c.width = 0.25
    c.batch_size = 16
    c.num_train_steps = 8
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 4
    c.keep_checkpoints = 2
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c
