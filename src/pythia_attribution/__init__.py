"""Training-data attribution on Pythia language models: a reproducibility package."""

__version__ = "0.1.0"
