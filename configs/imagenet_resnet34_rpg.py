"""ImageNet ResNet34-RPG with a ring of 54,000 entries: the paper's "more than 400x fewer
parameters" setting (21.8M plain parameters / 54K ring DoF), reported at 41.6% top-1.
Same reference recipe as imagenet_resnet18_rpg.py."""

from configs.imagenet_resnet18_rpg import imagenet_config


def get_config():
    return imagenet_config("resnet34", 54_000.0, rpg=True)
