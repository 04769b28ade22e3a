"""we_dist: distributed training of convolutional networks with Weight Evolution.

The package imports nothing heavy at the top level: ``we_dist.evolution`` is pure
torch, and Ray, FFCV and MLflow are imported only by the modules that need them.
"""

__version__ = "0.1.0"
