"""GSQModifier: Gumbel-Softmax refinement of GPTQ codes and scales, per decoder layer.

The llmcompressor adapter over vllm_slq.quant.gsq (docs/methods.md section 3). In the
sequential pipeline, for every decoder layer ("block"):

  calibration pass    forward hooks accumulate each target Linear's Hessian (base
                      class) and a pre-hook/forward hook on the block cache its
                      inputs (already quantized-propagated) and its FP output
  sequential_epoch_end
      1. GPTQ init on the layer's grid (symmetric, or asymmetric with integer zero
         points that stay fixed): vllm_slq.quant.gptq.gptq_quantize
         (ternary: vllm_slq.quant.gsq_ternary.gptq_ternary, codes {-1,0,1})
      2. GSQ refinement of the block's target Linears *jointly*: loss = MSE between
         the block output with the soft weights and the cached FP output, on the
         cached inputs (vllm_slq.quant.gsq.refine; the block runs in its own dtype
         with every llmcompressor hook disabled, its target Linears reading the
         soft weights)
      3. hard argmax codes x learned scales (rounded to the stored scale dtype) are
         written back through the base class (module.weight, module.slq_quantized,
         compressed-tensors qparams); the pipeline then propagates the quantized
         block's outputs to the next block.

Defaults follow the paper: MLP gate/up/down quantized and refined, attention kept
in high precision (``include_attention: true`` quantizes and refines q/k/v/o too).
Per-layer bits (mixed 2/3/4-bit) come from ``layer_specs`` (an RCO allocation
artifact), as for every vllm-slq modifier, at any width 2-8, symmetric or asymmetric.

Storage: the true bit width (2-bit codes packed as 2-bit). Ternary is stored on the
2-bit symmetric grid (codes in {-1, 0, 1}, the -2 code unused), i.e. 2 bits/weight.

YAML:
    quant_stage:
      quant_modifiers:
        GSQModifier: {bits: 2, group_size: 64, epochs: 4, batch_size: 8}
"""
from __future__ import annotations

import math
import time
from typing import ClassVar, Literal, Optional

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from vllm_slq.quant.gptq import gptq_quantize
from vllm_slq.quant.gsq import GSQConfig
from vllm_slq.quant.gsq_ternary import gptq_ternary
from vllm_slq.quant.gsq_block import first_output, refine_block
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec

from .base import LayerwiseQuantModifier, SpecResolutionError

__all__ = ["GSQModifier", "MLP_TARGETS", "ATTENTION_TARGETS"]

