"""The Fashion-MNIST RPG study: ResNet-20 (and -56), 1.5 epochs per run, 26 runs.

    python -m rpg_jax.study --study=studies/fashion_mnist.py --workdir=results/fashion_mnist/runs \
        --out=results/fashion_mnist

Every run is ``configs/fashion_mnist.py`` (ResNet-20, batch 128, SGD momentum 0.9, lr 0.1
cosine, 0.2 warmup epochs, weight decay 5e-4) trained for 1.5 epochs, evaluated and
checkpointed every half epoch (234 of the 468 steps per epoch). Seed ``s`` sets both the
training seed and the RPG index seed. Budgets: A and B are the trainable parameters of a
plain ResNet-20 at width 0.25 and 0.5; the ring matching a budget is the budget minus the
RPG network's free (non-generated) parameters, so RPG at that ring has exactly the budget.

* e1_dof_sweep (scaling): RPG rings 1000, 3000, 7000, A, B, 135000 (A and B with 2 seeds);
  the plain ResNet-20 and the thin plain nets drawn as references.
* e2a/e2b (comparison): RPG vs the thinner plain net of the same budget (A, B).
* e3_sharing_ablation (comparison): permutation + signs vs naive / permutation only /
  signs only, at ring A.
* e4_ring_groups (comparison): one global ring vs one ring per stage / per layer, at the same
  total ring A.
* e5_depth (comparison): ResNet-56 vs ResNet-20 with the same ring A.
* e6_convergence (curves): plain vs RPG ring A vs RPG ring B, test top-1 per half epoch.
"""

from __future__ import annotations

from configs import fashion_mnist
from rpg_jax.study import Comparison, Curves, Run, Scaling, Study, param_counts

SEEDS = (0, 1)
SWEEP_RINGS = (1000, 3000, 7000, 135000)  # besides ring_A and ring_B
RPG_VARIANTS = {  # variant -> (model, rpg.mode, rpg.groups)
    "rpg": ("resnet20", "rpg", "global"),
    "naive": ("resnet20", "naive", "global"),
    "perm_only": ("resnet20", "perm_only", "global"),
    "sign_only": ("resnet20", "sign_only", "global"),
    "stage": ("resnet20", "rpg", "stage"),
    "layer": ("resnet20", "rpg", "layer"),
    "resnet56": ("resnet56", "rpg", "global"),
}
# Training images/s on the 2-core CPU machine (only for the cost estimate of --list):
# ResNet-20 ~190 (RPG and plain alike), ResNet-56 ~2.8x slower; the thin plain nets ran
# 2.5x (width 0.5) and 4x (width 0.25) faster than width 1 measured side by side.
IMAGES_PER_SEC = {
    ("resnet20", 1.0): 190.0,
    ("resnet20", 0.5): 190.0 * 2.5,
    ("resnet20", 0.25): 190.0 * 4.0,
    ("resnet56", 1.0): 190.0 / 2.8,
}


def base_config():
    c = fashion_mnist.get_config()
    c.num_epochs = 1.5
    c.eval_every_steps = 234  # half an epoch: 60000 // 128 = 468 steps per epoch
    c.checkpoint_every_steps = 234
    return c


def plain(seed: int, width: float = 1.0) -> Run:
    c = base_config()
    c.rpg.enabled = False
    c.width = width
    c.seed = c.rpg.seed = seed
    variant = "plain" if width == 1.0 else "thin"
    name = f"plain_s{seed}" if width == 1.0 else f"thin_w{width:g}_s{seed}"
    return Run(name, c, {"variant": variant, "model": c.model, "width": width, "rpg": False,
                         "seed": seed})


def rpg(ring: int, seed: int, variant: str = "rpg") -> Run:
    model, mode, groups = RPG_VARIANTS[variant]
    c = base_config()
    c.model = model
    c.rpg.enabled = True
    c.rpg.ring_size = ring
    c.rpg.mode = mode
    c.rpg.groups = groups
    c.seed = c.rpg.seed = seed
    return Run(f"{variant}_ring{ring}_s{seed}", c,
               {"variant": variant, "model": model, "width": 1.0, "rpg": True, "ring": ring,
                "mode": mode, "groups": groups, "seed": seed})


