"""deeplm: train a deep, thin language model from scratch on one machine."""

__version__ = "0.1.0"
