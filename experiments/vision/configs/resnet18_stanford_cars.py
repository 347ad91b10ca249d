"""resnet18 (ImageNet-1K pre-trained) on stanford_cars: the paper's protocol with the official settings.

    python -m experiments.vision.run --config experiments/vision/configs/resnet18_stanford_cars.py \
        --workdir DIR --set weights=/abs/resnet18.safetensors --set data_dir=/abs/stanford_cars \
        --set imagenet_dir=/abs/imagenet_val
"""

from experiments.vision.config import paper


def get_config():
    return paper("resnet18", "stanford_cars")
