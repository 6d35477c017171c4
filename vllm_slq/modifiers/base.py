"""Shared llmcompressor machinery for vllm-slq's layer-wise weight quantizers.

Every method here (RTN, GPTQ, SLQ, GSQ, allocation-driven mixed precision) has the
same outer shape, which this module implements once in ``LayerwiseQuantModifier``:

    on_initialize           pick the target Linears (default: every Linear but
                            lm_head), resolve each one's QuantSpec (default spec,
                            overridden per layer by ``layer_specs`` -- the RCO
                            allocation artifact) and check it fits the layer
    on_calibration_start    forward hooks accumulate H = 2/n sum_t x_t x_t^T
                            (docs/methods.md sec. 1 "GPTQ"; vllm_slq.quant.gptq.GPTQ,
                            fp32 on the module's device) when the method needs it.
                            An accumulator is made on a module's first input, so
                            only the subgraph being calibrated holds any, and it
                            is shared by modules that read the very same input
                            tensor (q/k/v, gate/up): one K x K matrix, not three.
                            Under torchrun each rank calibrates on its own token
                            shard and the Hessians are all-reduced before GPTQ
    on_sequential_epoch_end for the Linears of the subgraph (one decoder layer)
                            just calibrated: qw = quantize_module(name, module, H,
                            spec); module.weight <- qw.dequantize(). The sequential
                            pipeline then re-runs the layer, so the next layer
                            calibrates on the *quantized* outputs
                            (docs/methods.md sec. 1 "Error propagation").
    on_calibration_end      remove hooks; quantize any target no subgraph covered
    on_finalize             fail loudly if a target was never quantized

Outputs per quantized Linear: ``module.slq_quantized`` (a QuantizedWeight, on CPU)
plus the modifier's own ``quantized`` dict, and -- so llmcompressor's own
``save_pretrained(save_compressed=True)`` also works -- the compressed-tensors
``quantization_scheme`` / ``weight_scale`` / ``weight_zero_point`` in FROZEN status.
``quantized_weights(model)`` collects the QuantizedWeights for
``vllm_slq.checkpoint.save_checkpoint``.

With ``requires_calibration_data = False`` (RTN) llmcompressor runs the data-free
pipeline, which emits one sequential_epoch_end over all modules: the same code path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist
from compressed_tensors.distributed import is_distributed
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from vllm_slq.quant.gptq import GPTQ
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec, QuantSpecError

__all__ = [
    "LayerwiseQuantModifier",
    "SpecResolutionError",
    "load_layer_specs",
    "quantized_weights",
    "attach_compressed_tensors_params",
]

QUANTIZED_ATTR = "slq_quantized"
_SPEC_KEYS = {"bits", "group_size", "symmetric"}


class SpecResolutionError(ValueError):
    """A per-layer spec override that names no target layer or is malformed."""


def load_layer_specs(source: Any) -> dict[str, dict]:
    """Per-layer overrides from a dict or a JSON/YAML file.

    Accepted shapes: {name: {bits, group_size, symmetric}} (partial dicts allowed),
    {name: bits} (int shorthand), or either wrapped as {"layer_specs": {...}}
    (so an allocation artifact with other metadata can be passed as is).
    Names are exact module names or "re:<regex>" patterns.
    """
    origin = "layer_specs"
    if isinstance(source, (str, Path)):
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise SpecResolutionError(f"layer_specs file {origin} does not exist")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise SpecResolutionError(f"{origin}: not valid JSON ({e})") from e
    else:
        data = source
    if data is None:
        return {}
    if isinstance(data, dict) and "layer_specs" in data and isinstance(data["layer_specs"], dict):
        data = data["layer_specs"]
    if not isinstance(data, dict):
        raise SpecResolutionError(f"{origin}: expected a mapping of module name -> spec, got {type(data).__name__}")
    out: dict[str, dict] = {}
    for name, val in data.items():
        if isinstance(val, bool) or not isinstance(val, (int, dict)):
            raise SpecResolutionError(f"{origin}: entry {name!r} must be a dict or an int (bits), got {val!r}")
        val = {"bits": val} if isinstance(val, int) else dict(val)
        unknown = set(val) - _SPEC_KEYS
        if unknown:
            raise SpecResolutionError(f"{origin}: entry {name!r} has unknown fields {sorted(unknown)}; "
                                      f"allowed {sorted(_SPEC_KEYS)}")
        out[str(name)] = val
    return out


def quantized_weights(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """{module name: QuantizedWeight} for every module a vllm-slq modifier quantized."""
    return {name: m.slq_quantized for name, m in model.named_modules() if isinstance(getattr(m, QUANTIZED_ATTR, None), QuantizedWeight)}


def _ct_weight_args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    if spec.group_size is None:
        return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="channel")
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                            group_size=spec.group_size)


@torch.no_grad()
def attach_compressed_tensors_params(module: torch.nn.Linear, qw: QuantizedWeight, name: str) -> None:
    """Give ``module`` the compressed-tensors scheme and qparams of ``qw`` (FROZEN),
    as llmcompressor's own quantizers leave them, so ModelCompressor can pack it."""
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    scheme = QuantizationScheme(targets=[name], weights=_ct_weight_args(qw.spec))
    initialize_module_for_quantization(module, scheme, force_zero_point=False)
    module.weight_scale.data.copy_(qw.scale.to(device=module.weight_scale.device, dtype=module.weight_scale.dtype)
                                   .view_as(module.weight_scale))
    if qw.zero_point is not None:
        module.weight_zero_point.data.copy_(qw.zero_point.to(device=module.weight_zero_point.device,
                                                              dtype=module.weight_zero_point.dtype)
                                            .view_as(module.weight_zero_point))
    module.quantization_status = QuantizationStatus.FROZEN


