"""The main job: quantize a model to a fidelity target, write the checkpoint, prove it.

    vllm-slq quantize [MODEL] --target ear=0.99 | bpp=3.5 | task-lossless | speculative[-greedy]
                      [--method slq|gsq|gptq|rtn]

1. parse and check the target before any work (bad targets fail in milliseconds);
2. run the method's llmcompressor recipe (oneshot, sequential pipeline);
3. write the compressed-tensors checkpoint into a staging directory;
4. evaluate it against the FP16 original (EAR with bootstrap CI, KL, top-1, PPL)
   and write the fidelity report into the staging directory;
5. publish with one rename, so an interrupted run never leaves a complete-looking
   checkpoint; print the `vllm serve` command.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from vllm_slq.checkpoint.layout import EXTRA_KEY
from vllm_slq.eval.report import format_table, protocol_markdown
from vllm_slq.fileio import atomic_dir
from vllm_slq.quant.spec import MAX_BITS, MIN_BITS, QuantSpec

if TYPE_CHECKING:
    import torch

    from vllm_slq.allocation.problem import LinearShape

# torch, transformers and llmcompressor are imported inside the functions that run the job:
# the CLI builds its parser from this module, and `vllm-slq --help` or a bad --target must
# answer in well under a second, not after a 10 s llmcompressor import.

METHODS = ("slq", "gsq", "gptq", "rtn")
# --target -> SLQModifier.target_speculative: the draft that makes the original fastest, for
# drafts sampled at T = 1 (acceptance EAR) or for greedy decoding (acceptance top-1)
SPECULATIVE_TARGETS = {"speculative": "sampled", "speculative-greedy": "greedy"}
DEFAULT_BITS = {"gptq": 4, "rtn": 4, "gsq": 2}


class TargetError(ValueError):
    """A --target that cannot be met or parsed."""


@dataclass(frozen=True)
class Target:
    kind: str  # "bpp" | "ear" | "task-lossless" | "speculative" | "speculative-greedy"
    value: Optional[float] = None

    def describe(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


def uniform_bpp(bits: int, group_size: Optional[int], symmetric: bool,
                shapes: Optional[Sequence[LinearShape]] = None) -> Optional[float]:
    """bpp of one width over the quantized linears (parameter-weighted). A grouped spec's
    overhead is per group, the same for any K it divides, so it needs no shapes; a
    per-channel one depends on each layer's K: None until the shapes are known."""
    spec = QuantSpec(bits, group_size, symmetric)
    if shapes is None:
        return None if group_size is None else spec.bpp(group_size)
    return sum(spec.bpp(s.in_features) * s.params for s in shapes) / sum(s.params for s in shapes)


def feasible_bpp(group_size: Optional[int], symmetric: bool,
                 shapes: Optional[Sequence[LinearShape]] = None) -> Optional[tuple[float, float]]:
    """[bpp at 2 bits, bpp at 8 bits] over the quantized linears (None: per-channel without shapes)."""
    lo = uniform_bpp(MIN_BITS, group_size, symmetric, shapes)
    return None if lo is None else (lo, uniform_bpp(MAX_BITS, group_size, symmetric, shapes))


def model_linears(model_path) -> list[LinearShape]:
    """The linears a method quantizes (all but lm_head), from config.json alone: the model is
    built on the meta device, so no weight is read and any architecture works."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_slq.allocation.problem import linear_shapes

    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_shapes(model)


def check_group_size(group_size: Optional[int], shapes: Sequence[LinearShape], model_path) -> None:
    """--group-size must divide every quantized linear's in_features: said before any weight loads."""
    bad = [s for s in shapes if group_size and s.in_features % group_size]
    if bad:
        s = bad[0]
        raise TargetError(f"--group-size {group_size} does not divide in_features={s.in_features} of layer "
                          f"{s.name!r} in {model_path} ({len(bad)} of {len(shapes)} linears); pick a divisor "
                          f"of every layer's input width, or 0 for per-channel scales")


