"""The Fashion-MNIST study at a real budget: 10 epochs per run, 2 seeds, 6 runs.

    python -m rpg_jax.study --study=studies/fashion_mnist_long.py \
        --workdir=results/fashion_mnist_long/runs --out=results/fashion_mnist_long

It revisits the two claims that the 1.5-epoch study (studies/fashion_mnist.py) left "not
held" and said a longer budget would decide: E5 (a deeper RPG network with the same ring is
better) and E6 (RPG converges like the plain network). Every run is configs/fashion_mnist.py
(batch 128, SGD momentum 0.9, lr 0.1 cosine, 0.2 warm-up epochs, weight decay 5e-4, no
augmentation besides the default's) trained for 10 epochs, evaluated and checkpointed every
half epoch (234 steps). Seed ``s`` sets the training seed and the RPG index seed. Ring A
(15,100) is the 1.5-epoch study's budget A minus the RPG network's free parameters.

* e5_depth_long (comparison): RPG ResNet-32 vs RPG ResNet-20, both with ring A. ResNet-32
  rather than the first study's ResNet-56: at 10 epochs two ResNet-56 runs alone would take
  about 7 of the study's 8 hours on the 2-core CPU machine (ResNet-56 trains 2.8x slower
  than ResNet-20, ResNet-32 about 1.6x).
* e6_convergence_long (curves): plain ResNet-20 vs RPG ResNet-20 ring A vs RPG ResNet-32
  ring A, test top-1 every half epoch.
* rpg_vs_plain_long (comparison): RPG ResNet-20 ring A vs the plain ResNet-20 (272,186
  trainable), the cost of 15.6x fewer trainable parameters at 10 epochs.
"""

from __future__ import annotations

from rpg_jax.study import Comparison, Curves, Run, Study
from studies import fashion_mnist as short_study

SEEDS = (0, 1)
EPOCHS = 10.0
# Training images/s on the 2-core CPU machine with the newest JAX (only for --list's
# estimate): the 4-epoch default (RPG ResNet-20) trained at 230 images/s over its whole run
# beside another job (results/fashion_mnist_recipe/baseline/summary.json); ResNet-32 has
# 5/3 of ResNet-20's blocks.
IMAGES_PER_SEC = {("resnet20", 1.0): 230.0, ("resnet32", 1.0): 230.0 * 3 / 5}


def _long(run: Run, model: str | None = None) -> Run:
    c = run.config
    c.num_epochs = EPOCHS
    tags = dict(run.tags)
    name = run.name
    if model is not None:
        c.model = tags["model"] = model
        name = name.replace("rpg_", f"rpg_{model}_")
    return Run(name, c, tags)


def get_study() -> Study:
    ring_a = short_study.budget_rings()["ring_A"]
    runs = []
    for seed in SEEDS:  # one full set per seed, so that seed 0 is complete first
        runs += [_long(short_study.plain(seed)), _long(short_study.rpg(ring_a, seed)),
                 _long(short_study.rpg(ring_a, seed), "resnet32")]
    r20 = {"variant": "rpg", "model": "resnet20", "ring": ring_a}
    r32 = {"variant": "rpg", "model": "resnet32", "ring": ring_a}
    experiments = [
        Comparison("e5_depth_long", f"Depth at the same ring {ring_a:,}, 10 epochs: "
                   "ResNet-32 vs ResNet-20",
                   arms={"ResNet-20": r20, "ResNet-32": r32}, baseline="ResNet-20"),
        Curves("e6_convergence_long", "Convergence over 10 epochs: plain ResNet-20 vs RPG "
               f"ring {ring_a:,}",
               arms={"plain ResNet-20": {"variant": "plain"},
                     f"RPG ResNet-20 ring {ring_a:,}": r20,
                     f"RPG ResNet-32 ring {ring_a:,}": r32}),
        Comparison("rpg_vs_plain_long", "RPG ResNet-20 ring A vs plain ResNet-20, 10 epochs",
                   arms={"plain ResNet-20": {"variant": "plain"},
                         f"RPG ring {ring_a:,}": r20},
                   baseline="plain ResNet-20"),
    ]
    return Study("fashion_mnist_long", runs, experiments,
                 description=__doc__.split("\n\n", 2)[2].split("\n\n")[0],
                 images_per_sec=IMAGES_PER_SEC)
