"""Pure quantization math (torch only): grids, scale search, GPTQ, packing.

Nothing here imports llmcompressor or vLLM.
"""
from .spec import MAX_BITS, MIN_BITS, QuantizedWeight, QuantSpec, QuantSpecError

__all__ = ["QuantSpec", "QuantizedWeight", "QuantSpecError", "MIN_BITS", "MAX_BITS"]
