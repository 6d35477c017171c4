"""Errors raised while writing, reading or validating compressed-tensors checkpoints.

Every message names the file, layer (module name) or config field at fault.
All derive from ValueError so callers that only care about "bad input" can catch one type.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """Base class: a checkpoint (or a request to write one) is invalid."""


class QuantConfigError(CheckpointError):
    """config.json's quantization_config is malformed or unsupported."""


class LayoutError(CheckpointError):
    """A layer's tensors disagree with the layout its quantization spec implies."""


class InvalidQuantizedWeightError(CheckpointError):
    """A QuantizedWeight handed to the writer cannot be stored (NaN scales, codes out of range...)."""


class MixedFusedModuleError(CheckpointError):
    """Shards of a module vLLM fuses (q/k/v, gate/up) carry different quantization specs."""


class CorruptCheckpointError(CheckpointError):
    """A file of the checkpoint is missing, truncated or unreadable."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The output directory exists and overwrite was not requested."""
