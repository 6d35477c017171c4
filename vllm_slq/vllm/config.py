"""The quantization config the plugin registers as "compressed-tensors".

Design choice (of two: a new quantization method name with its own flag, or this): we subclass vLLM's own
CompressedTensorsConfig and register the subclass under the built-in name
"compressed-tensors".  Consequences:

  * checkpoints written by vllm_slq.checkpoint *and* by llmcompressor load with no
    extra flags (`vllm serve <dir>`, `vllm.LLM(<dir>)`, lm-eval's vllm backend);
  * only one decision changes: a layer whose config group is INT, weight-only
    (no input/output activation quantization), static, group- or channel-wise,
    format pack-quantized, gets SLQWNA16Scheme (bits 2..8, sym/asym, any K) and
    its kernel comes from vllm_slq.kernels.registry; every other scheme (FP8,
    NVFP4, W8A8, W4A8, MoE, embeddings, KV cache, sparsity, transforms, ignore
    lists) is the stock code path, untouched;
  * the linear method stays vLLM's CompressedTensorsLinearMethod, which is
    already in WEIGHT_LOADER_V2_SUPPORTED, so vLLM hands our parameters the
    tensor-parallel / fused q,k,v / gate,up loaders;
  * fused modules: vLLM runs q/k/v (and gate/up) as one matmul, so their
    quantization args must be identical; we check that and name the first
    component that differs instead of failing later on a shape assert;
  * a checkpoint served as a speculative *draft* (speculative_config method
    "draft_model") is built by vLLM under the prefix "draft_model.", so its layers
    are named "draft_model.model.layers.0...". Our mixed-precision checkpoints name
    each layer in their config groups' targets, so the prefix is taken off before
    matching (stock llmcompressor checkpoints target the class "Linear" and never
    noticed).

The alternative (a new method name claimed via override_quantization_method)
would need a marker key in every checkpoint or a user flag and would not pick up
llmcompressor's own checkpoints, so we did not take it.
"""
from __future__ import annotations

from typing import Any, Optional

from compressed_tensors.quantization import QuantizationArgs
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)

from vllm_slq.checkpoint.layout import FORMAT_PACK_QUANTIZED as PACK_QUANTIZED

from .linear_method import CheckpointLayoutError, SLQWNA16Scheme


# the prefix vLLM's DraftModelProposer builds a draft model under (vllm/v1/spec_decode/draft_model.py)
DRAFT_MODEL_PREFIX = "draft_model."


def checkpoint_layer_name(prefix: str) -> str:
    """The checkpoint's name of the layer vLLM calls `prefix` (a draft model's layers carry DRAFT_MODEL_PREFIX)."""
    return prefix[len(DRAFT_MODEL_PREFIX):] if prefix.startswith(DRAFT_MODEL_PREFIX) else prefix


def _is_int_weight_only_packed(weight_quant: QuantizationArgs, input_quant, output_quant,
                               fmt: Optional[str]) -> bool:
    return (
        fmt == PACK_QUANTIZED
        and input_quant is None
        and output_quant is None
        and str(getattr(weight_quant.type, "value", weight_quant.type)) == "int"
        and str(getattr(weight_quant.strategy, "value", weight_quant.strategy)) in ("group", "channel")
        and not weight_quant.dynamic
    )


class SLQCompressedTensorsConfig(CompressedTensorsConfig):
    """CompressedTensorsConfig that serves INT weight-only pack-quantized layers itself."""

    def _get_scheme_from_parts(self, weight_quant: QuantizationArgs, input_quant: QuantizationArgs,
                               output_quant: Optional[QuantizationArgs] = None,
                               format: Optional[str] = None, layer_name: Optional[str] = None):
        fmt = format if format is not None else self.quant_format
        if _is_int_weight_only_packed(weight_quant, input_quant, output_quant, fmt):
            strategy = str(getattr(weight_quant.strategy, "value", weight_quant.strategy))
            return SLQWNA16Scheme(
                num_bits=weight_quant.num_bits,
                strategy=strategy,
                group_size=weight_quant.group_size,
                symmetric=bool(weight_quant.symmetric),
                layer_name=layer_name or "",
                shard_names=self._component_names(layer_name),
            )
        return super()._get_scheme_from_parts(weight_quant=weight_quant, input_quant=input_quant,
                                              output_quant=output_quant, format=format,
                                              layer_name=layer_name)

    def get_quant_method(self, layer, prefix: str):
        return super().get_quant_method(layer, checkpoint_layer_name(prefix))

    def _component_names(self, layer_name: Optional[str]) -> list[str]:
        """Checkpoint layer names of a fused vLLM layer (qkv_proj -> q/k/v_proj)."""
        if not layer_name:
            return [""]
        parent, _, leaf = layer_name.rpartition(".")
        comps = (getattr(self, "packed_modules_mapping", None) or {}).get(leaf)
        if not comps:
            return [layer_name]
        return [f"{parent}.{c}" if parent else c for c in comps]

    def get_scheme_dict(self, layer, layer_name: Optional[str] = None) -> Optional[dict[str, Any]]:
        scheme = super().get_scheme_dict(layer, layer_name)
        comps = self._component_names(layer_name)
        if scheme is None or len(comps) < 2:
            return scheme
        # vLLM would use the first component's args for the whole fused matmul.
        first_args = None
        for comp in comps:
            comp_scheme = super().get_scheme_dict(layer, comp)
            args = comp_scheme.get("weights") if comp_scheme else None
            if first_args is None:
                first_args = args
                continue
            if args != first_args:
                diff = _first_difference(first_args, args)
                raise CheckpointLayoutError(
                    f"layer {comp!r} field {diff!r}: differs from {comps[0]!r} inside the fused "
                    f"module {layer_name!r} ({_describe(first_args, diff)} vs {_describe(args, diff)}); "
                    f"vLLM runs {', '.join(c.rpartition('.')[2] for c in comps)} as one matmul, so "
                    f"their quantization (bits, group size, symmetry) must be identical")
        return scheme


def _first_difference(a: Optional[QuantizationArgs], b: Optional[QuantizationArgs]) -> str:
    if a is None or b is None:
        return "weights"
    for key in ("num_bits", "symmetric", "strategy", "group_size", "type"):
        if getattr(a, key) != getattr(b, key):
            return key
    return "weights"


def _describe(args: Optional[QuantizationArgs], key: str) -> str:
    if args is None:
        return "unquantized"
    return f"{key}={getattr(args, key, args)!r}" if key != "weights" else repr(args)
