"""Lion with decoupled weight decay, and the per-step schedules GSQ uses (docs/methods.md section 3).

    u = sign(b1 m + (1 - b1) g);  p <- p (1 - lr wd) - lr u;  m <- b2 m + (1 - b2) g
    linear_schedule: tau 2.0 -> 0.05 and kappa 100 -> 500, per step
    cosine_lr: lr decays to final_fraction * lr
"""
from __future__ import annotations

import math

import torch

__all__ = ["Lion", "cosine_lr", "linear_schedule"]


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """Linear interpolation start -> end over steps 0..total-1 (per step, as in the paper)."""
    if total <= 1:
        return end
    t = min(max(step, 0), total - 1) / (total - 1)
    return start + (end - start) * t


def cosine_lr(base_lr: float, step: int, total: int, final_fraction: float = 0.1) -> float:
    """Cosine decay from base_lr to final_fraction * base_lr over total steps."""
    if total <= 1:
        return base_lr
    t = min(max(step, 0), total - 1) / (total - 1)
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay.

    u = sign(b1 * m + (1 - b1) * g); p <- p (1 - lr wd) - lr u; m <- b2 m + (1 - b2) g.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                # lerp: b1 m + (1 - b1) g and b2 m + (1 - b2) g in one pass each
                update = torch.lerp(p.grad, m, b1).sign_()
                p.add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - b2)
        return loss
