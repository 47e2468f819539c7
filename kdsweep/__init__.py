"""kdsweep: declarative experiment sweeps for knowledge distillation of language models."""

__version__ = "0.1.0"