def parse_target(text: str, group_size: Optional[int] = 64, symmetric: bool = False,
                 shapes: Optional[Sequence[LinearShape]] = None) -> Target:
    text = text.strip().lower()
    if text in ("task-lossless", "task_lossless", "task"):
        return Target("task-lossless")
    if text in SPECULATIVE_TARGETS:
        return Target(text)
    m = re.fullmatch(r"(ear|bpp)\s*=\s*([0-9.eE+-]+)", text)
    if not m:
        raise TargetError(f"--target {text!r}: expected ear=<0..1>, bpp=<bits per parameter>, task-lossless, "
                          f"speculative or speculative-greedy")
    kind, raw = m.group(1), m.group(2)
    try:
        value = float(raw)
    except ValueError:
        raise TargetError(f"--target {text!r}: {raw!r} is not a number") from None
    if kind == "ear" and not (0.0 < value <= 1.0):
        raise TargetError(f"--target ear={raw}: EAR is a probability; it must lie in (0, 1]")
    feasible = feasible_bpp(group_size, symmetric, shapes) if kind == "bpp" else None
    if feasible is not None:
        lo, hi = feasible
        if not (lo <= value <= hi):
            g = "per-channel" if group_size is None else f"group {group_size}"
            raise TargetError(
                f"--target bpp={raw}: outside the feasible range [{lo:.3f}, {hi:.3f}] for "
                f"{'symmetric' if symmetric else 'asymmetric'} {g} ({MIN_BITS}..{MAX_BITS} bits plus "
                f"scale/zero overhead)")
    return Target(kind, value)


