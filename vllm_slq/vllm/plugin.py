"""vLLM general plugin entry point (pyproject: vllm.general_plugins -> register).

vLLM calls register() in the API server, the engine core and every worker,
possibly more than once per process.  It replaces the "compressed-tensors"
quantization config with vllm_slq.vllm.config.SLQCompressedTensorsConfig (see
that module for why).  Idempotent; all classes live at module level so that
configs pickled between processes resolve to the same classes.

Set VLLM_SLQ_DISABLE=1 to leave vLLM's stock compressed-tensors path in place
(handy to compare against vLLM's own 4-bit kernels).
"""
from __future__ import annotations

import logging
import os

# under the "vllm" logger namespace so vLLM's own handler prints it
logger = logging.getLogger("vllm.plugins.vllm_slq")

QUANT_NAME = "compressed-tensors"


def is_registered() -> bool:
    from vllm.model_executor.layers.quantization import _CUSTOMIZED_METHOD_TO_QUANT_CONFIG

    from .config import SLQCompressedTensorsConfig

    return _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_NAME) is SLQCompressedTensorsConfig


def register() -> None:
    if os.environ.get("VLLM_SLQ_DISABLE", "0") not in ("", "0"):
        logger.info("vllm-slq: VLLM_SLQ_DISABLE set, not registering")
        return
    if is_registered():
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import SLQCompressedTensorsConfig

    register_quantization_config(QUANT_NAME)(SLQCompressedTensorsConfig)
    logger.info("vllm-slq: %s -> %s", QUANT_NAME, SLQCompressedTensorsConfig.__qualname__)
