"""An RPG Vision Transformer on Fashion-MNIST: 4x4 patches (49 tokens and a class token),
width 96, 6 blocks of 3 heads, MLP ratio 2 (456,394 parameters as a plain network). The
blocks' attention and MLP kernels (442,368 weights) are generated from one ring of 10% of
them (44,237); patch embedding, position embedding, class token, LayerNorms, biases and
head stay free. AdamW with a half-epoch warm-up and cosine decay. About 20 minutes on 2 CPU
cores (3.5 epochs at ~195 images/s, RPG and plain alike).

Variants: ``configs/fashion_mnist_vit.py:plain`` trains the same network without RPG.
"""

from rpg_jax.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.dataset = "fashion_mnist"
    c.model = "vit"
    c.vit.dim = 96
    c.vit.depth = 6
    c.vit.num_heads = 3
    c.vit.mlp_ratio = 2.0
    c.vit.patch_size = 4
    c.vit.pool = "cls"
    c.batch_size = 128
    c.num_epochs = 3.5
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.5
    c.weight_decay = 0.05
    c.log_every_steps = 50
    c.rpg.enabled = True
    c.rpg.ring_size = 0.1
    c.rpg.select = "auto"  # the kernels inside blocks: attention and MLP, not embedding/head
    if variant == "plain":
        c.rpg.enabled = False
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of fashion_mnist_vit.py: expected '' or "
                         "'plain'")
    return c