def budget_rings() -> dict[str, int]:
    """Budgets A, B (plain ResNet-20 at width 0.25 / 0.5) and the rings matching them."""
    free = param_counts(rpg(1000, 0).config)["free"]  # stem, BatchNorm, classifier
    a = param_counts(plain(0, 0.25).config)["trainable"]
    b = param_counts(plain(0, 0.5).config)["trainable"]
    return {"budget_A": a, "budget_B": b, "ring_A": a - free, "ring_B": b - free}


def get_study() -> Study:
    rings = budget_rings()
    ring_a, ring_b = rings["ring_A"], rings["ring_B"]
    runs = []
    for seed in SEEDS:  # partial results are useful early: every comparison at budget A
        runs += [plain(seed), rpg(ring_a, seed), plain(seed, 0.25)]
        runs += [rpg(ring_a, seed, v) for v in ("naive", "perm_only", "sign_only", "stage",
                                                 "layer", "resnet56")]
    for seed in SEEDS:
        runs += [rpg(ring_b, seed), plain(seed, 0.5)]
    runs += [rpg(ring, 0) for ring in SWEEP_RINGS]

    a, b = f"{rings['budget_A']:,}", f"{rings['budget_B']:,}"
    rpg_at = lambda ring, variant="rpg": {"variant": variant, "ring": ring}
    experiments = [
        Scaling("e1_dof_sweep", "RPG ResNet-20: test error vs trainable parameters",
                where={"variant": "rpg"},
                reference={"plain ResNet-20": {"variant": "plain"},
                           "plain ResNet-20 x0.5": {"variant": "thin", "width": 0.5},
                           "plain ResNet-20 x0.25": {"variant": "thin", "width": 0.25}}),
        Comparison("e2a_rpg_vs_thin_budget_A",
                   f"Budget A ({a} trainable): RPG ResNet-20 vs plain ResNet-20 x0.25",
                   arms={"plain x0.25": {"variant": "thin", "width": 0.25},
                         f"RPG ring {ring_a:,}": rpg_at(ring_a)},
                   baseline="plain x0.25"),
        Comparison("e2b_rpg_vs_thin_budget_B",
                   f"Budget B ({b} trainable): RPG ResNet-20 vs plain ResNet-20 x0.5",
                   arms={"plain x0.5": {"variant": "thin", "width": 0.5},
                         f"RPG ring {ring_b:,}": rpg_at(ring_b)},
                   baseline="plain x0.5"),
        Comparison("e3_sharing_ablation",
                   f"Destructive weight sharing at ring {ring_a:,}: index map ablation",
                   arms={"permutation + signs (rpg)": rpg_at(ring_a),
                         "naive (cyclic, no signs)": rpg_at(ring_a, "naive"),
                         "permutation only": rpg_at(ring_a, "perm_only"),
                         "signs only": rpg_at(ring_a, "sign_only")},
                   baseline="permutation + signs (rpg)"),
        Comparison("e4_ring_groups", f"Ring grouping at the same total ring DoF {ring_a:,}",
                   arms={"one global ring": rpg_at(ring_a),
                         "one ring per stage": rpg_at(ring_a, "stage"),
                         "one ring per layer": rpg_at(ring_a, "layer")},
                   baseline="one global ring"),
        Comparison("e5_depth", f"Depth at the same ring {ring_a:,}: ResNet-56 vs ResNet-20",
                   arms={"ResNet-20": rpg_at(ring_a), "ResNet-56": rpg_at(ring_a, "resnet56")},
                   baseline="ResNet-20"),
        Curves("e6_convergence", "Convergence: plain ResNet-20 vs RPG at budgets A and B",
               arms={"plain ResNet-20": {"variant": "plain"},
                     f"RPG ring {ring_a:,} (budget A)": rpg_at(ring_a),
                     f"RPG ring {ring_b:,} (budget B)": rpg_at(ring_b)}),
    ]
    description = (__doc__.split("\n\n", 2)[2].split("\n\n")[0]
                   + f"\n\nBudget A = {a}, ring A = {ring_a:,}; budget B = {b}, "
                     f"ring B = {ring_b:,}.")
    return Study("fashion_mnist", runs, experiments, description=description,
                 images_per_sec=IMAGES_PER_SEC)
