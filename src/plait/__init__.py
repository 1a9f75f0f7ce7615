"""plait: contrastive representation learning without the large-batch tax."""

__version__ = "0.1.0"
