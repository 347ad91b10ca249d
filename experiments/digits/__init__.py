"""The digits demo: FLOW on scikit-learn's handwritten digits, read through TFDS without TensorFlow."""
