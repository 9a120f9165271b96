"""The embedded default: CIFAR-style ResNet-20 with an RPG ring of 10% of its generated
weights, on Fashion-MNIST (Debian's dataset-fashion-mnist). About 21 minutes on 2 CPU cores
(4 epochs at ~193 images/s); 91.2% test top-1.

Variants: ``configs/fashion_mnist.py:plain`` trains the same network without RPG.
"""

from rpg_jax.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.dataset = "fashion_mnist"
    c.model = "resnet20"
    c.batch_size = 128
    c.num_epochs = 4.0
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.2
    c.weight_decay = 5e-4
    c.log_every_steps = 50
    c.rpg.enabled = True
    c.rpg.ring_size = 0.1
    if variant == "plain":
        c.rpg.enabled = False
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of fashion_mnist.py: expected '' or 'plain'")
    return c
