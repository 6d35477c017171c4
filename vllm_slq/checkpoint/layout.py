"""The one description of vllm-slq's on-disk layout (compressed-tensors pack-quantized).

Writer, reader and the vLLM plugin all go through this module, so they cannot
drift apart. Per quantized Linear ``<m>`` with weight W [N, K], spec (b, G, sym)
and n_g = K / G groups (per-channel: n_g = 1):

    <m>.weight_packed      int32 [N, ceil(K*b/32)]   codes q + 2^(b-1), dense bit
                                                      stream along K (packing.py)
    <m>.weight_scale       float [N, n_g]             s, in the model dtype (fp16)
    <m>.weight_shape       int64 [2]                  (N, K)
    <m>.weight_zero_point  int32 [ceil(N*b/32), n_g]  z + 2^(b-1) packed down dim 0;
                                                      asymmetric only
    dequantization:        w = (q - z) * s   (z = 0 when symmetric)

-> ``expected_tensors`` / ``expected_shapes`` (shapes and dtypes),
   ``encode_weight`` (QuantizedWeight -> tensors), ``decode_weight`` (tensors ->
   QuantizedWeight, validating every field).

config.json carries ``quantization_config`` (compressed-tensors QuantizationConfig):
quant_method "compressed-tensors", format "pack-quantized", quantization_status
"compressed", ``ignore`` (linears left dense) and ``config_groups``: one group per
distinct spec, each targeting a disjoint list of explicit module names, with
``weights`` = QuantizationArgs {num_bits, type "int", symmetric, strategy
group|channel, group_size, ...} and format "pack-quantized".
-> ``quant_args`` / ``build_quant_config`` (write) and ``spec_from_args`` /
   ``parse_quant_config`` (read; also resolves the "Linear" class-name and
   "re:" regex targets llmcompressor writes, with compressed-tensors' precedence:
   exact name, then regex, then class name).

vLLM fuses q/k/v and gate/up into one layer and gives it the first shard's scheme;
``fused_groups`` / ``check_fused_consistency`` find shards whose specs differ.

This module does not import compressed-tensors: its QuantizationArgs/Scheme forbid
unknown keys, so the key sets below mirror 0.19's models and are checked here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..quant.packing import (
    PackingError,
    pack_codes,
    pack_zero_points,
    packed_width,
    unpack_codes,
    unpack_zero_points,
)
from ..quant.spec import MAX_BITS, MIN_BITS, QuantizedWeight, QuantSpec, QuantSpecError
from .errors import LayoutError, MixedFusedModuleError, QuantConfigError

__all__ = [
    "QUANT_METHOD", "FORMAT_PACK_QUANTIZED", "FORMAT_MIXED_PRECISION", "STATUS_COMPRESSED",
    "CT_LAYOUT_VERSION", "EXTRA_KEY", "QUANT_TENSOR_SUFFIXES", "WEIGHT_PACKED", "WEIGHT_SCALE", "WEIGHT_SHAPE",
    "WEIGHT_ZERO_POINT", "FUSED_MODULES", "TensorLayout", "expected_tensors", "expected_shapes",
    "encode_weight", "decode_weight", "quant_args", "spec_from_args", "build_quant_config",
    "GroupScheme", "ParsedQuantConfig", "parse_quant_config", "fused_groups",
    "check_fused_consistency",
]

QUANT_METHOD = "compressed-tensors"
FORMAT_PACK_QUANTIZED = "pack-quantized"
FORMAT_MIXED_PRECISION = "mixed-precision"
STATUS_COMPRESSED = "compressed"
# The dense (straddling) bit layout for 3/5/6/7 bits exists since compressed-tensors
# 0.18; readers older than that mis-decode those widths. We verified against 0.19.
CT_LAYOUT_VERSION = "0.19.0"
EXTRA_KEY = "vllm_slq"  # our top-level metadata key in config.json (top level tolerates extras)

WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_SHAPE = "weight_shape"
WEIGHT_ZERO_POINT = "weight_zero_point"
QUANT_TENSOR_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_SHAPE, WEIGHT_ZERO_POINT)

# vLLM's packed_modules_mapping for Llama-style models: fused layer -> its shards.
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

# compressed-tensors 0.19 pydantic models use extra="forbid": these are all their fields.
_ARGS_KEYS = frozenset({
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
    "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs",
})
_SCHEME_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
_SUPPORTED_ACTORDER = (None, False, "weight", "static")
_LINEAR_CLASSES = ("Linear",)


# ---------------------------------------------------------------- tensor layout

@dataclass(frozen=True)
class TensorLayout:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _layer(module: str) -> str:
    return f"layer {module!r}" if module else "layer"


def expected_tensors(out_features: int, in_features: int, spec: QuantSpec,
                     scale_dtype: torch.dtype = torch.float16, module: str = "") -> dict[str, TensorLayout]:
    """Suffix -> (shape, dtype) of every tensor stored for one quantized Linear."""
    groups = spec.groups(in_features, module)  # raises QuantSpecError naming the layer
    tensors = {
        WEIGHT_PACKED: TensorLayout((out_features, packed_width(in_features, spec.bits)), torch.int32),
        WEIGHT_SCALE: TensorLayout((out_features, groups), scale_dtype),
        WEIGHT_SHAPE: TensorLayout((2,), torch.int64),
    }
    if not spec.symmetric:
        tensors[WEIGHT_ZERO_POINT] = TensorLayout(
            (packed_width(out_features, spec.bits), groups), torch.int32)
    return tensors


def expected_shapes(out_features: int, in_features: int, spec: QuantSpec, module: str = "") -> dict[str, tuple[int, ...]]:
    """Suffix -> shape of every tensor stored for one quantized Linear (what the vLLM plugin allocates)."""
    return {k: v.shape for k, v in expected_tensors(out_features, in_features, spec, module=module).items()}


def encode_weight(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float16, module: str = "") -> dict[str, torch.Tensor]:
    """QuantizedWeight -> {suffix: tensor} exactly as stored on disk."""
    n, k = qw.codes.shape
    spec = qw.spec
    try:
        tensors = {
            WEIGHT_PACKED: pack_codes(qw.codes, spec.bits),
            WEIGHT_SCALE: qw.scale.detach().to(scale_dtype).contiguous(),
            WEIGHT_SHAPE: torch.tensor([n, k], dtype=torch.int64),
        }
        if not spec.symmetric:
            tensors[WEIGHT_ZERO_POINT] = pack_zero_points(qw.zero_point, spec.bits)
    except PackingError as e:
        raise LayoutError(f"{_layer(module)}: {e}") from None
    return tensors


def decode_weight(module: str, tensors: Mapping[str, torch.Tensor], spec: QuantSpec,
                  file: str = "") -> QuantizedWeight:
    """{suffix: tensor} as read from disk -> QuantizedWeight, checking every field against ``spec``."""
    where = f"{_layer(module)}" + (f" in {file}" if file else "")
    required = [WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_SHAPE] + ([] if spec.symmetric else [WEIGHT_ZERO_POINT])
    missing = [s for s in required if s not in tensors]
    if missing:
        raise LayoutError(f"{where}: missing {', '.join(f'{module}.{s}' for s in missing)} "
                          f"(spec {spec.short()})")
    if spec.symmetric and WEIGHT_ZERO_POINT in tensors:
        raise LayoutError(f"{where}: has {module}.{WEIGHT_ZERO_POINT} but its config group is symmetric")
    shape_t = tensors[WEIGHT_SHAPE]
    if tuple(shape_t.shape) != (2,) or shape_t.dtype.is_floating_point:
        raise LayoutError(f"{where}: field {WEIGHT_SHAPE} must be an integer tensor of shape (2,), "
                          f"got {tuple(shape_t.shape)} {shape_t.dtype}")
    n, k = (int(v) for v in shape_t.tolist())
    if n <= 0 or k <= 0:
        raise LayoutError(f"{where}: field {WEIGHT_SHAPE} = {[n, k]} is not a valid weight shape")
    scale = tensors[WEIGHT_SCALE]
    try:
        want = expected_tensors(n, k, spec, scale_dtype=scale.dtype, module=module)
    except QuantSpecError as e:
        raise LayoutError(f"{where}: {e}") from None
    for suffix, lay in want.items():
        t = tensors[suffix]
        if tuple(t.shape) != lay.shape:
            raise LayoutError(f"{where}: field {suffix} has shape {tuple(t.shape)}, expected {lay.shape} "
                              f"for weight_shape {[n, k]} and spec {spec.short()}")
        if suffix != WEIGHT_SHAPE and t.dtype != lay.dtype:
            raise LayoutError(f"{where}: field {suffix} has dtype {t.dtype}, expected {lay.dtype}")
    if not scale.dtype.is_floating_point:
        raise LayoutError(f"{where}: field {WEIGHT_SCALE} must be floating point, got {scale.dtype}")
    codes = unpack_codes(tensors[WEIGHT_PACKED], spec.bits, k)
    zero = None if spec.symmetric else unpack_zero_points(tensors[WEIGHT_ZERO_POINT], spec.bits, n)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, spec=spec)


# ------------------------------------------------------------ quantization_config

def quant_args(spec: QuantSpec) -> dict:
    """QuantSpec -> compressed-tensors QuantizationArgs dict (only long-standing fields, so
    older readers that forbid unknown keys still accept it)."""
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": spec.group_size,
        "strategy": "channel" if spec.group_size is None else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": None,
        "observer_kwargs": {},
    }


def spec_from_args(args: Mapping, where: str = "weights") -> QuantSpec:
    """compressed-tensors QuantizationArgs dict -> QuantSpec; rejects what we cannot serve."""
    if not isinstance(args, Mapping):
        raise QuantConfigError(f"{where}: expected a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - _ARGS_KEYS)
    if unknown:
        raise QuantConfigError(f"{where}: unknown key(s) {unknown} (compressed-tensors QuantizationArgs "
                               f"forbids extra fields)")
    qtype = str(args.get("type", "int")).lower()
    if qtype != "int":
        raise QuantConfigError(f"{where}.type: only integer weights are supported, got {args.get('type')!r}")
    bits = args.get("num_bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or not (MIN_BITS <= bits <= MAX_BITS):
        raise QuantConfigError(f"{where}.num_bits: must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    group_size = args.get("group_size")
    strategy = args.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    strategy = str(strategy).lower()
    if strategy == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise QuantConfigError(f"{where}.group_size: strategy 'group' needs a positive integer, got {group_size!r}")
        gs: Optional[int] = group_size
    elif strategy == "channel":
        if group_size not in (None, -1):
            raise QuantConfigError(f"{where}.group_size: strategy 'channel' takes no group size, got {group_size!r}")
        gs = None
    else:
        raise QuantConfigError(f"{where}.strategy: only 'group' and 'channel' are supported, got {strategy!r}")
    if args.get("dynamic", False) not in (False, None):
        raise QuantConfigError(f"{where}.dynamic: dynamic weight quantization is not supported")
    actorder = args.get("actorder")
    if isinstance(actorder, str):
        actorder = actorder.lower()
    if actorder not in _SUPPORTED_ACTORDER:
        raise QuantConfigError(f"{where}.actorder: {args.get('actorder')!r} needs a g_idx permutation, "
                               f"which is not supported")
    if args.get("block_structure") is not None:
        raise QuantConfigError(f"{where}.block_structure: block quantization is not supported")
    symmetric = args.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise QuantConfigError(f"{where}.symmetric: expected true/false, got {symmetric!r}")
    return QuantSpec(bits=bits, group_size=gs, symmetric=symmetric)


def _group_key(spec: QuantSpec):
    return (spec.bits, spec.symmetric, spec.group_size is None, spec.group_size or 0)


def build_quant_config(specs: Mapping[str, QuantSpec], ignore: Iterable[str] = ()) -> dict:
    """{module name: spec} -> quantization_config dict: one group per distinct spec, disjoint
    explicit target lists (vLLM and compressed-tensors resolve overlaps differently)."""
    by_spec: dict[QuantSpec, list[str]] = {}
    for name, spec in specs.items():
        by_spec.setdefault(spec, []).append(name)
    ignore = sorted(set(ignore))
    clash = sorted(set(ignore) & set(specs))
    if clash:
        raise QuantConfigError(f"modules both quantized and ignored: {clash}")
    config_groups = {}
    for i, spec in enumerate(sorted(by_spec, key=_group_key)):
        config_groups[f"group_{i}"] = {
            "targets": sorted(by_spec[spec]),
            "weights": quant_args(spec),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT_PACK_QUANTIZED,
        }
    return {
        "config_groups": config_groups,
        "quant_method": QUANT_METHOD,
        "format": FORMAT_PACK_QUANTIZED,
        "quantization_status": STATUS_COMPRESSED,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_LAYOUT_VERSION,
    }


@dataclass(frozen=True)
class GroupScheme:
    name: str
    targets: tuple[str, ...]
    spec: QuantSpec
    format: str


def _is_regex(target: str) -> bool:
    return target.startswith("re:")


def _name_matches(name: str, target: str) -> bool:
    # compressed-tensors: "re:" patterns use re.match (anchored at the start only)
    if _is_regex(target):
        return re.match(target[3:], name) is not None
    return target == name


def _looks_like_class(target: str) -> bool:
    # class-name targets ("Linear", "LlamaAttention") vs module names ("lm_head", "model.layers.0...")
    return re.fullmatch(r"[A-Z][A-Za-z0-9_]*", target) is not None


def _class_matches(class_names: Sequence[str], target: str) -> bool:
    return not _is_regex(target) and any(
        c == target or (c == "LinearBase" and target == "Linear") for c in class_names)


@dataclass
class ParsedQuantConfig:
    """A parsed quantization_config. ``specs`` holds the resolved module -> spec map (explicit
    targets always; regex/class targets once module names are known, see ``resolve``)."""

    groups: dict[str, GroupScheme]
    ignore: list[str]
    format: str
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    unresolved_targets: list[str] = field(default_factory=list)

    def _ignored(self, name: str, class_names: Sequence[str]) -> bool:
        return any(_name_matches(name, t) or _class_matches(class_names, t) for t in self.ignore)

    def spec_for(self, name: str, class_names: Sequence[str] = _LINEAR_CLASSES) -> Optional[QuantSpec]:
        """Spec of module ``name`` (None = not quantized). Precedence as compressed-tensors'
        match_targets: exact name, then regex (targets sorted), then class name."""
        if self._ignored(name, class_names):
            return None
        pairs = [(t, g) for g in self.groups.values() for t in g.targets]
        exact = [g for t, g in pairs if not _is_regex(t) and t == name]
        regex = [g for t, g in sorted(pairs, key=lambda p: p[0]) if _is_regex(t) and _name_matches(name, t)]
        klass = [g for t, g in pairs if _class_matches(class_names, t)]
        for found in (exact, regex, klass):
            if found:
                return found[0].spec
        return None

    def resolve(self, module_names: Iterable[str] | Mapping[str, Sequence[str]]) -> dict[str, QuantSpec]:
        """Module -> spec for every listed module that some group targets. ``module_names`` is
        either a list of Linear module names or a mapping name -> class names (MRO)."""
        if isinstance(module_names, Mapping):
            items = [(n, tuple(c)) for n, c in module_names.items()]
        else:
            items = [(n, _LINEAR_CLASSES) for n in module_names]
        out = {}
        for name, classes in items:
            spec = self.spec_for(name, classes)
            if spec is not None:
                out[name] = spec
        return out

    def fused_spec(self, prefix: str, shards: Sequence[str],
                   class_names: Sequence[str] = _LINEAR_CLASSES) -> Optional[QuantSpec]:
        """Spec of a vLLM fused layer ``prefix`` (e.g. model.layers.0.self_attn.qkv_proj) whose
        shards are ``shards`` (e.g. q_proj, k_proj, v_proj); raises if the shards disagree."""
        parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        names = [f"{parent}.{s}" if parent else s for s in shards]
        found = {n: self.spec_for(n, class_names) for n in names}
        if len(set(found.values())) > 1:
            detail = ", ".join(f"{n}: {s.short() if s else 'dense'}" for n, s in found.items())
            raise MixedFusedModuleError(f"fused layer {prefix!r} mixes quantization specs across its shards "
                                        f"({detail}); vLLM serves a fused layer with one spec")
        return found[names[0]]


def parse_quant_config(config: Mapping, module_names: Iterable[str] | Mapping[str, Sequence[str]] | None = None
                       ) -> ParsedQuantConfig:
    """config.json dict (or its quantization_config) -> ParsedQuantConfig.

    Validates quant_method, status, formats and every group's weights args (our
    supported subset of compressed-tensors). With ``module_names`` (Linear names,
    or name -> class names), regex and class-name targets are resolved into
    ``specs``; without, only explicit names are, the rest listed in ``unresolved_targets``.
    """
    qc = config.get("quantization_config", config) if isinstance(config, Mapping) else None
    if not isinstance(qc, Mapping):
        raise QuantConfigError("quantization_config: expected a mapping")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise QuantConfigError(f"quantization_config.quant_method: expected {QUANT_METHOD!r}, got {method!r}")
    status = qc.get("quantization_status", STATUS_COMPRESSED)
    if status != STATUS_COMPRESSED:
        raise QuantConfigError(f"quantization_config.quantization_status: expected {STATUS_COMPRESSED!r} "
                               f"(packed weights), got {status!r}")
    top_format = qc.get("format", FORMAT_PACK_QUANTIZED)
    if top_format not in (FORMAT_PACK_QUANTIZED, FORMAT_MIXED_PRECISION):
        raise QuantConfigError(f"quantization_config.format: expected {FORMAT_PACK_QUANTIZED!r} or "
                               f"{FORMAT_MIXED_PRECISION!r}, got {top_format!r}")
    if qc.get("kv_cache_scheme") is not None:
        raise QuantConfigError("quantization_config.kv_cache_scheme: KV-cache quantization is not supported")
    groups_raw = qc.get("config_groups")
    if not isinstance(groups_raw, Mapping) or not groups_raw:
        raise QuantConfigError("quantization_config.config_groups: expected a non-empty mapping")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise QuantConfigError("quantization_config.ignore: expected a list of module names/patterns")

    groups: dict[str, GroupScheme] = {}
    for gname, scheme in groups_raw.items():
        where = f"quantization_config.config_groups.{gname}"
        if not isinstance(scheme, Mapping):
            raise QuantConfigError(f"{where}: preset scheme names are not supported; write the scheme out "
                                   f"(targets + weights)")
        unknown = sorted(set(scheme) - _SCHEME_KEYS)
        if unknown:
            raise QuantConfigError(f"{where}: unknown key(s) {unknown} (QuantizationScheme forbids extra fields)")
        targets = scheme.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise QuantConfigError(f"{where}.targets: expected a list of strings")
        for act in ("input_activations", "output_activations"):
            if scheme.get(act) is not None:
                raise QuantConfigError(f"{where}.{act}: activation quantization is not supported "
                                       f"(weight-only checkpoints)")
        if scheme.get("weights") is None:
            raise QuantConfigError(f"{where}.weights: missing")
        fmt = scheme.get("format") or (top_format if top_format != FORMAT_MIXED_PRECISION else None)
        if fmt != FORMAT_PACK_QUANTIZED:
            raise QuantConfigError(f"{where}.format: expected {FORMAT_PACK_QUANTIZED!r}, got {fmt!r}")
        spec = spec_from_args(scheme["weights"], f"{where}.weights")
        groups[gname] = GroupScheme(gname, tuple(targets), spec, fmt)

    parsed = ParsedQuantConfig(groups=groups, ignore=list(ignore), format=top_format)
    if module_names is not None:
        parsed.specs = parsed.resolve(module_names)
    else:
        explicit = sorted({t for g in groups.values() for t in g.targets
                           if not _is_regex(t) and not _looks_like_class(t)})
        parsed.specs = {n: s for n in explicit if (s := parsed.spec_for(n)) is not None}
        parsed.unresolved_targets = sorted({t for g in groups.values() for t in g.targets
                                            if _is_regex(t) or _looks_like_class(t)})
    return parsed


# ------------------------------------------------------------------- fused modules

def fused_groups(module_names: Iterable[str],
                 fused: Mapping[str, Sequence[str]] = FUSED_MODULES) -> dict[str, list[str]]:
    """Fused layer name -> the listed module names that vLLM fuses into it."""
    out: dict[str, list[str]] = {}
    for name in module_names:
        parent, _, leaf = name.rpartition(".")
        for fused_name, shards in fused.items():
            if leaf in shards:
                key = f"{parent}.{fused_name}" if parent else fused_name
                out.setdefault(key, []).append(name)
    return out


def check_fused_consistency(specs: Mapping[str, Optional[QuantSpec]], linear_names: Iterable[str],
                            fused: Mapping[str, Sequence[str]] = FUSED_MODULES) -> None:
    """Raise MixedFusedModuleError if shards of one fused layer differ in bits, symmetry or group
    size, or if only some of them are quantized. ``specs`` maps quantized modules to their spec;
    ``linear_names`` lists every Linear of the model (quantized or not)."""
    for fused_name, members in fused_groups(linear_names, fused).items():
        found = {m: specs.get(m) for m in members}
        if len(set(found.values())) > 1:
            detail = ", ".join(f"{m}: {s.short() if s else 'dense'}" for m, s in sorted(found.items()))
            raise MixedFusedModuleError(
                f"fused layer {fused_name!r}: shards differ ({detail}); vLLM fuses these into one layer "
                f"served with one spec. Give them the same bits/symmetry/group size, or pass "
                f"allow_mixed_fused=True to write it anyway")
