"""SLQModifier: statistically-lossless quantization (docs/methods.md section 2).

    database   for every target Linear, asymmetric group-wise GPTQ at every width
               b in bits_options from ONE Hessian factorisation
               (vllm_slq.quant.database.build_database_sharded: under torchrun each
               rank quantizes its share of the rows, then all-gather); the sequential pipeline
               propagates the widest entry, so later layers calibrate on inputs
               that are already (near-losslessly) quantized
    allocate   per-layer widths by the allocation engine (vllm_slq.allocation.engine:
               KL sensitivities, then RCO) minimising the true model KL(p_fp || p_q)
               under an exact bpp budget; q/k/v and gate/up are tied so vLLM's fused
               layers can serve the result
    modes      target_bpp:   one RCO run at that budget
               target_ear:   the fewest bpp whose held-out EAR lower 95% bound
                             reaches the target: bisect the budget, running RCO
                             at each probe (distribution-lossless)
               task_lossless: the fewest bpp whose lm-eval accuracies all stay
                             within the sampling interval of the original's
               target_speculative: the bpp, and the number of drafted tokens k, whose
                             predicted speed-up as the original's speculative draft is
                             highest (vllm_slq.speculative's speed MODEL), the acceptance
                             measured on continuations the original wrote: EAR for
                             "sampled" (drafts sampled at T = 1), top-1 for "greedy";
                             a golden-section search over the budget, RCO at each probe
    tune       the chosen candidates' group scales tuned on the model's KL, codes and
               zero points fixed (vllm_slq.allocation.scale_tuning; tune_steps, 128 by
               default, 0: off); kept only where they measure better on held-back blocks.
               It runs once, after the search: a target_ear/task/speculative allocation
               was judged untuned and only gains from it. tune_norms: the norm layers
               are tuned with them, their factors folded into the norms' weights
    write      the chosen database entry (with its tuned scales) becomes module.weight
               and module.slq_quantized

symmetric=True gives the gamma-squared ablation (the same search on a symmetric grid).
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import torch
from compressed_tensors.offload import get_execution_device, remove_dispatch
from compressed_tensors.quantization.lifecycle.helpers import disable_quantization, enable_quantization
from llmcompressor.core import State
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator
from transformers import AutoTokenizer

from vllm_slq.allocation.artifact import allocation_from_choice, save_allocation
from vllm_slq.allocation.engine import SLQ_GPTQ, AllocationEngine
from vllm_slq.allocation.objective import ModelKLObjective
from vllm_slq.allocation.offload import OffloadDir
from vllm_slq.allocation.probe import FidelityProbe, reference_continuations
from vllm_slq.allocation.problem import AllocationProblem, LinearShape, group_linears
from vllm_slq.allocation.rco import RCOConfig
from vllm_slq.allocation.scale_tuning import ScaleTuning, fold_norm_scales, tune_scales
from vllm_slq.allocation.store import CandidateStore
from vllm_slq.data import load_text, token_blocks
from vllm_slq.eval.lmeval import LOCAL_TASKS, compare, run_lm_eval
from vllm_slq.eval.metrics import bootstrap_mean_ci, summarize
from vllm_slq.quant.database import LayerDatabase, build_database_sharded
from vllm_slq.quant.spec import MAX_BITS, MIN_BITS, QuantizedWeight, QuantSpec
from vllm_slq.speculative import best_speculative_tokens, draft_cost_ratio

from .base import QUANTIZED_ATTR, LayerwiseQuantModifier, attach_compressed_tensors_params

__all__ = ["SLQModifier"]


def _host_copy(w: torch.Tensor, narrow: torch.dtype) -> torch.Tensor:
    """The FP weight kept on the host until the allocation restores it: in the checkpoint's
    half-precision dtype when that holds it exactly (a CPU run computes in fp32 on weights
    upcast from fp16/bf16 files), so the copy costs 2 bytes per weight instead of 4."""
    if w.dtype != narrow and torch.equal(w.to(narrow).to(w.dtype), w):
        return w.detach().to(device="cpu", dtype=narrow)
    return w.detach().to("cpu", copy=True)


class SLQModifier(LayerwiseQuantModifier):
    requires_calibration_data: bool = True
    needs_hessian: ClassVar[bool] = True

    bits: int = MAX_BITS  # the width propagated while the database is built
    group_size: Optional[int] = 64
    symmetric: bool = False
    bits_options: list[int] = Field(default_factory=lambda: list(range(MIN_BITS, MAX_BITS + 1)))
    target_bpp: Optional[float] = None
    target_ear: Optional[float] = None
    task_lossless: bool = False
    tasks: Optional[list[str]] = None
    target_speculative: Optional[Literal["sampled", "greedy"]] = None
    # the speculative target's contexts: eval_blocks prompts of this many evaluation-split
    # tokens, each continued by the original for speculative_new_tokens tokens (the protocol
    # of benchmarks/speculative.py's defaults, which measures vLLM's acceptance on them)
    speculative_prompt_len: int = 32
    speculative_new_tokens: int = 64
    # what the allocation minimises per position: "kl", KL(p_fp || p_q), or "ear", 1 - EAR
    # (the total variation distance), so RCO maximises teacher-forced acceptance directly
    allocation_objective: Literal["kl", "ear"] = "kl"
    tie_fused: bool = True
    dampening_frac: float = SLQ_GPTQ["percdamp"]
    act_order: bool = SLQ_GPTQ["act_order"]  # GPTQ column order for the database (see SLQGPTQModifier)
    # range-shrink factors tried per group (Hessian-weighted)
    shrink_grid: list[float] = Field(default_factory=lambda: list(SLQ_GPTQ["shrink_grid"]))
    # several group-parameter rules, e.g. ["hessian", "minmax"]: GPTQ once per rule and per
    # width the lower layer objective (as SLQGPTQModifier(try_minmax=True)); None: the
    # Hessian-weighted search alone, which measured better (gptq.GPTQ_VARIANT)
    scale_searches: Optional[list[Literal["minmax", "mse", "hessian"]]] = None
    # the allocation objective and the EAR probes read their own token blocks
    dataset: str = "brown"
    objective_blocks: int = 8
    objective_seq_len: int = 256
    eval_blocks: int = 16
    eval_seq_len: int = 256
    # 16: what benchmarks/allocation.py and slq.py measured; from the KL-sensitivity
    # start, the steps changed the result only at 6 bpp there
    rco_steps: int = 16
    rco_samples: int = 2
    rco_lr: float = 0.1
    # RCO starts from KL sensitivities measured on the objective (allocation.sensitivity):
    # objective mini-batches per pass; 0 starts from GPTQ's relative errors instead
    sensitivity_batches: int = 2
    # at most this many passes per option (allocation.sensitivity max_subsets): the cheapest
    # options of a large model far from the quadratic regime would otherwise take one each
    sensitivity_max_passes: int = 32
    # recompute each decoder block in the backward instead of keeping its activations
    # (ModelKLObjective checkpoint_blocks): the saved activations shrink to one tensor per
    # block, so the allocation's peak stays near model + packed database at every size
    # (benchmarks/slq_memory.py), for one more forward per step (RCO about 25% slower)
    checkpoint_blocks: bool = True
    # the path for models whose weights and database exceed the device (allocation/offload.py):
    # the database's candidates, and during the allocation the decoder blocks' weights, rest in
    # memory-mapped files under this directory, and one block at a time is copied onto the device
    offload_dir: Optional[str] = None
    # after the allocation, tune the chosen candidates' group scales on the model's KL
    # (allocation/scale_tuning.py) for this many steps, codes and zero points fixed; 0: off.
    # It trains on tune_blocks calibration blocks just before the objective's (the end of the
    # split) and keeps the scales that measure best on the objective's own blocks.
    # On by default: 64 steps lowered held-out KL 15% for SLQ at 4.0 bpp and 23% for uniform
    # w4 on the reference model, paired CIs far below 1 (benchmarks/scale_tuning.py); 5x the
    # rate diverged (results/scale_tuning_lr1e-2.json). 64 steps left the held-back KL still
    # falling; 128 steps over 256 blocks (each block read once) gave 0.96x [0.95, 0.97] the
    # held-out KL of 64 over 128 at 4.2 bpw (results/slq_tune_steps128*.json), for twice the
    # tuning's compute (seconds on a GPU) and 2x the reference hidden states it keeps
    tune_steps: int = 128
    tune_blocks: int = 256
    tune_lr: float = 2e-3
    # tune_lr is the rate of 3-bit and narrower groups' log-scales; a wider b-bit group's is
    # tune_lr * 7 / (2^b - 1), so that a step moves its extreme codes by the same share of a
    # grid step as a 3-bit group's (scale_tuning.width_lr); None: tune_lr at every width.
    # Measured at 4.2-8.0 bpw: reference 4 gave 0.81-0.99x one rate's held-out KL, and
    # reference 3 0.97-0.99x reference 4's (tied at 8.0), CIs below 1
    # (benchmarks/results/slq_peer_budgets*.json)
    tune_reference_bits: Optional[int] = 3
    # tune the model's norm layers with the scales (scale_tuning's norms=True), at tune_norm_lr
    # (None: tune_lr); the factors fold into the norms' stored weights, so the checkpoint's
    # format and kernels are unchanged. Off: a tie at 4.2 bpw on the reference model, 1.002x
    # [0.998, 1.007] the held-out KL (README "Norm tuning, measured and left off")
    tune_norms: bool = False
    tune_norm_lr: Optional[float] = None
    tune_check_every: int = 8
    search_steps: int = 6
    search_tolerance_bpp: float = 0.05
    allocation_path: Optional[str] = None
    # a directory keeping every layer's database by content (weights, Hessian, specs,
    # GPTQ options): another run on the same model and calibration, e.g. with another
    # target, reads it instead of re-running GPTQ
    database_cache: Optional[str] = None
    seed: int = 0

    _db: CandidateStore = PrivateAttr(default_factory=CandidateStore)
    _w_ref: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _search_log: list[dict] = PrivateAttr(default_factory=list)
    _allocation: Any = PrivateAttr(default=None)
    _sensitivity_info: Any = PrivateAttr(default=None)
    _store: Any = PrivateAttr(default=None)
    _cache_hits: int = PrivateAttr(default=0)

    @model_validator(mode="after")
    def _one_target(self):
        n = sum([self.target_bpp is not None, self.target_ear is not None, bool(self.task_lossless),
                 self.target_speculative is not None])
        if n != 1:
            raise ValueError("SLQModifier needs exactly one of target_bpp, target_ear, task_lossless, "
                             "target_speculative")
        if self.target_speculative is not None and self.search_steps < 2:
            raise ValueError(f"SLQModifier.search_steps={self.search_steps}: the speculative target's "
                             f"golden-section search needs at least 2 probes")
        if self.target_ear is not None and not (0.0 < self.target_ear <= 1.0):
            raise ValueError(f"SLQModifier.target_ear={self.target_ear}: must lie in (0, 1]")
        bad = [b for b in self.bits_options if not (MIN_BITS <= b <= MAX_BITS)]
        if bad or not self.bits_options:
            raise ValueError(f"SLQModifier.bits_options {self.bits_options}: widths must be in {MIN_BITS}..{MAX_BITS}")
        # checked here: tune_scales would say so only after the whole allocation
        if self.tune_reference_bits is not None and self.tune_reference_bits < 1:
            raise ValueError(f"SLQModifier.tune_reference_bits={self.tune_reference_bits}: must be >= 1, "
                             f"or None for one rate")
        self.bits = max(self.bits_options)
        return self

    @property
    def options(self) -> list[QuantSpec]:
        return [QuantSpec(b, self.group_size, self.symmetric) for b in sorted(set(self.bits_options))]

    @property
    def search_log(self) -> list[dict]:
        return list(self._search_log)

    @property
    def allocation(self):
        return self._allocation

    # ---- database -----------------------------------------------------------------
    def quantize_module(self, name: str, module: torch.nn.Linear, H: Optional[torch.Tensor],
                        spec: QuantSpec) -> QuantizedWeight:
        W = module.weight.data.to(torch.float32)
        self._w_ref[name] = _host_copy(module.weight.data, self.scale_dtype_for(module))
        specs = [s for s in self.options if W.shape[1] % s.effective_group(W.shape[1]) == 0]
        gptq_kw = dict(SLQ_GPTQ, percdamp=self.dampening_frac, scale_dtype=self.scale_dtype_for(module),
                       shrink_grid=self.shrink_grid, act_order=self.act_order)
        if self.scale_searches:
            gptq_kw["scale_searches"] = tuple(self.scale_searches)
        if self.database_cache:
            if self._store is None:
                self._store = LayerDatabase(self.database_cache)
            # under torchrun every rank builds the same entries (all-reduced Hessians); rank 0
            # alone writes them, so the ranks never race on the cache's index
            writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            db, hit = self._store.build_cached(W, H, specs, layer=name, write=writer, sharded=True, **gptq_kw)
            self._cache_hits += int(hit)
        else:  # under torchrun each rank quantizes its share of the rows (one process: all of them)
            db = build_database_sharded(W, H, specs, layer=name, **gptq_kw)
        if not self._db:  # the store lives where the layers compute (or rests in offload files)
            self._db = CandidateStore(W.device, offload=OffloadDir(self.offload_dir) if self.offload_dir else None)
        self._db.put(name, db)
        return db[spec]

    # ---- allocation -----------------------------------------------------------------
    def on_finalize(self, state: State, **kwargs) -> bool:
        # Allocation needs full-vocabulary logits; inside llmcompressor's calibration
        # context the lm_head is disabled (it returns meta tensors), so it runs here,
        # after the pipeline has left that context.
        if not self.ended_:
            self.on_end(state, None)
        if self._db and len(self._db) == len(self._names):
            # oneshot runs modifiers under no_grad; RCO differentiates through the model
            with torch.inference_mode(False), torch.enable_grad():
                self._allocate(state.model)
        return super().on_finalize(state, **kwargs)

    def _tokens(self, model, split: str, n_blocks: int, seq_len: int, from_end: bool = False) -> torch.Tensor:
        """n_blocks token blocks of `split`: its first ones, or with from_end its last ones
        (the allocation objective must not read the tokens GPTQ's Hessians came from,
        which are the calibration split's first blocks)."""
        tok = AutoTokenizer.from_pretrained(model.config._name_or_path)
        text = load_text(self.dataset)
        return token_blocks(tok, getattr(text, split), seq_len, n_blocks, from_end=from_end)

    def _allocate(self, model: torch.nn.Module) -> None:
        # llmcompressor's pipeline leaves parameters in offload caches that onload them on
        # each access; the objective reads every weight at every step, so onload them once,
        # onto the device the pipeline computed on (with offload_dir the objective copies one
        # block at a time there instead, and the weights stay where the pipeline kept them)
        device = get_execution_device(model.get_input_embeddings())
        if not isinstance(device, torch.device):
            raise ValueError(f"SLQModifier: the model's execution device is {device!r}; the allocation "
                             f"computes on a torch device (use offload_dir rather than disk offloading)")
        remove_dispatch(model, onload_tensors=self.offload_dir is None)
        mods = dict(model.named_modules())
        dtype = next(model.parameters()).dtype
        with torch.no_grad():  # RCO mixes around the FP weights: put them back
            for name, w in self._w_ref.items():
                mods[name].weight.data.copy_(w.to(mods[name].weight.device))
                # the database phase attached the propagated entry's compressed-tensors scheme,
                # whose forward fake-quantizes the weight: left on, the objective's "FP"
                # reference would be that quantized model (w4 runs: KL 0.207 against FP's 0.123)
                disable_quantization(mods[name])
        shapes = [LinearShape(n, *self._w_ref[n].shape) for n in self._names.values()]
        self._w_ref.clear()  # the model holds the FP weights again: the copies would only take host memory
        problem = AllocationProblem(group_linears(shapes, tie_fused=self.tie_fused), self.options)
        t0 = time.time()
        objective = ModelKLObjective(model, problem, self._db,
                                     self._tokens(model, "calibration", self.objective_blocks, self.objective_seq_len,
                                                  from_end=True),
                                     batch_blocks=self._batch_blocks(), checkpoint_blocks=self.checkpoint_blocks,
                                     compute_dtype=None,  # the model's: fp32 on CPU, bf16/fp16 on GPU
                                     offload_dir=self.offload_dir, device=device,
                                     divergence={"kl": "kl", "ear": "tv"}[self.allocation_objective])
        engine = AllocationEngine(problem, objective,
                                  rco=RCOConfig(steps=self.rco_steps, samples=self.rco_samples, lr=self.rco_lr,
                                                seed=self.seed),
                                  sensitivity_batches=self.sensitivity_batches,
                                  sensitivity_kw={"max_subsets": self.sensitivity_max_passes},
                                  init_errors=None if self.sensitivity_batches > 0 else self._database_errors(problem))
        if self.target_bpp is not None:
            problem.check_budget(self.target_bpp)
            choice = engine.allocate(self.target_bpp).choice
        elif self.target_speculative is not None:
            lo, hi = problem.feasible_range()
            choice = engine.maximize(self._speculative_score(model, objective, problem), lo, hi,
                                     steps=self.search_steps).choice
        else:
            accept = self._ear_accepts(model, objective) if self.target_ear is not None \
                else self._tasks_accept(model, objective)
            lo, hi = problem.feasible_range()
            res, ok = engine.search(accept, lo, hi, steps=self.search_steps, tolerance=self.search_tolerance_bpp)
            if not ok:
                logger.warning(f"SLQModifier: even the richest allocation ({hi:.3f} bpp) misses the target: "
                               f"{engine.log[-1]}")
            choice = res.choice
        choice = np.asarray(choice)
        objective.close()  # offloaded blocks back where they were
        tuning = self._tune_scales(model, problem, choice, device) if self.tune_steps > 0 else None
        self._search_log = engine.log
        self._sensitivity_info = engine.sensitivity_info
        model.to(dtype)
        specs = problem.module_specs(choice)
        if tuning is not None:
            fold_norm_scales(model, tuning.norm_scales)
        with torch.no_grad():
            for name, spec in specs.items():
                qw = self._db.quantized(name, spec)
                if tuning is not None:
                    qw.scale = tuning.scales[name]
                module = mods[name]
                module.weight.data.copy_(qw.dequantize(module.weight.dtype).to(module.weight.device))
                enable_quantization(module)  # the weight is the chosen entry again
                qw = QuantizedWeight(qw.codes, qw.scale, qw.zero_point, qw.spec,
                                     {**qw.meta, "layer": name, "method": "SLQModifier"})
                setattr(module, QUANTIZED_ATTR, qw)
                self._quantized[name] = qw
                if self.attach_compressed_tensors:
                    attach_compressed_tensors_params(module, qw, name)
        budget = self.target_bpp if self.target_bpp is not None else problem.achieved_bpp(choice)
        self._allocation = allocation_from_choice(
            problem, choice, "slq-rco", budget,
            extra={"search": self._search_log, "seconds": time.time() - t0,
                   "kl_sensitivities": self._sensitivity_info,
                   "database_cache": None if not self.database_cache else
                   {"path": self.database_cache, "layers_read": self._cache_hits, "layers": len(self._names)},
                   "target": {"bpp": self.target_bpp, "ear": self.target_ear, "task_lossless": self.task_lossless,
                              "speculative": self.target_speculative},
                   "objective": self.allocation_objective,
                   "scale_tuning": None if tuning is None else
                   {"steps": self.tune_steps, "blocks": self.tune_blocks, "lr": self.tune_lr,
                    "reference_bits": self.tune_reference_bits, **tuning.summary()}})
        if self.allocation_path:
            save_allocation(self._allocation, self.allocation_path)
        self._db.close()
        logger.info(f"SLQModifier: allocated {problem.achieved_bpp(choice):.3f} bpp in {time.time() - t0:.0f} s")

    def _tune_scales(self, model, problem: AllocationProblem, choice: np.ndarray, device) -> ScaleTuning:
        """The chosen candidates' scales tuned on the model's KL: an objective over the calibration
        split's last tune_blocks + objective_blocks blocks, training on the first tune_blocks and
        checking on the rest (the allocation objective's own blocks)."""
        tokens = self._tokens(model, "calibration", self.tune_blocks + self.objective_blocks,
                              self.objective_seq_len, from_end=True)
        objective = ModelKLObjective(model, problem, self._db, tokens, batch_blocks=self._batch_blocks(),
                                     checkpoint_blocks=self.checkpoint_blocks, compute_dtype=None,
                                     offload_dir=self.offload_dir, device=device,
                                     divergence={"kl": "kl", "ear": "tv"}[self.allocation_objective])
        try:
            tuning = tune_scales(objective, choice, self.tune_blocks, self.tune_steps, lr=self.tune_lr,
                                 check_every=self.tune_check_every, reference_bits=self.tune_reference_bits,
                                 norms=self.tune_norms, norm_lr=self.tune_norm_lr)
        finally:
            objective.close()
        logger.info(f"SLQModifier: scales tuned in {tuning.seconds:.0f} s, held-back KL "
                    f"{tuning.heldout_kl_start:.4f} -> {tuning.heldout_kl_best:.4f} (step {tuning.best_step})")
        return tuning

    @staticmethod
    def _batch_blocks() -> int:
        """Two blocks per objective call, or the fewest multiple of the world size above that
        (under torchrun each rank scores its share of every call's blocks)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return -(-2 // world) * world

    def _database_errors(self, problem: AllocationProblem) -> np.ndarray:
        """GPTQ's relative layer errors per (group, option), summed over a group's members:
        RCO's start when no KL sensitivities are measured."""
        errors = np.zeros((problem.n_groups, problem.n_options))
        for i, g in enumerate(problem.groups):
            for m in g.modules:
                for k, s in enumerate(problem.options):
                    if problem.available[i, k]:
                        errors[i, k] += float(self._db.get(m.name, s).meta.get("rel_err", 0.0))
        return errors

    def _ear_accepts(self, model, objective):
        """Accept an allocation when the lower end of its EAR's 95% CI on the evaluation blocks
        reaches target_ear (FidelityProbe: no [tokens, vocab] reference; blocks shared over ranks)."""
        probe = FidelityProbe(objective, self._tokens(model, "evaluation", self.eval_blocks, self.eval_seq_len))

        def accept(choice):
            summ = summarize(probe(choice), seed=self.seed)
            lower = summ["ear_ci95"][0]
            return lower >= self.target_ear, {"ear": summ["ear"], "ear_ci95": summ["ear_ci95"],
                                              "kl": summ.get("kl"), "positions": summ["n_positions"]}

        return accept

    def _speculative_score(self, model, objective, problem: AllocationProblem):
        """score(choice) -> (predicted speed-up at its best k, info): the acceptance is the mean
        EAR ("sampled") or top-1 agreement ("greedy") on the positions that predict the
        original's own continuations of evaluation prompts, the contexts vLLM's first drafted
        position meets; the draft's cost ratio counts the output head, read every step, dense."""
        greedy = self.target_speculative == "greedy"
        prompts = self._tokens(model, "evaluation", self.eval_blocks, self.speculative_prompt_len)
        sequences = reference_continuations(objective, prompts, self.speculative_new_tokens,
                                            greedy=greedy, seed=self.seed)
        probe = FidelityProbe(objective, sequences, first_position=prompts.shape[1] - 1)
        head = model.get_output_embeddings()
        dense = 0 if head is None or head in self._names else head.weight.numel()
        metric = "top1" if greedy else "ear"

        def score(choice):
            per_block = [getattr(m, metric).double() for m in probe(choice)]
            acceptance = float(torch.cat(per_block).mean())
            ci = bootstrap_mean_ci(per_block, seed=self.seed)
            c = draft_cost_ratio(problem.bits_of(choice), problem.total_params, dense)
            k, speedup = best_speculative_tokens(acceptance, c)
            return speedup, {"acceptance": acceptance, "acceptance_ci95": list(ci), "acceptance_metric": metric,
                             "draft_cost_ratio": c, "k": k, "predicted_speedup": speedup,
                             "positions": sum(v.numel() for v in per_block)}

        return score

    def _tasks_accept(self, model, objective):
        """lm-eval (HF backend, this in-memory model) on the original once, then on each probe."""
        tasks = list(self.tasks or LOCAL_TASKS)
        tok = AutoTokenizer.from_pretrained(model.config._name_or_path)

        def run():
            return run_lm_eval("in-memory", tasks, backend="hf", batch_size=4,
                               model_args={"pretrained": model, "tokenizer": tok})

        reference = run()

        def accept(choice):
            with objective.applied(choice):
                verdict = compare(reference, run())
            ok = all(r["within_ci"] for r in verdict.values())
            return ok, {"tasks": {t: {k: r[k] for k in ("acc_reference", "acc_candidate", "tolerance",
                                                         "within_ci")} for t, r in verdict.items()}}

        return accept
