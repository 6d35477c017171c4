"""The allocation problem: N groups (one choice each), K options, costs in true bits.

A *group* is a set of linear modules that must share one quantization choice
(vLLM fuses q/k/v and gate/up, so their bit widths are tied). An *option* is a
QuantSpec. The cost of option k for group i is the exact number of stored bits

    cost_bits[i, k] = sum_{m in i} N_m*K_m*b_k + N_m*(K_m/G_k)*(16 + [asym]*b_k)

which is an integer (this equals spec.bpp(K) * N * K, the "true bpp" of
docs/methods.md including scale and zero-point overhead). The model's bpp is
sum_i cost_bits[i, k_i] / sum_i params_i, i.e. the parameter-weighted mean of
the groups' bpp with weights w_i = n_i / sum n (paper: C(alpha) = sum_i w_i <p_i, c_i>).

Options that do not apply to a group (group size not dividing K) are marked
unavailable and never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from vllm_slq.quant.spec import SCALE_BITS, QuantSpec, QuantSpecError


class InfeasibleBudgetError(ValueError):
    """A budget outside [cheapest, richest] achievable bpp."""


@dataclass(frozen=True)
class LinearShape:
    name: str
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Group:
    """Modules that share one choice (a fused vLLM module, or a single linear)."""

    name: str
    modules: tuple[LinearShape, ...]

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)


def exact_cost_bits(spec: QuantSpec, out_features: int, in_features: int, layer: str = "") -> int:
    """Stored bits of one [N, K] weight under `spec` (integer; equals spec.bpp(K)*N*K)."""
    groups = spec.groups(in_features, layer)
    per_group = SCALE_BITS + (0 if spec.symmetric else spec.bits)
    bits = out_features * in_features * spec.bits + out_features * groups * per_group
    # Guard against spec.bpp drifting from this integer formula.
    assert abs(bits - spec.bpp(in_features) * out_features * in_features) < 1e-6 * bits
    return bits


class AllocationProblem:
    """Groups x options with exact integer costs; the shared input of every method."""

    def __init__(self, groups: Sequence[Group], options: Sequence[QuantSpec]):
        if not groups:
            raise ValueError("allocation problem needs at least one group")
        if not options:
            raise ValueError("allocation problem needs at least one option (QuantSpec)")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate group names in allocation problem: {names}")
        self.groups = list(groups)
        self.options = list(options)
        G, K = len(self.groups), len(self.options)
        self.cost_bits = np.zeros((G, K), dtype=np.int64)
        self.available = np.ones((G, K), dtype=bool)
        for i, g in enumerate(self.groups):
            if not g.modules:
                raise ValueError(f"group {g.name!r} has no modules")
            for k, spec in enumerate(self.options):
                try:
                    self.cost_bits[i, k] = sum(exact_cost_bits(spec, m.out_features, m.in_features, m.name)
                                               for m in g.modules)
                except QuantSpecError:
                    self.available[i, k] = False
            if not self.available[i].any():
                raise ValueError(f"group {g.name!r}: no option applies "
                                 f"(in_features {[m.in_features for m in g.modules]})")
        self.params = np.array([g.params for g in self.groups], dtype=np.int64)
        self.total_params = int(self.params.sum())

    # ----------------------------------------------------------------- sizes
    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_options(self) -> int:
        return len(self.options)

    def module_names(self) -> list[str]:
        return [m.name for g in self.groups for m in g.modules]

    # ----------------------------------------------------------- cost views
    def bpp_matrix(self) -> np.ndarray:
        """c[i, k]: bpp of group i under option k (float64; 0 where unavailable)."""
        c = self.cost_bits / self.params[:, None]
        return np.where(self.available, c, 0.0)

    def weights(self) -> np.ndarray:
        """w_i = n_i / sum n (float64)."""
        return self.params / self.total_params

    def torch_costs(self, dtype=torch.float64):
        """(c [G,K], w [G], mask [G,K]) as tensors for the manifold operations."""
        return (torch.tensor(self.bpp_matrix(), dtype=dtype), torch.tensor(self.weights(), dtype=dtype),
                torch.tensor(self.available))

    def feasible_range(self) -> tuple[float, float]:
        big = np.iinfo(np.int64).max
        lo = np.where(self.available, self.cost_bits, big).min(axis=1).sum()
        hi = np.where(self.available, self.cost_bits, -1).max(axis=1).sum()
        return lo / self.total_params, hi / self.total_params

    def check_budget(self, budget_bpp: float) -> None:
        lo, hi = self.feasible_range()
        if not np.isfinite(budget_bpp):
            raise InfeasibleBudgetError(f"budget must be a finite bpp, got {budget_bpp!r}")
        if budget_bpp < lo - 1e-12 or budget_bpp > hi + 1e-12:
            raise InfeasibleBudgetError(
                f"budget {budget_bpp:.4f} bpp is infeasible: achievable range with options "
                f"{[s.short() for s in self.options]} is [{lo:.4f}, {hi:.4f}] bpp")

    def budget_bits(self, budget_bpp: float) -> int:
        """Largest integer bit count whose bpp does not exceed the budget."""
        # small epsilon so a budget stated as an exactly achievable bpp is not lost to rounding
        return int(np.floor(budget_bpp * self.total_params + 1e-6))

    def bits_of(self, choice: Sequence[int]) -> int:
        choice = np.asarray(choice)
        if choice.shape != (self.n_groups,):
            raise ValueError(f"choice must have one entry per group ({self.n_groups}), got shape {choice.shape}")
        if not self.available[np.arange(self.n_groups), choice].all():
            bad = [self.groups[i].name for i in np.nonzero(~self.available[np.arange(self.n_groups), choice])[0]]
            raise ValueError(f"choice uses unavailable options for groups {bad}")
        return int(self.cost_bits[np.arange(self.n_groups), choice].sum())

    def achieved_bpp(self, choice: Sequence[int]) -> float:
        return self.bits_of(choice) / self.total_params

    def one_hot(self, choice: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        P = torch.zeros(self.n_groups, self.n_options, dtype=dtype)
        P[torch.arange(self.n_groups), torch.as_tensor(np.asarray(choice), dtype=torch.long)] = 1
        return P

    def module_specs(self, choice: Sequence[int]) -> dict[str, QuantSpec]:
        """Expand a per-group choice to a per-module spec (tied modules get the same spec)."""
        return {m.name: self.options[int(k)] for g, k in zip(self.groups, choice) for m in g.modules}


# Fused-module ties as vLLM builds them for Llama-style models.
FUSED_SUFFIXES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_linears(shapes: Iterable[LinearShape], tie_fused: bool = True) -> list[Group]:
    """Group linear shapes: q/k/v and gate/up of one block share a choice when tie_fused."""
    shapes = list(shapes)
    groups: dict[str, list[LinearShape]] = {}
    order: list[str] = []
    for s in shapes:
        prefix, _, leaf = s.name.rpartition(".")
        key = s.name
        if tie_fused:
            for fused in FUSED_SUFFIXES:
                if leaf in fused:
                    key = f"{prefix}.{'+'.join(fused)}" if prefix else "+".join(fused)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(s)
    return [Group(k, tuple(groups[k])) for k in order]


def linear_shapes(model: torch.nn.Module, targets: Optional[Sequence[str]] = None,
                  ignore: Sequence[str] = ("lm_head",)) -> list[LinearShape]:
    """Shapes of the model's nn.Linear modules (all but `ignore`, or only `targets`)."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if any(name == i or name.endswith("." + i) for i in ignore):
            continue
        if targets is not None and not any(t in name for t in targets):
            continue
        out.append(LinearShape(name, mod.out_features, mod.in_features))
    if not out:
        raise ValueError(f"no linear modules selected (targets={targets}, ignore={ignore})")
    return out
