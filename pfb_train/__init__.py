"""pfb-train: train timm image classifiers with Partial Forward Blocking."""

__version__ = "0.1.0"
