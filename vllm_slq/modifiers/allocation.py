"""Allocation stage for llmcompressor recipes (thin; the math is vllm_slq.allocation).

The allocation runs *before* quantization and hands its result to the SLQ/GSQ
modifiers through their ``layer_specs`` field, either in memory or as the
editable artifact file:

    alloc = allocate_model(model, calibration_tokens, budget_bpp=4.5, out="alloc.json")
    oneshot(model=..., recipe=[SLQGPTQModifier(layer_specs="alloc.json", ...)], ...)

It is a stage function rather than a Modifier because the search needs many
forward/backward passes of the *whole* model with candidate weights, which the
sequential (per-block) calibration pipeline cannot provide.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from vllm_slq.allocation.artifact import Allocation, allocation_from_choice, save_allocation
from vllm_slq.allocation.baselines import (EvolutionConfig, evolution_allocate, proxy_dp_allocate,
                                           uniform_allocate)
from vllm_slq.allocation.engine import AllocationEngine
from vllm_slq.allocation.objective import ModelKLObjective, build_candidates, collect_hessians, proxy_errors
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.allocation.rco import RCOConfig
from vllm_slq.quant.spec import QuantSpec

DEFAULT_OPTIONS = tuple(QuantSpec(b, 64, False) for b in range(2, 9))


def allocate_model(model: torch.nn.Module, tokens: torch.Tensor, budget_bpp: float,
                   method: str = "rco", options: Sequence[QuantSpec] = DEFAULT_OPTIONS,
                   database: str = "gptq", tie_fused: bool = True, ignore: Sequence[str] = ("lm_head",),
                   rco: RCOConfig = RCOConfig(), evolution: EvolutionConfig = EvolutionConfig(),
                   out: Optional[Union[str, Path]] = None) -> Allocation:
    """Choose per-layer specs for `model` at `budget_bpp` with `method`
    ("rco", "evolution", "proxy_dp" or "uniform"); optionally save the artifact to `out`."""
    problem = AllocationProblem(group_linears(linear_shapes(model, ignore=ignore), tie_fused), options)
    problem.check_budget(budget_bpp)  # fail before any expensive work
    if method == "uniform":
        res = uniform_allocate(problem, budget_bpp)
    else:
        H = collect_hessians(model, problem.module_names(), tokens)
        cands = build_candidates(model, problem, H if database == "gptq" else None, database)
        errors = proxy_errors(model, problem, cands, H)
        if method == "proxy_dp":
            res = proxy_dp_allocate(problem, budget_bpp, errors)
        elif method in ("rco", "evolution"):
            obj = ModelKLObjective(model, problem, cands, tokens)
            if method == "rco":
                res = AllocationEngine(problem, obj, rco=rco,
                                       sensitivity_batches=min(4, tokens.shape[0])).allocate(budget_bpp)
            else:
                start = proxy_dp_allocate(problem, budget_bpp, errors).choice
                stages = [1, tokens.shape[0]]
                res = evolution_allocate(problem, budget_bpp, lambda ch, s: obj.evaluate(ch, stages[min(s, 1)]),
                                         start, evolution)
        else:
            raise ValueError(f"unknown allocation method {method!r} (rco, evolution, proxy_dp, uniform)")
    alloc = allocation_from_choice(problem, res.choice, method, budget_bpp, extra={"wall_s": res.wall_s})
    if out is not None:
        save_allocation(alloc, out)
    return alloc
