"""GSQ on one decoder block: the glue between the math of quant/gsq.py and a model.

GSQ's loss (docs/methods.md section 3) is the block-output MSE with the soft weights
of some of the block's linears against the full-precision block's output on the
same inputs. This module is the one place that wires that up, for the modifier
(modifiers/gsq.py, inside llmcompressor's pipeline) and the benchmark
(benchmarks/gsq_block.py):

  * ``weight_seed``: the seed of each refined weight's logit init (one formula);
  * ``soft_linears``: while active, the chosen nn.Linear modules read their weight
    from a dict the refinement fills (not torch.func.functional_call: llmcompressor
    wraps parameters in an OffloadCache, and assigning a tensor there copies it
    *into* the parameter);
  * ``refine_block``: GSQWeights from initial quantized weights, the loss, and
    quant.gsq.refine; optionally the hard-weight loss on held-out items before and
    after.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch

from .gsq import GSQConfig, GSQWeight, RefineResult, hard_loss, refine
from .spec import QuantizedWeight


def weight_seed(seed: int, block_index: int, weight_index: int) -> int:
    """Seed of the logit init of the weight_index-th refined linear in block block_index."""
    return seed * 1_000_003 + block_index * 101 + weight_index


def refine_seed(seed: int, block_index: int) -> int:
    """Seed of the refinement's Gumbel draws in block block_index."""
    return seed * 7 + block_index


def first_output(out):
    """A decoder layer returns a tensor or a tuple whose first entry is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _soft_linear(module: torch.nn.Linear, current: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, current[name], module.bias)


@contextmanager
def soft_linears(modules: Mapping[str, torch.nn.Linear], current: dict) -> Iterator[None]:
    """Within the block, modules[name] computes x @ current[name]^T + bias; restored on exit."""
    saved = {n: m.__dict__.get("forward") for n, m in modules.items()}
    for n, m in modules.items():
        m.forward = functools.partial(_soft_linear, m, current, n)
    try:
        yield
    finally:
        for n, m in modules.items():
            if saved[n] is None:
                del m.forward
            else:
                m.forward = saved[n]
        current.clear()


@dataclass
class BlockRefinement:
    result: RefineResult
    weights: dict[str, GSQWeight]
    heldout_init: float = float("nan")  # hard-weight loss on held-out items, at the init codes
    heldout_final: float = float("nan")  # ... and at the refined codes


def refine_block(block: torch.nn.Module, modules: Mapping[str, torch.nn.Linear],
                 inits: Mapping[str, QuantizedWeight], items: Sequence, config: GSQConfig, *,
                 block_index: int, seed: int, dtype: torch.dtype, ternary: bool = False,
                 keep_init_if_worse: bool = True, heldout: Optional[Sequence] = None) -> BlockRefinement:
    """Refine modules' weights jointly against block's output MSE.

    items (and heldout): (args, kwargs, fp_output) of the block per calibration sequence.
    inits: each module's initial quantized weight (GPTQ codes and scales). config's
    init_std / init_strength set the logit prior; its seed is replaced by refine_seed.
    """
    weights = {n: GSQWeight(inits[n], ternary=ternary, init_std=config.init_std,
                            init_strength=config.init_strength, init_keeps_codes=config.init_keeps_codes,
                            seed=weight_seed(seed, block_index, i),
                            fp_weight=modules[n].weight.data.float(), name=n)
               for i, n in enumerate(modules)}
    current: dict[str, torch.Tensor] = {}

    def block_loss(w, item):
        args, kwargs, target = item
        current.update(w)
        out = first_output(block(*args, **kwargs))
        return torch.nn.functional.mse_loss(out.float(), target.float())

    cfg = GSQConfig(**{**vars(config), "seed": refine_seed(seed, block_index)})
    out = BlockRefinement(None, weights)
    with soft_linears(modules, current):
        if heldout:
            init_codes = {n: w.q0.clone() for n, w in weights.items()}
            out.heldout_init = hard_loss(weights, heldout, block_loss, dtype, codes=init_codes)
        with torch.enable_grad():
            out.result = refine(weights, items, block_loss, cfg, weight_dtype=dtype,
                                keep_init_if_worse=keep_init_if_worse)
        if heldout:
            out.heldout_final = hard_loss(weights, heldout, block_loss, dtype)
    return out
