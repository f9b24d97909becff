"""lattice-quarot: QuaRot rotations for lattice-engine (a `weight_transforms` plugin)."""

from .fold import QuarotSettings, quarot
from .rotation import Rotation, random_rotation

__all__ = ["QuarotSettings", "quarot", "Rotation", "random_rotation"]
__version__ = "0.1.0"
