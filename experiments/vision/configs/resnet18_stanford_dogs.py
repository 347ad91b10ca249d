"""resnet18 (ImageNet-1K pre-trained) on stanford_dogs: the paper's protocol with the official settings.

    python -m experiments.vision.run --config experiments/vision/configs/resnet18_stanford_dogs.py \
        --workdir DIR --set weights=/abs/resnet18.safetensors --set data_dir=/abs/stanford_dogs \
        --set imagenet_dir=/abs/imagenet_val
"""

from experiments.vision.config import paper


def get_config():
    return paper("resnet18", "stanford_dogs")
