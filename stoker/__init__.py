"""Stoker: a per-node agent that tells when GPUs are starved, and by what."""

__version__ = "0.1.0"
