"""Compressed-tensors pack-quantized checkpoints: layout (the one description of the
on-disk format), atomic writer, validating reader and our dequantized reference model."""
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    InvalidQuantizedWeightError,
    LayoutError,
    MixedFusedModuleError,
    QuantConfigError,
)
from .layout import expected_shapes, expected_tensors, parse_quant_config
from .reader import QuantizedCheckpoint, dequantized_model, load_checkpoint, read_config
from .writer import save_checkpoint

__all__ = [
    "save_checkpoint", "load_checkpoint", "dequantized_model", "read_config", "QuantizedCheckpoint",
    "expected_shapes", "expected_tensors", "parse_quant_config",
    "CheckpointError", "CheckpointExistsError", "CorruptCheckpointError", "InvalidQuantizedWeightError",
    "LayoutError", "MixedFusedModuleError", "QuantConfigError",
]