class LayerwiseQuantModifier(Modifier):
    """Base for vllm-slq weight-only quantizers; subclasses implement quantize_module.

    Fields (all settable from YAML):
      bits, group_size (null = per-channel), symmetric: the default QuantSpec
      targets / ignore: compressed-tensors match strings ("Linear", names, "re:...")
      layer_specs: per-layer overrides {name: {bits, group_size, symmetric}} or a
                   path to a JSON/YAML file holding them (e.g. an RCO allocation)
      attach_compressed_tensors: also leave compressed-tensors qparams on the module
    """

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = False
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    layer_specs: Optional[dict[str, Any] | str] = None
    attach_compressed_tensors: bool = True
    # the dtype scales are rounded to (and stored in): the checkpoint's; None takes the
    # module's half-precision dtype (fp16 for an fp32 module)
    scale_dtype: Optional[str] = None

    # subclasses that need H set this True (and requires_calibration_data = True)
    needs_hessian: ClassVar[bool] = False

    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _specs: dict[str, QuantSpec] = PrivateAttr(default_factory=dict)
    _hessians: dict[str, GPTQ] = PrivateAttr(default_factory=dict)
    # the input each accumulator last added, held so that a same-address test means same tensor
    _hessian_input: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _hessian_owner: dict[str, str] = PrivateAttr(default_factory=dict)
    _hessian_reduced: set[str] = PrivateAttr(default_factory=set)  # owners whose H is all-reduced
    _quantized: dict[str, QuantizedWeight] = PrivateAttr(default_factory=dict)

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("scale_dtype")
    @classmethod
    def _half_scale_dtype(cls, v):
        if v is not None and v not in ("float16", "bfloat16"):
            raise ValueError(f"scale_dtype {v!r}: scales are stored as 'float16' or 'bfloat16'")
        return v

    # ---- what subclasses implement -------------------------------------------------

    def quantize_module(self, name: str, module: torch.nn.Linear, H: Optional[torch.Tensor],
                        spec: QuantSpec) -> QuantizedWeight:
        raise NotImplementedError

    # ---- public helpers -------------------------------------------------------------

    @property
    def default_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def quantized(self) -> dict[str, QuantizedWeight]:
        """{module name: QuantizedWeight} quantized by this modifier so far."""
        return dict(self._quantized)

    def spec_for(self, name: str) -> QuantSpec:
        return self._specs[name]

    def scale_dtype_for(self, module: torch.nn.Module) -> torch.dtype:
        """Scales are rounded to the dtype they will be stored in: scale_dtype when set (the
        pipeline sets the checkpoint's), else the module's half-precision dtype (fp16 for fp32)."""
        if self.scale_dtype is not None:
            return getattr(torch, self.scale_dtype)
        dt = module.weight.dtype
        return dt if dt in (torch.float16, torch.bfloat16) else torch.float16

    # ---- spec resolution ------------------------------------------------------------

    def _resolve_specs(self, named: list[tuple[str, torch.nn.Module]]) -> dict[str, QuantSpec]:
        overrides = load_layer_specs(self.layer_specs) if self.layer_specs is not None else {}
        base = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        names = [n for n, _ in named]
        per_layer: dict[str, dict] = {n: dict(base) for n in names}
        # patterns first (in file order), then exact names, so a named layer always wins
        unused = []
        for key, val in sorted(overrides.items(), key=lambda kv: not kv[0].startswith("re:")):
            if key.startswith("re:"):
                pat = re.compile(key[3:])
                hits = [n for n in names if pat.search(n)]
            else:
                hits = [key] if key in per_layer else []
            if not hits:
                unused.append(key)
            for n in hits:
                per_layer[n].update(val)
        if unused:
            sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise SpecResolutionError(
                f"{type(self).__name__}.layer_specs names {len(unused)} module(s) that are not quantization "
                f"targets: {unused[:8]}{' ...' if len(unused) > 8 else ''} (targets look like: {sample})")
        specs = {}
        for (n, m) in named:
            try:
                spec = QuantSpec(**per_layer[n])
            except (QuantSpecError, TypeError) as e:
                raise SpecResolutionError(f"{type(self).__name__}: spec for layer {n!r}: {e}") from e
            try:
                spec.groups(m.weight.shape[1], n)  # the message names the layer
            except QuantSpecError as e:
                raise SpecResolutionError(f"{type(self).__name__}: {e}") from e
            specs[n] = spec
        return specs

    # ---- lifecycle ------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        data = getattr(state, "data", None)
        if self.needs_hessian and data is not None and getattr(data, "calib", None) is None:
            # without this, llmcompressor's sequential pipeline fails later with a bare TypeError
            raise ValueError(f"{type(self).__name__} needs calibration data: pass dataset=... "
                             "(and num_calibration_samples / max_seq_length) to oneshot")
        named = [(n, m) for n, m in match_named_modules(state.model, self.targets, self.ignore)
                 if isinstance(m, torch.nn.Linear)]
        if not named:
            raise ValueError(f"{type(self).__name__}: no Linear module matches targets={self.targets} "
                             f"ignore={self.ignore}")
        self._names = {m: n for n, m in named}
        self._specs = self._resolve_specs(named)
        self._hessians = {}
        self._quantized = {}
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if not self.needs_hessian:
            return
        self._hessians, self._hessian_input, self._hessian_owner = {}, {}, {}
        self._hessian_reduced = set()
        for module in self._names:
            self.register_hook(module, self._accumulate_hessian, "forward")

    @staticmethod
    def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
        return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                and a.dtype == b.dtype and a.device == b.device)

    def _accumulate_hessian(self, module: torch.nn.Module, args, _output):
        name, x = self._names[module], args[0].detach()
        owner = self._hessian_owner.get(name)
        if owner is None:  # first input of this module: share a sibling's accumulator if it read x
            owner = next((o for o, held in self._hessian_input.items() if self._same_tensor(held, x)), name)
            self._hessian_owner[name] = owner
            if owner == name:
                self._hessians[name] = GPTQ(module.weight.shape[1], layer=name, device=module.weight.device)
            else:
                self._hessians[name] = self._hessians[owner]
                return
        if owner != name:  # the owner added this batch; held alive, so equal address means the same tensor
            if not self._same_tensor(self._hessian_input[owner], x):
                raise RuntimeError(f"{type(self).__name__}: layer {name!r} shared the Hessian of {owner!r} "
                                   "because both read the same input tensor on the first calibration batch, "
                                   "but a later batch gave them different inputs")
            return
        self._hessians[name].add_batch(x)
        self._hessian_input[name] = x

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module] = (), **kwargs):
        for module in modules:
            name = self._names.get(module)
            if name is not None and name not in self._quantized:
                self._quantize_and_write(name, module)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        for module, name in self._names.items():
            if name in self._quantized:
                continue
            # a target outside every traced subgraph: quantize it now if we can
            if self.needs_hessian and (name not in self._hessians or self._hessians[name].nsamples == 0):
                continue  # reported by on_finalize
            self._quantize_and_write(name, module)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        missing = [n for n in self._names.values() if n not in self._quantized]
        self._hessians, self._hessian_input, self._hessian_owner = {}, {}, {}
        self._hessian_reduced = set()
        if missing:
            hint = " (it needs calibration data: pass a dataset to oneshot)" if self.needs_hessian else ""
            raise ValueError(f"{type(self).__name__} failed to quantize {len(missing)} module(s){hint}: "
                             f"{missing[:8]}")
        return True

    @staticmethod
    @torch.no_grad()
    def _all_reduce_hessian(acc: GPTQ) -> None:
        """Data-parallel calibration (torchrun): every rank saw its own shard of the tokens;
        H = sum_r n_r H_r / sum_r n_r, the Hessian of all of them, identical on every rank."""
        stats = torch.tensor([float(acc.nsamples)], dtype=torch.float64, device=acc.H.device)
        acc.H.mul_(acc.nsamples)
        dist.all_reduce(acc.H)
        dist.all_reduce(stats)
        acc.nsamples = int(stats.item())
        acc.H.div_(max(acc.nsamples, 1))

    @torch.no_grad()
    def _quantize_and_write(self, name: str, module: torch.nn.Linear) -> None:
        H = None
        if self.needs_hessian:
            acc = self._hessians.get(name)
            if acc is None or acc.nsamples == 0:
                raise ValueError(f"{type(self).__name__}: layer {name!r} saw no calibration inputs; "
                                 "pass a dataset to oneshot")
            owner = self._hessian_owner[name]
            if is_distributed() and owner not in self._hessian_reduced:  # once per shared accumulator
                self._all_reduce_hessian(acc)
                self._hessian_reduced.add(owner)
            H = acc.H
        spec = self._specs[name]
        qw = self.quantize_module(name, module, H, spec)
        if not isinstance(qw, QuantizedWeight) or qw.codes.shape != module.weight.shape or qw.spec != spec:
            raise RuntimeError(f"{type(self).__name__}.quantize_module returned a bad result for layer {name!r}")
        # the sequential pipeline propagates this weight to the next layer's inputs
        module.weight.data.copy_(qw.dequantize(module.weight.dtype).to(module.weight.device))
        qw = QuantizedWeight(codes=qw.codes.cpu(), scale=qw.scale.cpu(),
                             zero_point=None if qw.zero_point is None else qw.zero_point.cpu(),
                             spec=qw.spec, meta={**qw.meta, "layer": name})
        qw.meta.setdefault("method", type(self).__name__)
        setattr(module, QUANTIZED_ATTR, qw)
        self._quantized[name] = qw
        if self.attach_compressed_tensors:
            attach_compressed_tensors_params(module, qw, name)
        # free K x K memory as soon as the layer (and every layer sharing its H) is done
        self._hessians.pop(name, None)
        self._hessian_input.pop(name, None)
        logger.debug(f"{type(self).__name__}: quantized {name} as {spec.short()}")
