"""lightning-convnets: a PyTorch Lightning 2 plugin for convolutional networks."""

__version__ = "0.1.0"
