"""CIFAR-10/100 recipes, chosen by a variant: ``--config=configs/cifar.py:DATASET,MODEL,KIND``.

DATASET is cifar10 or cifar100, MODEL resnet20, resnet56 or cifar_resnet18, KIND rpg or
plain; e.g. ``configs/cifar.py:cifar10,resnet56,rpg``. Recipe: SGD momentum 0.9, weight
decay 5e-4, batch 128, lr 0.1 with cosine decay over 200 epochs, pad-4 crop + flip. RPG
runs use one global ring of 10% of the generated weights (override with
``--config.rpg.ring_size``). Needs CIFAR prepared as array_record (see the README).
"""

from rpg_jax.config import base_config

DATASETS = ("cifar10", "cifar100")
MODELS = ("resnet20", "resnet56", "cifar_resnet18")
KINDS = ("rpg", "plain")


def get_config(variant: str = "cifar10,resnet20,rpg"):
    parts = variant.split(",")
    if (len(parts) != 3 or parts[0] not in DATASETS or parts[1] not in MODELS
            or parts[2] not in KINDS):
        raise ValueError(f"configs/cifar.py:{variant}: expected DATASET,MODEL,KIND with DATASET "
                         f"in {DATASETS}, MODEL in {MODELS}, KIND in {KINDS}")
    dataset, model, kind = parts
    c = base_config()
    c.dataset = dataset
    c.model = model
    c.batch_size = 128
    c.num_epochs = 200.0
    c.learning_rate = 0.1
    c.lr_schedule = "cosine"
    c.weight_decay = 5e-4
    c.log_every_steps = 100
    c.worker_count = 2
    c.rpg.enabled = kind == "rpg"
    c.rpg.ring_size = 0.1
    return c
