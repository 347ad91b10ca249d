"""The paper's vision protocol (ResNet-18/50 on six datasets, ImageNet-1K retention) as one config-driven command."""
