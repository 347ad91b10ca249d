"""FLOW on language models: a small real-text reproduction and fine-tuning of checkpoints."""
