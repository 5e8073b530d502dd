"""Verdicts over windows of samples: starvation and checkpoints."""
