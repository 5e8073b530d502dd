"""The simulated node driven on a manual clock (the drive lives in the package: `stoker replay` uses it)."""

from stoker.sim.drive import SimDrive

__all__ = ["SimDrive"]
