"""resnet50 (ImageNet-1K pre-trained) on cifar100: the paper's protocol with the official settings.

    python -m experiments.vision.run --config experiments/vision/configs/resnet50_cifar100.py \
        --workdir DIR --set weights=/abs/resnet50.safetensors --set data_dir=/abs/cifar100 \
        --set imagenet_dir=/abs/imagenet_val
"""

from experiments.vision.config import paper


def get_config():
    return paper("resnet50", "cifar100")
