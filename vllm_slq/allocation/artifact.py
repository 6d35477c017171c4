"""The allocation artifact: a small, human-editable JSON/YAML file.

    {
      "method": "rco", "budget_bpp": 4.5, "achieved_bpp": 4.4871,
      "total_params": 106168320,
      "layer_specs": {"model.layers.0.self_attn.q_proj": {"bits": 5, "group_size": 64, "symmetric": false}, ...},
      "module_bpp":  {"model.layers.0.self_attn.q_proj": 5.3281, ...},
      "groups":      {"model.layers.0.self_attn.q_proj+k_proj+v_proj": ["...q_proj", "...k_proj", "...v_proj"], ...},
      "extra": {...}
    }

`layer_specs` is exactly what the SLQ/GSQ modifiers' `layer_specs` field takes
(module name -> {bits, group_size, symmetric}; vllm_slq.modifiers.base.load_layer_specs
accepts the whole file, it unwraps "layer_specs"). A user may edit it; load_allocation
recomputes the achieved bpp from the edited specs (module_bpp is informational),
checks that tied modules still agree, and says which module/field is wrong.
Writes are atomic (vllm_slq.fileio).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from vllm_slq.fileio import atomic_write
from vllm_slq.quant.spec import QuantSpec, QuantSpecError

from .problem import AllocationProblem, exact_cost_bits


class AllocationArtifactError(ValueError):
    """A malformed or inconsistent allocation file."""


@dataclass
class Allocation:
    layer_specs: dict[str, QuantSpec]
    method: str = "manual"
    budget_bpp: Optional[float] = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def achieved_bpp(self) -> float:
        if not self.shapes:
            raise AllocationArtifactError("achieved_bpp needs module shapes (the artifact's module_params)")
        bits = sum(exact_cost_bits(self.layer_specs[n], *self.shapes[n], n) for n in self.layer_specs)
        params = sum(self.shapes[n][0] * self.shapes[n][1] for n in self.layer_specs)
        return bits / params

    def as_layer_specs(self) -> dict[str, dict]:
        """The modifiers' layer_specs mapping."""
        return {n: {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}
                for n, s in self.layer_specs.items()}


def allocation_from_choice(problem: AllocationProblem, choice: Sequence[int], method: str,
                           budget_bpp: Optional[float], extra: Optional[dict] = None) -> Allocation:
    specs = problem.module_specs(choice)
    shapes = {m.name: (m.out_features, m.in_features) for g in problem.groups for m in g.modules}
    groups = {g.name: [m.name for m in g.modules] for g in problem.groups}
    return Allocation(specs, method, budget_bpp, groups, dict(extra or {}), shapes)


def to_dict(alloc: Allocation) -> dict:
    d = {"method": alloc.method, "budget_bpp": alloc.budget_bpp}
    if alloc.shapes:
        d["achieved_bpp"] = round(alloc.achieved_bpp(), 6)
        d["total_params"] = sum(a * b for a, b in alloc.shapes.values())
    d["layer_specs"] = alloc.as_layer_specs()
    if alloc.shapes:
        d["module_bpp"] = {n: round(s.bpp(alloc.shapes[n][1]), 6) for n, s in alloc.layer_specs.items()}
        d["module_shapes"] = {n: list(alloc.shapes[n]) for n in alloc.layer_specs}
    d["groups"] = alloc.groups
    d["extra"] = alloc.extra
    return d


def save_allocation(alloc: Allocation, path: Union[str, Path]) -> Path:
    """Write JSON (or YAML for .yaml/.yml) atomically."""
    path = Path(path)
    data = to_dict(alloc)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=1)
    atomic_write(path, text)
    return path


def load_allocation(path: Union[str, Path]) -> Allocation:
    path = Path(path)
    if not path.is_file():
        raise AllocationArtifactError(f"allocation file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - report the parser's reason with the file name
        raise AllocationArtifactError(f"{path}: cannot parse ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("layer_specs"), dict):
        raise AllocationArtifactError(f"{path}: expected a mapping with a 'layer_specs' mapping")
    specs = {}
    for name, entry in data["layer_specs"].items():
        if not isinstance(entry, dict) or "bits" not in entry:
            raise AllocationArtifactError(f"{path}: layer_specs[{name!r}] needs at least 'bits'")
        unknown = set(entry) - {"bits", "group_size", "symmetric"}
        if unknown:
            raise AllocationArtifactError(f"{path}: layer_specs[{name!r}] has unknown fields {sorted(unknown)}")
        try:
            specs[name] = QuantSpec(bits=entry["bits"], group_size=entry.get("group_size", 128),
                                    symmetric=bool(entry.get("symmetric", False)))
        except QuantSpecError as e:
            raise AllocationArtifactError(f"{path}: layer_specs[{name!r}]: {e}") from e
    shapes = {}
    for name, shp in (data.get("module_shapes") or {}).items():
        if name in specs:
            shapes[name] = (int(shp[0]), int(shp[1]))
    groups = data.get("groups") or {}
    for gname, members in groups.items():
        present = [m for m in members if m in specs]
        if len({(specs[m].bits, specs[m].group_size, specs[m].symmetric) for m in present}) > 1:
            raise AllocationArtifactError(
                f"{path}: tied group {gname!r} has different specs across {present}; "
                f"fused modules must share bits/group_size/symmetric")
    alloc = Allocation(specs, data.get("method", "manual"), data.get("budget_bpp"), groups,
                       data.get("extra") or {}, shapes if len(shapes) == len(specs) else {})
    if alloc.shapes:
        for n, s in specs.items():
            try:
                s.groups(alloc.shapes[n][1], n)
            except QuantSpecError as e:
                raise AllocationArtifactError(f"{path}: {e}") from e
    return alloc