def check_tasks(tasks) -> None:
    """Unknown lm-eval task names fail here, before any quantization work."""
    from lm_eval.tasks import TaskManager

    from vllm_slq.eval.lmeval import LOCAL_TASKS, prepare_local_tasks

    names = set(TaskManager(include_path=[str(prepare_local_tasks())]).all_tasks) | set(LOCAL_TASKS)
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise TargetError(f"--tasks: unknown lm-eval task(s) {unknown}; the bundled offline tasks are "
                          f"{list(LOCAL_TASKS)}")


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="alias (smollm2-135m), local directory or HF id")
    p.add_argument("--target", default="bpp=4.5",
                   help="ear=<p> (distribution-lossless), bpp=<b> (budget), task-lossless, or speculative "
                        "(the fastest speculative draft of the original at T=1; speculative-greedy: for "
                        "greedy decoding)")
    p.add_argument("--method", choices=METHODS, default="slq")
    p.add_argument("--bits", type=int, default=None,
                   help="uniform bit width for gptq/rtn/gsq (default: the largest within a bpp target, else 4; gsq 2)")
    p.add_argument("--group-size", type=int, default=64, help="0 for per-channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (the gamma-squared ablation for slq)")
    p.add_argument("--dataset", default="brown", help="brown | sampled | FILE.txt | FILE.jsonl | hf:NAME[:CONFIG]")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--tasks", nargs="*", default=None, help="lm-eval tasks for task-lossless (default: the bundled offline task)")
    p.add_argument("--output", "-o", default=None, help="checkpoint directory (default: ./out/<model>-<method>-<target>)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="skip the fidelity report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=False,
                   help="first rotate the residual stream and value heads by random Hadamard matrices "
                        "fused into the weights (RotationModifier; same function, same format, lm_head "
                        "untied)")
    add_device_args(p)
    g = p.add_argument_group("slq search (defaults: recipes/slq_*.yaml)")
    g.add_argument("--rco-steps", type=int, default=None)
    g.add_argument("--objective-blocks", type=int, default=None, help="calibration blocks for the RCO objective")
    g.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks per EAR probe")
    g.add_argument("--probe-seq-len", type=int, default=None, help="sequence length of RCO/EAR blocks")
    g.add_argument("--search-steps", type=int, default=None, help="budget probes: bisection steps (ear / task-lossless), golden-section "
                        "probes (speculative)")
    g.add_argument("--sensitivity-passes", type=int, default=None, metavar="N",
                   help="at most N KL-sensitivity passes per width (default 32; fewer for big models on a CPU)")
    g.add_argument("--objective", default=None, choices=("kl", "ear"),
                   help="what the allocation minimises: kl (default), or ear: 1 - EAR, maximising the "
                        "teacher-forced acceptance rate directly")
    g.add_argument("--bits-options", type=int, nargs="+", default=None, metavar="B",
                   help="the widths SLQ may give a layer (default 2..8); one width gives the uniform "
                        "baseline through SLQ's database and tuning")
    g.add_argument("--tune-steps", type=int, default=None, metavar="N",
                   help="after the allocation, tune the chosen group scales on the model's KL for N steps "
                        "(default 128; codes fixed; the scales measuring best on held-back blocks are kept; 0: off)")
    g.add_argument("--tune-blocks", type=int, default=None, metavar="N",
                   help="calibration blocks the scale tuning trains on (default 256, two per step)")
    g.add_argument("--tune-lr", type=float, default=None, metavar="LR",
                   help="the scale tuning's Adam rate on the log-scales of groups of R bits or fewer (default "
                        "2e-3; wider b-bit groups get LR * (2^R - 1) / (2^b - 1), R the reference "
                        "width), cosine-decayed to 0")
    g.add_argument("--tune-reference-bits", type=int, default=None, metavar="R",
                   help="the width R above which the tuning's rate falls as 1 / (2^b - 1) (default 3; 0: "
                        "--tune-lr at every width)")
    g.add_argument("--tune-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="tune the norm layers' weights with the scales (folded into the stored norms; "
                        "format unchanged)")
    g.add_argument("--database-cache", default=None, metavar="DIR",
                   help="keep the GPTQ database here, by content: a rerun with another target skips GPTQ")
    g.add_argument("--checkpoint-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute decoder blocks in the objective's backward: less memory, one more "
                        "forward per step (default on; --no-checkpoint-blocks for speed when memory is ample)")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="for models whose weights and database exceed the device: keep the database, and "
                        "during the allocation the decoder blocks, in memory-mapped files under DIR and copy "
                        "one block at a time onto the device (implies --checkpoint-blocks)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where every tensor lives and computes (auto: cuda when available); on a "
                        "multi-GPU machine CUDA_VISIBLE_DEVICES picks the GPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16"),
                   help="the checkpoint's dtype (scales and dense tensors) and the GPU compute dtype "
                        "(auto: the model's own; float16 for an fp32 model)")


def resolve_device(choice: str) -> str:
    """--device auto|cpu|cuda as 'cpu' or 'cuda' (auto: cuda when one is visible), checked."""
    if choice == "cpu":
        return "cpu"
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process "
                         "(a CPU-only torch, or CUDA_VISIBLE_DEVICES hides them)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_device(choice: str) -> str:
    """resolve_device; for cpu, GPUs are also hidden from this process before anything
    initialises CUDA, since llmcompressor computes on the first accelerator it sees."""
    device = resolve_device(choice)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return device


