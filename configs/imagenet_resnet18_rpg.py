"""ImageNet ResNet18-RPG, the paper's headline setting: one global ring of 2,359,296 entries
(the size of one 512x512x3x3 conv), reference recipe: SGD momentum 0.9, weight decay 1e-4
on everything (ring included), 90 epochs, lr 0.1 * batch / 256 decayed as
lr0 * 0.1 ** (epoch / 45), inception crop + flip, eval resize 256 / center crop 224.
The paper reports 67.2% top-1 (plain ResNet18: 69.76%).

Needs ImageNet prepared as array_record (see the README); set --config.data_dir.
"""

from rpg_jax.config import base_config


def imagenet_config(model: str, ring_size: float, rpg: bool):
    c = base_config()
    c.dataset = "imagenet2012"
    c.model = model
    c.batch_size = 256
    # A reference, so `--config.batch_size=1024` rescales the learning rate too.
    del c["learning_rate"]
    c.learning_rate = c.get_ref("batch_size") * (0.1 / 256)
    c.num_epochs = 90.0
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.lr_schedule = "exp_epoch"
    c.lr_decay_epochs = 45.0
    c.warmup_epochs = 0.0
    c.log_every_steps = 100
    c.worker_count = 16  # JPEG decoding and crops on the host
    c.keep_checkpoints = 3
    c.rpg.enabled = rpg
    c.rpg.ring_size = ring_size
    return c


def get_config():
    return imagenet_config("resnet18", 2_359_296.0, rpg=True)
