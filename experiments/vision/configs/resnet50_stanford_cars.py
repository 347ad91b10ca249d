"""resnet50 (ImageNet-1K pre-trained) on stanford_cars: the paper's protocol with the official settings.

    python -m experiments.vision.run --config experiments/vision/configs/resnet50_stanford_cars.py \
        --workdir DIR --set weights=/abs/resnet50.safetensors --set data_dir=/abs/stanford_cars \
        --set imagenet_dir=/abs/imagenet_val
"""

from experiments.vision.config import paper


def get_config():
    return paper("resnet50", "stanford_cars")