def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (gloo on CPU, NCCL on GPU,
    one GPU per local rank) that llmcompressor's and our modifiers' collectives use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def model_dtype(choice: str, model_path) -> "torch.dtype":
    """--dtype, or the dtype the model's config.json declares (float16 for fp32/undeclared ones)."""
    import torch
    from transformers import AutoConfig

    if choice != "auto":
        return getattr(torch, choice)
    declared = getattr(AutoConfig.from_pretrained(str(model_path)), "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if declared in (torch.float16, torch.bfloat16) else torch.float16


def _group(args) -> Optional[int]:
    return None if args.group_size in (0, None) else args.group_size


def _uniform_bits(args, target: Target, shapes: Sequence[LinearShape]) -> int:
    if args.bits is not None:
        if not (MIN_BITS <= args.bits <= MAX_BITS):
            raise TargetError(f"--bits {args.bits}: must be in {MIN_BITS}..{MAX_BITS}")
        return args.bits
    if target.kind == "bpp":
        fits = [b for b in range(MIN_BITS, MAX_BITS + 1)
                if uniform_bpp(b, _group(args), args.symmetric, shapes) <= target.value + 1e-9]
        return max(fits)
    return DEFAULT_BITS[args.method]


def _slq_modifier(args, target: Target, shapes, scale_dtype):
    from vllm_slq.modifiers.slq import SLQModifier

    kw = dict(group_size=_group(args), symmetric=args.symmetric, scale_dtype=scale_dtype,
              dataset=args.dataset, seed=args.seed)
    for arg, field in (("rco_steps", "rco_steps"), ("objective_blocks", "objective_blocks"),
                       ("eval_blocks", "eval_blocks"), ("probe_seq_len", "objective_seq_len"),
                       ("probe_seq_len", "eval_seq_len"), ("search_steps", "search_steps"),
                       ("database_cache", "database_cache"), ("checkpoint_blocks", "checkpoint_blocks"),
                       ("offload_dir", "offload_dir"), ("objective", "allocation_objective"),
                       ("sensitivity_passes", "sensitivity_max_passes"), ("tune_steps", "tune_steps"),
                       ("tune_blocks", "tune_blocks"), ("tune_lr", "tune_lr"), ("tune_norms", "tune_norms"),
                       ("bits_options", "bits_options")):
        if getattr(args, arg, None) is not None:
            kw[field] = getattr(args, arg)
    if getattr(args, "tune_reference_bits", None) is not None:
        # 0 on the command line is the modifier's None: one rate at every width
        kw["tune_reference_bits"] = args.tune_reference_bits or None
    if target.kind == "bpp":
        kw["target_bpp"] = target.value
    elif target.kind == "ear":
        kw["target_ear"] = target.value
    elif target.kind in SPECULATIVE_TARGETS:
        kw["target_speculative"] = SPECULATIVE_TARGETS[target.kind]
    else:
        kw["task_lossless"] = True
        if args.tasks:
            kw["tasks"] = list(args.tasks)
    return SLQModifier(**kw)


def _uniform_modifier(class_name: str, **fixed):
    """A builder for a fixed-width method (a modifier vllm_slq.modifiers exports): the widest
    width within --target bpp, or --bits; `fixed` maps modifier fields to argument names."""
    def build(args, target: Target, shapes, scale_dtype):
        import vllm_slq.modifiers

        if target.kind != "bpp":
            raise TargetError(f"--target {target.describe()} needs --method slq (the search); "
                              f"{args.method} quantizes at a fixed width: use --target bpp=<b> or --bits")
        cls = getattr(vllm_slq.modifiers, class_name)
        return cls(bits=_uniform_bits(args, target, shapes), group_size=_group(args), scale_dtype=scale_dtype,
                   **{k: getattr(args, v) for k, v in fixed.items()})
    return build


# --method -> builder(args, target, shapes, scale_dtype) of its llmcompressor modifier
MODIFIER_BUILDERS = {
    "slq": _slq_modifier,
    "gsq": _uniform_modifier("GSQModifier"),
    "gptq": _uniform_modifier("SLQGPTQModifier", symmetric="symmetric"),
    "rtn": _uniform_modifier("RTNModifier", symmetric="symmetric"),
}
assert tuple(MODIFIER_BUILDERS) == METHODS


def build_modifier(args, target: Target, shapes: Sequence[LinearShape], scale_dtype: Optional[str] = None):
    """The llmcompressor modifier for --method (MODIFIER_BUILDERS)."""
    return MODIFIER_BUILDERS[args.method](args, target, shapes, scale_dtype)


def _default_output(args, target: Target) -> Path:
    name = Path(str(args.model)).name if os.path.exists(str(args.model)) else str(args.model).replace("/", "--")
    tgt = target.describe().replace("=", "")
    return Path("out") / f"{name}-{args.method}-{tgt}"


def run_quantize(args) -> int:
    device = select_device(getattr(args, "device", "auto"))  # before anything touches CUDA
    import torch

    rank, world = init_distributed(device)

    target = parse_target(args.target, _group(args), args.symmetric)  # fail before any work
    if target.kind == "task-lossless" and args.tasks:
        check_tasks(args.tasks)
    out = Path(args.output) if args.output else _default_output(args, target)
    out = out.absolute()
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    torch.manual_seed(args.seed)

    from llmcompressor import oneshot

    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.compat import fx_wrap_keys, release_traced_model, return_freed_host_memory
    from vllm_slq.data import calibration_dataset, resolve_model
    from vllm_slq.modifiers import quantized_weights

    model_path = resolve_model(args.model)
    shapes = model_linears(model_path)  # the config's linears: checked before any weight loads
    check_group_size(_group(args), shapes, model_path)
    target = parse_target(args.target, _group(args), args.symmetric, shapes)  # per-channel bpp needs the K's
    dtype = model_dtype(getattr(args, "dtype", "auto"), model_path)
    modifier = build_modifier(args, target, shapes, scale_dtype=str(dtype).removeprefix("torch."))
    if args.method == "slq":
        target_text = target.describe()
    elif args.bits is not None:
        target_text = f"uniform {modifier.bits}-bit (--bits)"
    else:
        target_text = f"uniform {modifier.bits}-bit, the widest within {target.describe()}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    # CPUs have no fast half-precision GEMM: compute in fp32 there (the checkpoint is still `dtype`);
    # llmcompressor onloads each layer onto the GPU when there is one
    work_dtype = dtype if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=work_dtype)
    dataset = calibration_dataset(tok, args.dataset, args.calib_samples, args.seq_len)
    if world > 1:  # data-parallel calibration: this rank's contiguous shard of the blocks
        if args.calib_samples < world:
            raise TargetError(f"--calib-samples {args.calib_samples}: fewer blocks than the {world} ranks")
        dataset = dataset.shard(num_shards=world, index=rank, contiguous=True)
    print(f"[vllm-slq] {args.method} on {model_path} target {target_text}: "
          f"{args.calib_samples} x {args.seq_len} calibration tokens from {args.dataset}; "
          f"{device}, compute {str(work_dtype).removeprefix('torch.')}, checkpoint "
          f"{str(dtype).removeprefix('torch.')}", file=sys.stderr)
    t0 = time.time()
    fx_keys = fx_wrap_keys()  # what calibration's tracing adds is released before the evaluation
    recipe = [modifier]
    if args.rotate:
        from vllm_slq.modifiers.rotation import RotationModifier

        rotation = RotationModifier()
        recipe.insert(0, rotation)  # first: the quantizer's Hessians are taken in the rotated basis
    model = oneshot(model=model, tokenizer=tok, recipe=recipe, dataset=dataset,
                    num_calibration_samples=len(dataset), max_seq_length=args.seq_len,
                    pipeline="sequential" if modifier.requires_calibration_data else "datafree")
    quant_seconds = time.time() - t0
    peak_device_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    quantized = quantized_weights(model)
    if not quantized:
        raise RuntimeError("the recipe quantized no layers")
    if world > 1:
        # every rank holds the same quantized model: rank 0 alone writes and evaluates it, out of
        # the group (compressed-tensors' loaders run collectives whenever a group exists)
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0

    n_params = sum(qw.codes.numel() for qw in quantized.values())
    bpp = sum(qw.bits_total() for qw in quantized.values()) / n_params
    bit_map = {name: qw.spec.short() for name, qw in sorted(quantized.items())}
    extra = {"method": args.method, "target": target_text, "bpp": bpp,
             "model": str(args.model), "calibration": {"dataset": args.dataset,
             "samples": args.calib_samples, "seq_len": args.seq_len}, "layers": bit_map}
    if args.rotate:
        extra["rotation"] = {"rotations": list(rotation.rotations), "type": rotation.transform_type,
                             "function_kl": rotation.function_kl}
    search = getattr(modifier, "search_log", None)
    if search:
        extra["search"] = search
    alloc = getattr(modifier, "allocation", None)
    allocation = None if alloc is None else {
        "seconds": alloc.extra.get("seconds"), "kl_sensitivities": alloc.extra.get("kl_sensitivities"),
        "database_cache": alloc.extra.get("database_cache"), "objective": alloc.extra.get("objective"),
        "scale_tuning": alloc.extra.get("scale_tuning")}

    # checkpoint and report are staged together and published with one rename; an existing
    # output (--overwrite) is deleted only once the new one is in place
    with atomic_dir(out, replace=args.overwrite) as staging:
        save_checkpoint(model, quantized, staging, tokenizer=tok, extra=extra, dtype=dtype, overwrite=True)
        stored = json.loads((staging / "config.json").read_text())[EXTRA_KEY]
        report = {"model": str(args.model), "method": args.method, "target": target_text,
                  "bpp": bpp, "bpp_all_params": stored["bpp_all_params"],
                  "params_all": stored["params_all"], "params_quantized": stored["params_quantized"],
                  "checkpoint_gb": sum(f.stat().st_size for f in staging.glob("*.safetensors")) / 1e9,
                  "device": device, "dtype": str(dtype).removeprefix("torch."),
                  "quantize_seconds": quant_seconds, "peak_device_memory_gb": peak_device_gb,
                  "layers": bit_map}
        if "rotation" in extra:
            report["rotation"] = extra["rotation"]
        if search:
            report["search"] = search
        if allocation:
            report["allocation"] = allocation
        if target.kind in SPECULATIVE_TARGETS:
            report["speculative"] = speculative_summary(search, str(model_path), str(out))
        if not args.no_eval:
            from llmcompressor.core import reset_session

            from vllm_slq.eval.api import evaluate

            # The evaluation loads the reference and the written checkpoint afresh: let the
            # quantized model go first (llmcompressor's session holds it too), or an 8B run
            # would hold three models at once. On a GPU both are scored in the checkpoint's
            # dtype, as vLLM serves them (two fp32 8B models alone would fill an 80 GB GPU);
            # the CPU keeps fp32, its fast path.
            reset_session()
            release_traced_model(fx_keys)
            del model, quantized, modifier
            gc.collect()  # modules and hooks form reference cycles
            return_freed_host_memory()  # else the allocation's freed heap stays resident
            if device == "cuda":
                torch.cuda.empty_cache()
            eval_dtype = "float32" if device == "cpu" else str(dtype).removeprefix("torch.")
            report["fidelity"] = evaluate(reference=str(model_path), candidate=str(staging),
                                          dataset=args.dataset, n_tokens=args.eval_tokens,
                                          seq_len=args.seq_len, backend="hf", seed=args.seed,
                                          label=out.name, device=device, dtype=eval_dtype)
            # scored in the staging directory; name the checkpoint it becomes
            report["fidelity"]["candidate"] = str(out)
        (staging / "slq_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staging / "slq_report.md").write_text(render_report(report))
    print(render_report(report))
    from vllm_slq.serve import serve_command

    print(f"checkpoint: {out}\nserve it:   {serve_command(str(out))}")
    if "speculative" in report:
        print(f"or as the original's lossless draft: {report['speculative']['serve']}")
    return 0


def speculative_summary(search: Sequence[dict], original: str, draft: str) -> dict:
    """The speculative target's report entry: the chosen probe's predicted acceptance, k and
    speed-up (a MODEL: vllm_slq.speculative), every probe's, and the command that serves it."""
    best = next((e for e in search if e.get("best")), None)
    if best is None:
        raise RuntimeError("the speculative search logged no chosen probe")
    sampled = best["acceptance_metric"] == "ear"
    serve = (f"vllm-slq serve {original} --draft {draft} --num-speculative-tokens {best['k']}"
             + (" --draft-sampling probabilistic" if sampled else ""))
    keys = ("bpp", "acceptance", "acceptance_ci95", "draft_cost_ratio", "k", "predicted_speedup")
    return {"decoding": "sampled at T=1, drafts sampled from q (acceptance: EAR)" if sampled
            else "greedy (acceptance: top-1 agreement)",
            "acceptance_metric": best["acceptance_metric"], **{k: best[k] for k in keys},
            "probes": [{k: e[k] for k in keys} for e in search if "predicted_speedup" in e],
            "what": "speed-up over the original's batch-1 decode: a MODEL, E(k) / (1 + k c) "
                    "(vllm_slq/speculative.py), not a timing",
            "serve": serve}


def render_report(report: dict) -> str:
    lines = ["# vllm-slq fidelity report", "",
             f"- model: {report['model']}", f"- method: {report['method']}",
             f"- target: {report['target']}",
             f"- achieved bpp: {report['bpp']:.3f} over the quantized linears"
             + (f"; {report['bpp_all_params']:.3f} over all {report['params_all'] / 1e9:.3g}B parameters "
                f"as stored; checkpoint {report['checkpoint_gb']:.3g} GB" if "bpp_all_params" in report else ""),
             f"- quantization wall-clock: {report['quantize_seconds']:.0f} s"]
    rot = report.get("rotation")
    if rot:
        lines.append(f"- weights rotated first ({', '.join(rot['rotations'])}, {rot['type']}, fused; lm_head "
                     f"untied): KL to the original {rot['function_kl']:.2e} on the probe tokens")
    alloc = report.get("allocation")
    if alloc and alloc.get("seconds") is not None:
        cache = alloc.get("database_cache")
        lines.append(f"  - of which allocation search: {alloc['seconds']:.0f} s"
                     + (f"; GPTQ database read from the cache for {cache['layers_read']} of {cache['layers']} layers"
                        if cache else ""))
        tuning = alloc.get("scale_tuning")
        if tuning:
            lines.append(f"  - group scales tuned on the model's KL ({tuning['steps']} steps, {tuning['seconds']:.0f} s): "
                         f"held-back calibration KL {tuning['heldout_kl_start']:.4g} -> {tuning['heldout_kl_best']:.4g}"
                         f" (step {tuning['best_step']})"
                         + (f"; {tuning['norms']} norm layers tuned with them" if tuning.get("norms") else ""))
    spec = report.get("speculative")
    if spec:
        lo, hi = spec["acceptance_ci95"]
        lines += ["", "## As the original's speculative draft (MODEL)", "",
                  f"- decoding: {spec['decoding']}",
                  f"- predicted acceptance {spec['acceptance']:.3f} (95% CI {lo:.3f}-{hi:.3f}), draft cost "
                  f"{spec['draft_cost_ratio']:.3f} of an original step, k = {spec['k']}: predicted speed-up "
                  f"{spec['predicted_speedup']:.2f}x over the original (a model, not a timing)",
                  f"- serve: `{spec['serve']}`", "",
                  "| bpp | acceptance | draft cost | k | predicted speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {e['bpp']:.3f} | {e['acceptance']:.3f} | {e['draft_cost_ratio']:.3f} | {e['k']} | "
                  f"{e['predicted_speedup']:.2f}x |" for e in sorted(spec["probes"], key=lambda e: e["bpp"])]
    fid = report.get("fidelity")
    if fid:  # an eval result: formatted by eval.report, as `vllm-slq eval` prints it
        lines += ["", "## Fidelity against the original", "", format_table([fid]), "", protocol_markdown(fid)]
    counts: dict[str, int] = {}
    for s in report["layers"].values():
        counts[s] = counts.get(s, 0) + 1
    lines += ["", "| layer spec | layers |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in sorted(counts.items())]
    return "\n".join(lines) + "\n"
