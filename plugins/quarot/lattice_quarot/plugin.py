"""Entry point: registers the `quarot` weight transform (config section [quarot])."""

from lattice_engine import hookimpl
from lattice_engine.transforms import WeightTransform

from .fold import QuarotSettings, quarot


@hookimpl
def register_weight_transforms(register):
    register(WeightTransform(
        name="quarot", settings=QuarotSettings, apply=quarot,
        description="QuaRot: randomised Hadamard rotation of the residual stream folded into "
                    "the weights, optional online rotation before down_proj"))
