"""llmcompressor modifiers of vllm-slq (thin adapters over vllm_slq.quant / allocation).

Importing this package registers every modifier class with llmcompressor's
ModifierFactory, so YAML recipes can name them:

    quant_stage:
      quant_modifiers:
        RTNModifier: {bits: 4, group_size: 64}
"""
from llmcompressor.modifiers.factory import ModifierFactory

from .base import LayerwiseQuantModifier, SpecResolutionError, load_layer_specs, quantized_weights
from .uniform import RTNModifier, SLQGPTQModifier

__all__ = [
    "LayerwiseQuantModifier",
    "RTNModifier",
    "SLQGPTQModifier",
    "SpecResolutionError",
    "load_layer_specs",
    "quantized_weights",
    "register_modifiers",
]

_REGISTERED = (RTNModifier, SLQGPTQModifier)


def register_modifiers(*classes) -> None:
    """Register modifier classes with llmcompressor's factory by class name (idempotent).

    Other vllm-slq modules call this for their own modifiers (SLQ, GSQ, RCO).
    ModifierFactory.refresh() keeps this registry, so order does not matter.
    """
    for cls in classes or _REGISTERED:
        ModifierFactory.register(cls.__name__, cls)


register_modifiers()

# SLQ and GSQ import this package's base module; they are registered here, once, so that
# YAML recipes resolve them (the modules themselves never import the package: no cycle).
from .gsq import GSQModifier  # noqa: E402
from .rotation import RotationModifier  # noqa: E402
from .slq import SLQModifier  # noqa: E402

register_modifiers(SLQModifier, GSQModifier, RotationModifier)
__all__ += ["SLQModifier", "GSQModifier", "RotationModifier"]
