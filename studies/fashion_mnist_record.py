"""Fashion-MNIST accuracy per trainable parameter: RPG vs plain at <= 30,000 and <= 100,000.

    python -m rpg_jax.study --study=studies/fashion_mnist_record.py \
        --workdir=results/fashion_mnist_record/runs --out=results/fashion_mnist_record

One run per arm, seed 0, with a schedule fixed before any run: configs/fashion_mnist.py
(ResNet-20, batch 128, SGD momentum 0.9, lr 0.1 cosine, 0.2 warm-up epochs, weight decay
5e-4, random crop + flip) trained for 20 epochs, checkpointed every epoch and evaluated on
the test set once, at the end: nothing was tuned and no epoch is picked on the test set.
The RPG ring of a budget is the budget minus the RPG ResNet-20's free parameters (BatchNorm
and the classifier, 2,362), so RPG has exactly the budget; the plain ResNet-20 of a budget
is the widest width multiplier (in steps of 0.01) whose trainable count stays within it.
"""

from __future__ import annotations

from configs import fashion_mnist
from rpg_jax.study import Comparison, Run, Study, param_counts

BUDGETS = {"30k": 30_000, "100k": 100_000}
EPOCHS = 20.0
PLAIN_WIDTHS = {"30k": 0.32, "100k": 0.6}  # 27,095 and 97,163 trainable (0.33: 30,283)
# Training images/s on the 2-core CPU machine, only for --list's estimate: RPG ResNet-20
# trained at 295-318 images/s in results/fashion_mnist_long; the thin plain nets' rates are
# interpolated from the 1.5-epoch study's (width 0.25: 4x, width 0.5: 2.5x width 1's).
IMAGES_PER_SEC = {("resnet20", 1.0): 300.0, ("resnet20", 0.32): 300.0 * 3.5,
                  ("resnet20", 0.6): 300.0 * 2.2}


def _config(variant: str = ""):
    c = fashion_mnist.get_config(variant)
    c.num_epochs = EPOCHS
    c.eval_every_steps = 0  # the test set is seen once, after the last step
    c.checkpoint_every_steps = -1  # once per epoch, for resuming
    return c


def ring_for(budget: int) -> int:
    """The ring that gives the RPG ResNet-20 exactly ``budget`` trainable parameters."""
    c = _config()
    c.rpg.ring_size = 1000
    return budget - param_counts(c)["free"]


def rpg(budget_name: str, seed: int = 0) -> Run:
    ring = ring_for(BUDGETS[budget_name])
    c = _config()
    c.rpg.ring_size = ring
    c.seed = c.rpg.seed = seed
    return Run(f"rpg_{budget_name}_ring{ring}_s{seed}", c,
               {"variant": "rpg", "budget": budget_name, "model": c.model, "width": 1.0,
                "rpg": True, "ring": ring, "seed": seed})


def plain(budget_name: str, seed: int = 0) -> Run:
    width = PLAIN_WIDTHS[budget_name]
    c = _config("plain")
    c.width = width
    c.seed = c.rpg.seed = seed
    trainable = param_counts(c)["trainable"]
    if trainable > BUDGETS[budget_name]:
        raise ValueError(f"plain ResNet-20 width {width} has {trainable:,} trainable "
                         f"parameters, over the {budget_name} budget")
    return Run(f"plain_{budget_name}_w{width:g}_s{seed}", c,
               {"variant": "plain", "budget": budget_name, "model": c.model, "width": width,
                "rpg": False, "seed": seed})


def get_study() -> Study:
    runs = []
    for name in BUDGETS:  # the 30K pair first
        runs += [rpg(name), plain(name)]
    experiments = [
        Comparison(f"record_{name}", f"At most {budget:,} trainable parameters, 20 epochs: "
                   "RPG ResNet-20 vs the plain ResNet-20 of the same budget",
                   arms={"plain": {"variant": "plain", "budget": name},
                         "RPG": {"variant": "rpg", "budget": name}},
                   baseline="plain")
        for name, budget in BUDGETS.items()
    ]
    return Study("fashion_mnist_record", runs, experiments,
                 description=__doc__.split("\n\n", 2)[2].split("\n\n")[0],
                 images_per_sec=IMAGES_PER_SEC)