# every Linear under a decoder block's MLP / attention module, whatever the architecture
# calls its projections (Llama's gate/up/down_proj, GPT-NeoX's dense_h_to_4h, Phi-3's
# fused gate_up_proj, ...); only nn.Linear modules are taken (LayerwiseQuantModifier)
MLP_TARGETS = ["re:.*\\.mlp\\.[^.]+$"]
ATTENTION_TARGETS = ["re:.*\\.(self_attn|attention|attn)\\.[^.]+$"]


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class GSQModifier(LayerwiseQuantModifier):
    """GSQ (Gumbel-Softmax scalar quantization), block by block, on a symmetric grid (the
    paper's) or an asymmetric one (``symmetric: false``: GPTQ's zero points kept, codes and
    scales refined).

    Grid: bits (2..8), group_size, ternary (codes {-1,0,1} on the 2-bit grid).
    Targets: MLP gate/up/down by default; include_attention adds q/k/v/o.
    GPTQ init: block_size, dampening_frac, scale_search, act_order (as SLQGPTQModifier).
    GSQ: epochs, batch_size (cached calibration batches per optimiser step),
      tau_start/tau_end, kappa_start/kappa_end (linear per step), logit_lr +
      logit_weight_decay and scale_lr (Lion, betas), final_lr_fraction (cosine),
      init_std/init_strength (logit prior), seed,
      keep_init_if_worse (fall back to the GPTQ init for a block whose refined hard
      weights have a larger block-output MSE on the calibration data).
    block_types: class names of the decoder blocks (default: the model's
      _no_split_modules, which is what the sequential pipeline splits on).
    """

    requires_calibration_data: bool = True
    needs_hessian: ClassVar[bool] = True

    bits: int = 2
    group_size: Optional[int] = 128
    symmetric: bool = True
    targets: list[str] = Field(default_factory=lambda: list(MLP_TARGETS))
    include_attention: bool = False
    ternary: bool = False

    block_size: int = 128
    dampening_frac: float = 0.01
    scale_search: Literal["minmax", "mse", "hessian"] = "hessian"
    act_order: bool = False

    epochs: int = GSQConfig.epochs
    batch_size: int = GSQConfig.batch_size
    tau_start: float = GSQConfig.tau_start
    tau_end: float = GSQConfig.tau_end
    kappa_start: float = GSQConfig.kappa_start
    kappa_end: float = GSQConfig.kappa_end
    logit_lr: float = GSQConfig.logit_lr
    logit_weight_decay: float = GSQConfig.logit_weight_decay
    scale_lr: float = GSQConfig.scale_lr
    betas: tuple[float, float] = GSQConfig.betas
    final_lr_fraction: float = GSQConfig.final_lr_fraction
    init_std: float = GSQConfig.init_std
    init_strength: float = GSQConfig.init_strength
    init_keeps_codes: bool = GSQConfig.init_keeps_codes
    seed: int = 0
    keep_init_if_worse: bool = True
    block_types: Optional[list[str]] = None

    _block_of: dict[str, str] = PrivateAttr(default_factory=dict)  # linear name -> block name
    _blocks: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _block_names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _cache: dict[str, list] = PrivateAttr(default_factory=dict)  # block -> [(args, kwargs, fp_out)]
    _pending: dict[str, list] = PrivateAttr(default_factory=dict)  # block -> [(args, kwargs)] awaiting output
    _refined: dict[str, QuantizedWeight] = PrivateAttr(default_factory=dict)
    _stats: dict[str, dict] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_grid(self):
        if self.ternary and not self.symmetric:
            raise ValueError("GSQModifier: ternary codes {-1, 0, 1} are symmetric; set symmetric: true")
        if self.ternary and self.bits != 2:
            raise ValueError(f"GSQModifier: ternary codes are stored on the 2-bit grid; set bits: 2 (got {self.bits})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("GSQModifier: epochs and batch_size must be >= 1")
        return self

    # ---- configuration ---------------------------------------------------------------

    def gsq_config(self, seed: int = 0) -> GSQConfig:
        return GSQConfig(
            tau_start=self.tau_start, tau_end=self.tau_end, kappa_start=self.kappa_start, kappa_end=self.kappa_end,
            logit_lr=self.logit_lr, logit_weight_decay=self.logit_weight_decay, scale_lr=self.scale_lr,
            betas=tuple(self.betas), final_lr_fraction=self.final_lr_fraction, init_std=self.init_std,
            init_strength=self.init_strength, init_keeps_codes=self.init_keeps_codes, epochs=self.epochs,
            batch_size=self.batch_size, seed=seed,
        )

    @property
    def stats(self) -> dict[str, dict]:
        """Per block: init/final block-output MSE, steps, seconds, peak state bytes."""
        return dict(self._stats)

    # ---- lifecycle -------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        if self.include_attention:
            self.targets = list(dict.fromkeys(list(self.targets) + ATTENTION_TARGETS))
        super().on_initialize(state, **kwargs)
        bad = {n: s.short() for n, s in self._specs.items() if self.ternary and (s.bits != 2 or not s.symmetric)}
        if bad:
            raise SpecResolutionError(f"GSQModifier: ternary layer specs must be symmetric 2-bit; "
                                      f"got {dict(list(bad.items())[:6])}")
        model = state.model
        types = self.block_types or list(getattr(model, "_no_split_modules", None) or [])
        if not types:
            raise ValueError("GSQModifier: cannot tell the decoder blocks apart; set block_types "
                             "(e.g. [LlamaDecoderLayer])")
        blocks = {n: m for n, m in model.named_modules() if type(m).__name__ in types}
        if not blocks:
            raise ValueError(f"GSQModifier: no module of type {types} in the model (set block_types)")
        self._blocks, self._block_names, self._block_of = {}, {}, {}
        for name in self._names.values():
            owner = max((b for b in blocks if name.startswith(b + ".")), key=len, default=None)
            if owner is None:
                logger.warning(f"GSQModifier: {name} lies in no decoder block; it gets GPTQ only")
                continue
            self._block_of[name] = owner
            self._blocks[owner] = blocks[owner]
            self._block_names[blocks[owner]] = owner
        self._cache, self._pending, self._refined, self._stats = {}, {}, {}, {}
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        for block in self._blocks.values():
            self.register_hook(block, self._cache_input, "forward_pre", with_kwargs=True)
            self.register_hook(block, self._cache_output, "forward")

    def _cache_input(self, module, args, kwargs):
        name = self._block_names[module]
        if self._done(name):
            return
        self._pending.setdefault(name, []).append((_detach(args), _detach(kwargs)))

    def _cache_output(self, module, _args, output):
        name = self._block_names[module]
        pending = self._pending.get(name)
        if not pending:
            return
        args, kwargs = pending.pop()
        self._cache.setdefault(name, []).append((args, kwargs, _detach(first_output(output))))

    def _done(self, block: str) -> bool:
        return all(n in self._quantized for n, b in self._block_of.items() if b == block)

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module] = (), **kwargs):
        for module in modules:
            block = self._block_names.get(module)
            if block is not None and not self._done(block) and self._cache.get(block):
                self._refine_block(block)
        super().on_sequential_epoch_end(state, event, modules=modules, **kwargs)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._cache.clear()
        self._pending.clear()

    def quantize_module(self, name: str, module: torch.nn.Linear, H: Optional[torch.Tensor],
                        spec: QuantSpec) -> QuantizedWeight:
        if name in self._refined:
            return self._refined.pop(name)
        return self._init_weight(name, module, H, spec)  # outside every block: GPTQ only

    # ---- the work --------------------------------------------------------------------

    def _init_weight(self, name: str, module: torch.nn.Linear, H: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        sdt = self.scale_dtype_for(module)
        if self.ternary:
            return gptq_ternary(module.weight.data, H, spec.effective_group(module.weight.shape[1]), layer=name,
                                percdamp=self.dampening_frac, blocksize=self.block_size, scale_dtype=sdt)
        return gptq_quantize(module.weight.data, H, spec, layer=name, percdamp=self.dampening_frac,
                             blocksize=self.block_size, scale_search=self.scale_search, scale_dtype=sdt,
                             act_order=self.act_order,
                             negative_scale=False)

    def _refine_block(self, block_name: str) -> None:
        t0 = time.perf_counter()
        block = self._blocks[block_name]
        names = [n for n, b in self._block_of.items() if b == block_name and n not in self._quantized]
        modules = {n: m for m, n in self._names.items() if n in names}
        device = next(block.parameters()).device
        dtype = next(block.parameters()).dtype  # the block runs in its own dtype
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            mem0 = torch.cuda.memory_allocated(device)
        inits = {}
        for n in names:
            acc = self._hessians.get(n)
            if acc is None or acc.nsamples == 0:
                raise ValueError(f"GSQModifier: layer {n!r} saw no calibration inputs; pass a dataset to oneshot")
            inits[n] = self._init_weight(n, modules[n], acc.H, self._specs[n])
        items = self._cache.pop(block_name)
        with HooksMixin.disable_hooks():
            refined = refine_block(block, {n: modules[n] for n in names}, inits, items, self.gsq_config(),
                                   block_index=list(self._blocks).index(block_name), seed=self.seed, dtype=dtype,
                                   ternary=self.ternary, keep_init_if_worse=self.keep_init_if_worse)
        res, gsq = refined.result, refined.weights
        # + logit gradient and Lion moment, + y*(d-e) kept between a step's forward and backward when saved
        state_bytes = sum(w.state_bytes() + (2 + (not w.ternary and w.logits.numel() <= w.save_elems)) * w.logits.numel() * 4
                          for w in gsq.values())
        for n, w in gsq.items():
            qw = w.to_quantized()
            sdt = self.scale_dtype_for(modules[n])
            # scales are stored in half precision: round now so propagation sees the stored weight
            qw = QuantizedWeight(qw.codes, qw.scale.to(sdt), qw.zero_point, qw.spec,
                                 meta={**qw.meta, "gsq_init_mse": res.init_hard_loss,
                                       "gsq_final_mse": res.final_hard_loss, "gsq_kept": res.kept})
            self._refined[n] = qw
        stats = {
            "linears": names,
            "init_mse": res.init_hard_loss,
            "final_mse": res.final_hard_loss,
            "kept": res.kept,
            "steps": res.steps,
            "items": len(items),
            "seconds": time.perf_counter() - t0,
            # logits + Lion moment + logit gradient (+ saved y*(d-e)), fp32 each, + base/q0 codes + scales
            "gsq_state_bytes": state_bytes,
            "first_loss": res.losses[0] if res.losses else math.nan,
            "last_loss": res.losses[-1] if res.losses else math.nan,
        }
        if cuda:
            stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - mem0
        self._stats[block_name] = stats
        logger.info(f"GSQ {block_name}: block-output MSE {res.init_hard_loss:.4g} (GPTQ) -> "
                    f"{res.final_hard_loss:.4g} ({res.kept}), {res.steps} steps, {stats['seconds']:.1f}s")
        del gsq, items
