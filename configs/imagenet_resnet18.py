"""Plain ImageNet ResNet18 baseline with the same recipe as imagenet_resnet18_rpg.py."""

from configs.imagenet_resnet18_rpg import imagenet_config


def get_config():
    return imagenet_config("resnet18", 2_359_296.0, rpg=False)
