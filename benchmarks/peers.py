"""llama.cpp's K-quant mixes on SLQ's own protocol: what local users already run, scored like SLQ.

    PYTHONPATH=.. python peers.py                 # build llama.cpp once, quantize, score, compare
    PYTHONPATH=.. python peers.py --mixes Q4_K_M  # a subset

Steps (each output cached under --work, default ~/.cache/vllm-slq-peers; a step whose
output exists is skipped):

1. llama.cpp from source: the `llama-cpp-python` sdist on PyPI vendors it (LLAMA_CPP_SDIST);
   cmake builds only `llama-quantize` and `llama-imatrix` (CPU, ~15 min on 2 cores).
2. The reference model's FP16 weights (the ones every SLQ number is measured against) as
   an F16 GGUF with the original GGUF's metadata and tokenizer (``f16_gguf``).
3. An importance matrix from the calibration tokens SLQ's GPTQ database fits (the first
   --calib-blocks blocks of --seq-len tokens of Brown's calibration split, decoded to text;
   llama-imatrix re-tokenizes it with the same vocabulary in --seq-len contexts).
4. Each mix of MIXES by `llama-quantize`, without and with that imatrix.
5. Each GGUF dequantized by transformers' GGUF loader (fp32) and scored by our evaluation
   against the FP model on slq.py's held-out blocks (Brown's evaluation split): KL, EAR with
   its bootstrap CI, top-1, perplexity, and the per-sequence sums the paired tests need.
   Only the weights differ: same tokens, same fp32 forward, same full-vocabulary softmax.
6. Bits per weight from the GGUF's stored tensor bytes, identically for every system: over
   the decoder linears (q/k/v/o/gate/up/down, SLQ's "bpp") and over every parameter as
   stored (token embedding = tied lm_head, norms). llama.cpp also quantizes the embedding;
   SLQ keeps it in fp16, which the whole-model column shows.
7. SLQ at each mix's bpw over the linears: read from the slq.py results (--slq-json,
   default results/slq_peer_budgets.json, written by `slq.py --budgets <these bpws>` on the
   same protocol); a mix with no SLQ row at its bpw is reported as missing (the command
   that measures it is printed). Where slq.py also tuned the point's scales (--tune-steps,
   as SLQModifier does by default) the tuned row is SLQ's, and the allocation-only row is
   compared too ("allocation_only").
   Paired comparisons on the same held-out sequences: KL ratio SLQ / best peer (imatrix or
   not) with a paired bootstrap 95% CI, and the EAR difference.

K-quants need rows of 256 weights: on a model whose hidden size is not a multiple of 256
(the reference model's is 576) llama-quantize falls back to a legacy type per tensor
(e.g. q5_0 for q4_K). The tensor types each GGUF actually stores are recorded per mix.

Optional: auto-round (--auto-round BITS ...), Intel's SignRound: per decoder block, signed-
gradient descent on the rounding offsets and the min/max clipping of each group, fitted to
the block's FP output on the same calibration blocks SLQ's GPTQ uses. It runs on the
asymmetric g64 grid of SLQ's database (fp16 scale, b-bit zero point: the same bpw as
uniform_asym w<b>), so its row is compared, paired, with slq.py's uniform GPTQ row of that
width: the quantizer alone, on one format. Its default 200 iterations per block are for a
GPU (--auto-round-device cuda): on this 2-core CPU one iteration of one block on 32 x 512
tokens is several seconds.

Writes results/peers.json (read by our checks: "comparisons", one per mix) and peers.png
(KL and EAR against bpw over the linears, every system).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, print_table, save_figure, write_json
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize
from slq import heldout_metrics
from transformers import AutoModelForCausalLM

from vllm_slq.allocation.problem import linear_shapes
from vllm_slq.data import MODEL_ALIASES, gguf_path, load_model, load_text, token_blocks
from vllm_slq.eval.hf_backend import HFRunner
from vllm_slq.eval.metrics import paired_bootstrap_ci
from vllm_slq.fileio import atomic_path
from vllm_slq.quant.spec import QuantSpec

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
# llama.cpp's README table (Llama-3-8B, mean KLD vs FP16) is the issue's; these are its names
MIXES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class PeerError(RuntimeError):
    pass


def _run(cmd: list[str], log: Path, **kw) -> None:
    """Run a tool with its output in log; on failure, name the command and the log's tail."""
    if shutil.which(cmd[0]) is None:
        raise PeerError(f"{cmd[0]} not found: peers.py builds llama.cpp from source (cmake, a C++ compiler)")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode:
        tail = log.read_text()[-2000:]
        raise PeerError(f"{Path(cmd[0]).name} exited {proc.returncode} (log {log}):\n{tail}")


# ------------------------------------------------------------------ llama.cpp build and tools
def build_llama_cpp(work: Path) -> Path:
    """The directory holding llama-quantize and llama-imatrix, built once."""
    name = LLAMA_CPP_SDIST.replace("==", "-").replace("-", "_", 2)  # llama_cpp_python-0.3.36
    src = work / name / "vendor" / "llama.cpp"
    bin_dir = work / "build" / "bin"
    if all((bin_dir / t).is_file() for t in ("llama-quantize", "llama-imatrix")):
        return bin_dir
    work.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        sdist = work / f"{name}.tar.gz"
        if not sdist.is_file():
            _run([sys.executable, "-m", "pip", "download", LLAMA_CPP_SDIST, "--no-deps", "--no-binary", ":all:",
                  "-d", str(work)], work / "download.log")
        with tarfile.open(sdist) as t:
            t.extractall(work, filter="data")
    print(f"[peers] building llama-quantize and llama-imatrix from {src} (once)", file=sys.stderr, flush=True)
    _run(["cmake", "-S", str(src), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=OFF"], work / "cmake.log")
    _run(["cmake", "--build", str(work / "build"), "--target", "llama-quantize", "llama-imatrix",
          "-j", str(os.cpu_count() or 2)], work / "build.log")
    return bin_dir


def f16_gguf(source: Path, out: Path) -> Path:
    """The reference model as an F16 GGUF: the source GGUF's metadata and tokenizer, every
    matrix dequantized to fp16 (vectors stay F32, as llama.cpp stores norms).

    The reference model is itself the fp16 dequantization of a GGUF (vllm_slq.data), so
    these are its exact weights (checked in tests/test_peers.py); converting its HF
    directory back with convert_hf_to_gguf.py instead mistakes the re-saved byte-level BPE
    tokenizer for SentencePiece, and llama-imatrix then fails to tokenize."""
    if out.is_file():
        return out
    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    with atomic_path(out) as tmp:
        w = GGUFWriter(str(tmp), arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue  # the writer's own header fields, and the file type set below
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        w.add_file_type(LlamaFileType.MOSTLY_F16)
        for t in reader.tensors:
            x = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            x = x.reshape([int(d) for d in reversed(t.shape)])
            w.add_tensor(t.name, x if x.ndim == 1 else x.astype(np.float16),
                         raw_dtype=GGMLQuantizationType.F32 if x.ndim == 1 else GGMLQuantizationType.F16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def reference_gguf() -> Path:
    """The GGUF the reference model (vllm_slq.data's alias) is dequantized from."""
    return gguf_path("smollm2-135m", MODEL_ALIASES["smollm2-135m"])


def make_imatrix(bin_dir: Path, f16: Path, text: str, seq_len: int, chunks: int, threads: int, out: Path) -> Path:
    if out.is_file():
        return out
    calib = out.with_suffix(".txt")
    calib.write_text(text)
    with atomic_path(out) as tmp:
        _run([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o", str(tmp), "-c", str(seq_len),
              "--chunks", str(chunks), "-t", str(threads)], out.with_suffix(".log"))
    return out


def quantize(bin_dir: Path, f16: Path, mix: str, imatrix: Path | None, threads: int, out: Path) -> Path:
    if out.is_file():
        return out
    with atomic_path(out) as tmp:
        cmd = [str(bin_dir / "llama-quantize")] + (["--imatrix", str(imatrix)] if imatrix else []) + \
              [str(f16), str(tmp), mix, str(threads)]
        _run(cmd, out.with_suffix(".log"))
    return out


# ------------------------------------------------------------------ bits per weight, as stored
def gguf_bits(path: Path) -> dict:
    """bpw over the decoder linears and over every stored parameter, and the types stored."""
    lin_bits = lin_n = all_bits = all_n = 0
    types: dict[str, dict[str, int]] = {}
    for t in GGUFReader(str(path)).tensors:
        bits, n = 8 * int(t.n_bytes), int(t.n_elements)
        all_bits, all_n = all_bits + bits, all_n + n
        role = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        if role in LINEAR_ROLES:
            lin_bits, lin_n = lin_bits + bits, lin_n + n
        types.setdefault(role, {})
        types[role][t.tensor_type.name] = types[role].get(t.tensor_type.name, 0) + 1
    if not lin_n:
        raise PeerError(f"{path}: no decoder linear tensors ({', '.join(LINEAR_ROLES)}) found")
    return {"bpw_linears": lin_bits / lin_n, "bpw_all": all_bits / all_n, "linear_params": lin_n,
            "all_params": all_n, "gguf_gb": path.stat().st_size / 1e9, "tensor_types": types}


# ------------------------------------------------------------------ scoring
class Scorer:
    """Held-out fidelity of a candidate model against the FP model: slq.py's held-out row."""

    def __init__(self, model, blocks: torch.Tensor, n_boot: int, seed: int):
        self.blocks, self.n_boot, self.seed = blocks, n_boot, seed
        self.ref = HFRunner(model, name="fp32 reference")
        self.ref.cache = {}  # the reference's hidden states are reused by every candidate

    def __call__(self, cand_model) -> dict:
        return heldout_metrics(self.ref, HFRunner(cand_model.eval(), name="peer"), self.blocks, self.n_boot,
                               self.seed)


AUTO_ROUND_GROUP = 64  # SLQ's database grid, so the row pairs with uniform_asym of its width


def linears_bpw(model, spec: QuantSpec) -> float:
    """bpw over the decoder linears (SLQ's, linear_shapes) of one spec at every linear."""
    shapes = linear_shapes(model)
    return sum(spec.bpp(s.in_features) * s.params for s in shapes) / sum(s.params for s in shapes)


def auto_round_model(model, tokenizer, calib: torch.Tensor, bits: int, iters: int, lr: float | None,
                     device: str):
    """A copy of `model` quantized by auto-round's SignRound (weight-only, asymmetric integer,
    groups of AUTO_ROUND_GROUP, lm_head and embeddings kept) on the token blocks `calib`
    [n, seq_len]; its linears hold the dequantized weights. lr None: auto-round's default
    (1 / iters)."""
    # imported here: an optional row, and auto_round's import is slow; its compressor turns on
    # deterministic algorithms process-wide, which is restored below
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    deterministic = torch.are_deterministic_algorithms_enabled()
    cand = copy.deepcopy(model)
    try:
        ar = AutoRound(cand, tokenizer=tokenizer,
                       scheme={"bits": bits, "group_size": AUTO_ROUND_GROUP, "sym": False, "data_type": "int",
                               "act_bits": 16},
                       alg_configs=SignRoundConfig(iters=iters, **({} if lr is None else {"lr": lr})),
                       dataset=list(calib.split(1)),  # our tokens: nothing is downloaded
                       nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=min(8, calib.shape[0]),
                       device_map=device, amp=False,  # amp would cast the model to bf16 in place
                       enable_torch_compile=False)
        qmodel, layer_config = ar.quantize()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for m in qmodel.modules():  # the calibration pass leaves the original bound forward behind
        m.__dict__.pop("forward", None)
        m.__dict__.pop("orig_forward", None)
    quantized = [n for n, c in layer_config.items() if c.get("bits", 16) < 16]
    expected = [s.name for s in linear_shapes(model)]
    if sorted(quantized) != sorted(expected):
        raise PeerError(f"auto-round quantized {len(quantized)} linears, not the {len(expected)} decoder linears: "
                        f"missing {sorted(set(expected) - set(quantized))[:3]}")
    return qmodel.to("cpu").float()


def auto_round_row(model, tokenizer, calib, bits: int, iters: int, lr: float | None, device: str,
                   scorer: "Scorer", uniform: dict | None, n_boot: int, seed: int) -> dict:
    """auto-round at `bits` scored like every peer, and paired with slq.py's uniform GPTQ row of
    that width (`uniform`, the same format and bpw) where there is one."""
    t = time.perf_counter()
    cand = auto_round_model(model, tokenizer, calib, bits, iters, lr, device)
    t_quant = time.perf_counter() - t
    bpw = linears_bpw(model, QuantSpec(bits, AUTO_ROUND_GROUP, False))
    row = {"name": f"auto-round w{bits}ag{AUTO_ROUND_GROUP}", "system": "auto-round", "bits": bits, "iters": iters,
           "lr": lr, "device": device, "calibration": list(calib.shape), "bpw_linears": bpw, **scorer(cand),
           "quantize_s": t_quant}
    del cand
    if uniform is not None:
        if abs(uniform["achieved_bpp"] - bpw) > 1e-6 or uniform.get("n_positions") != row["n_positions"]:
            raise PeerError(f"auto-round w{bits}: slq.py's uniform row is at {uniform['achieved_bpp']} bpw on "
                            f"{uniform.get('n_positions')} positions, not {bpw} on {row['n_positions']}")
        ratio, lo, hi = paired_bootstrap_ci(row["kl_seq_sums"], uniform["kl_seq_sums"], n_boot=n_boot, seed=seed)
        row["vs_uniform_gptq"] = {"gptq_kl": uniform["kl"], "kl_ratio": ratio, "kl_ratio_ci": [lo, hi]}
    return row


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def reference_grid(model, group: int = 32, levels: int = 16) -> dict:
    """How many of the reference's decoder-linear weight groups (`group` consecutive inputs)
    hold at most `levels` distinct values: 1.0 means the weights already lie on a
    levels-step grid per group (the reference is a dequantized Q4_1 GGUF), which formats
    with aligned groups of that size can reproduce exactly."""
    on_grid = total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features % group == 0 and name != "lm_head":
            rows = mod.weight.detach().reshape(-1, group)
            distinct = (rows.sort(-1).values.diff(dim=-1) != 0).sum(-1) + 1
            on_grid += int((distinct <= levels).sum())
            total += rows.shape[0]
    return {"group": group, "levels": levels, "groups": total, "share_on_grid": on_grid / max(total, 1)}


# ------------------------------------------------------------------ comparisons
def slq_row_at(rows: list[dict], bpw: float, tol: float, top: float | None = None,
               curve: str = "slq_asym") -> dict | None:
    """SLQ's row of `curve` at this bpw (within tol). At SLQ's top bpw (`top`, every layer at the
    widest option) the only allocation is uniform, so the uniform row of that width is SLQ's."""
    at = [r for r in rows if r["curve"] == curve and abs(r["achieved_bpp"] - bpw) <= tol]
    if not at and top is not None and abs(bpw - top) <= tol and curve == "slq_asym":
        at = [r for r in rows if r["curve"] == "uniform_asym" and abs(r["achieved_bpp"] - top) <= tol]
    return min(at, key=lambda r: abs(r["achieved_bpp"] - bpw)) if at else None


def compare(mix: str, peers: list[dict], slq: dict | None, n_boot: int, seed: int,
            untuned: dict | None = None) -> dict:
    """The mix's best peer against SLQ's row at its bpw: the product's (scale-tuned) row where
    --slq-json has one, else the allocation-only row; `untuned`, when `slq` is tuned, is also
    compared, as "allocation_only"."""
    best = min(peers, key=lambda r: r["kl"])
    out = {"mix": mix, "bpw": best["bpw_linears"], "bpw_all": best["bpw_all"], "best_peer": best["name"],
           "best_peer_kl": best["kl"], "best_peer_ear": best["ear"], "slq_kl": None, "kl_ratio": None,
           "kl_ratio_ci": None}
    if slq is None:
        out["missing"] = "no SLQ row at this bpw in --slq-json"
        return out
    if slq.get("n_positions") != best["n_positions"]:
        raise PeerError(f"{mix}: SLQ and {best['name']} were scored on different positions "
                        f"({slq.get('n_positions')} vs {best['n_positions']})")
    ratio, lo, hi = paired_bootstrap_ci(slq["kl_seq_sums"], best["kl_seq_sums"], n_boot=n_boot, seed=seed)
    out.update(slq_kl=slq["kl"], slq_ear=slq["ear"], slq_bpp=slq["achieved_bpp"], kl_ratio=ratio,
               kl_ratio_ci=[lo, hi], slq_lower_beyond_noise=hi < 1.0, meets_0_75=hi < 1.0 and ratio <= 0.75,
               slq_scale_tuned=slq.get("curve") == "slq_asym_tuned")
    if untuned is not None and untuned is not slq:
        r, lo, hi = paired_bootstrap_ci(untuned["kl_seq_sums"], best["kl_seq_sums"], n_boot=n_boot, seed=seed)
        out["allocation_only"] = {"slq_kl": untuned["kl"], "kl_ratio": r, "kl_ratio_ci": [lo, hi]}
    return out


def plot(peer_rows: list[dict], slq_rows: list[dict], uniform: list[dict], path: Path,
         auto_rows: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("llama.cpp", [r for r in peer_rows if not r["imatrix"]], "s"),
              ("llama.cpp + imatrix", [r for r in peer_rows if r["imatrix"]], "D"),
              ("SLQ, allocation only", [{"bpw_linears": r["achieved_bpp"], **r} for r in slq_rows
                                        if r["curve"] == "slq_asym"], "o"),
              ("SLQ + scale tuning (the product)", [{"bpw_linears": r["achieved_bpp"], **r} for r in slq_rows
                                                    if r["curve"] == "slq_asym_tuned"], "*"),
              ("uniform asym GPTQ g64", [{"bpw_linears": r["achieved_bpp"], **r} for r in uniform], "^"),
              ("auto-round asym g64", list(auto_rows), "v")]
    for label, rows, marker in series:
        rows = sorted(rows, key=lambda r: r["bpw_linears"])
        if rows:
            x = [r["bpw_linears"] for r in rows]
            a.semilogy(x, [r["kl"] for r in rows], marker + "-", label=label)
            b.plot(x, [r["ear"] for r in rows], marker + "-", label=label)
    for r in peer_rows:
        if not r["imatrix"]:
            a.annotate(r["mix"], (r["bpw_linears"], r["kl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    a.set_ylabel("held-out KL(FP || quantized), nats/token")
    b.set_ylabel("held-out EAR = sum_v min(p, q)")
    for ax in (a, b):
        ax.set_xlabel("bits per weight over the decoder linears (as stored)")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("Reference model, Brown held-out blocks: llama.cpp mixes vs SLQ")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", nargs="+", default=MIXES)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vllm-slq-peers")
    ap.add_argument("--seq-len", type=int, default=512, help="as the SLQ results in --slq-json")
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slq-json", type=Path, default=RESULTS / "slq_peer_budgets.json",
                    help="slq.py results on the same protocol, with SLQ rows at the mixes' bpw")
    ap.add_argument("--bpw-tolerance", type=float, default=0.01)
    ap.add_argument("--auto-round", type=int, nargs="*", default=[], metavar="BITS",
                    help="also auto-round (SignRound) at these widths, asymmetric g64, on the calibration blocks")
    ap.add_argument("--auto-round-iters", type=int, default=200, help="auto-round's default; for a GPU")
    ap.add_argument("--auto-round-lr", type=float, default=None, help="default: auto-round's (1 / iters)")
    ap.add_argument("--auto-round-device", default="cpu", help="e.g. cuda")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = ap.parse_args()
    unknown = [m for m in args.mixes if m not in MIXES]
    if unknown:
        ap.error(f"unknown mixes {unknown}; known: {MIXES}")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    slq_res = json.loads(args.slq_json.read_text())
    st = slq_res["settings"]
    if (st["seq_len"], st["calib_blocks"], st["eval_blocks"]) != (args.seq_len, args.calib_blocks, args.eval_blocks):
        raise PeerError(f"{args.slq_json} was measured with seq_len/calib/eval blocks "
                        f"{st['seq_len']}/{st['calib_blocks']}/{st['eval_blocks']}, not "
                        f"{args.seq_len}/{args.calib_blocks}/{args.eval_blocks}: not the same held-out text")

    bin_dir = build_llama_cpp(args.work)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    text = load_text("brown")
    calib = token_blocks(tok, text.calibration, args.seq_len, args.calib_blocks)  # GPTQ's blocks in slq.py
    held = token_blocks(tok, text.evaluation, args.seq_len, args.eval_blocks)
    f16 = f16_gguf(reference_gguf(), args.work / "reference-f16.gguf")
    imat = make_imatrix(bin_dir, f16, tok.decode(calib.flatten().tolist()), args.seq_len, args.calib_blocks,
                        args.threads, args.work / f"imatrix-brown-{args.calib_blocks}x{args.seq_len}.gguf")
    scorer = Scorer(model, held, args.n_boot, args.seed)
    # rows scored before are reused only on these very tokens (the splits' order has changed before)
    heldout_sha = hashlib.sha256(held.numpy().tobytes()).hexdigest()

    peer_rows = []
    prev, prev_auto = {}, {}
    if args.out.is_file():  # rows already scored (same protocol) are kept
        old = json.loads(args.out.read_text())
        if old.get("protocol", {}).get("heldout_sha256") == heldout_sha:
            prev = {r["name"]: r for r in old.get("peers", [])}
            prev_auto = {(r["bits"], r["iters"], r["lr"], r["device"]): r for r in old.get("auto_round", [])}
    for mix in args.mixes:
        for use_imatrix in (False, True):
            name = mix + ("+imatrix" if use_imatrix else "")
            if name in prev:
                peer_rows.append(prev[name])
                continue
            t = time.perf_counter()
            path = quantize(bin_dir, f16, mix, imat if use_imatrix else None, args.threads,
                            args.work / f"reference-{name.replace('+', '-')}.gguf")
            row = {"name": name, "mix": mix, "imatrix": use_imatrix, **gguf_bits(path)}
            cand = load_gguf(path)
            row.update(scorer(cand))
            del cand
            row["wall_s"] = time.perf_counter() - t
            print(f"  {name:16s} bpw linears {row['bpw_linears']:.3f} all {row['bpw_all']:.3f}  KL {row['kl']:.5f}  "
                  f"EAR {row['ear']:.4f} [{row['ear_lcb']:.4f}, {row['ear_ucb']:.4f}]  top1 {row['top1']:.4f}",
                  flush=True)
            peer_rows.append(row)

    auto_rows = [r for k, r in prev_auto.items() if k[0] not in args.auto_round]  # other widths measured before
    for bits in args.auto_round:
        key = (bits, args.auto_round_iters, args.auto_round_lr, args.auto_round_device)
        if key in prev_auto:
            auto_rows.append(prev_auto[key])
            continue
        uniform_b = next((r for r in slq_res["rows"] if r["curve"] == "uniform_asym"
                          and r.get("option") == QuantSpec(bits, AUTO_ROUND_GROUP, False).short()), None)
        row = auto_round_row(model, tok, calib, bits, args.auto_round_iters, args.auto_round_lr,
                             args.auto_round_device, scorer, uniform_b, args.n_boot, args.seed)
        v = row.get("vs_uniform_gptq")
        print(f"  {row['name']:16s} bpw linears {row['bpw_linears']:.3f}  KL {row['kl']:.5f}  EAR {row['ear']:.4f}  "
              f"{row['iters']} iters, {row['quantize_s']:.0f} s" +
              ("" if v is None else f"  / uniform GPTQ {v['kl_ratio']:.3f} [{v['kl_ratio_ci'][0]:.3f}, "
                                    f"{v['kl_ratio_ci'][1]:.3f}]"), flush=True)
        auto_rows.append(row)

    slq_rows = [r for r in slq_res["rows"] if r["curve"] in ("slq_asym", "slq_asym_tuned") and not r.get("probe")]
    uniform = [r for r in slq_res["rows"] if r["curve"] == "uniform_asym"]
    comparisons, missing = [], []
    lo, hi = slq_res["settings"]["feasible_bpp"]["asym"]
    for mix in args.mixes:
        rows = [r for r in peer_rows if r["mix"] == mix]
        budget = min(max(rows[0]["bpw_linears"], lo), hi)
        untuned = slq_row_at(slq_res["rows"], budget, args.bpw_tolerance, top=hi)
        tuned = slq_row_at(slq_res["rows"], budget, args.bpw_tolerance, curve="slq_asym_tuned")
        c = compare(mix, rows, tuned or untuned, args.n_boot, args.seed, untuned=untuned)
        c["slq_budget"] = budget
        if budget != rows[0]["bpw_linears"]:
            c["slq_budget_note"] = f"the mix's {rows[0]['bpw_linears']:.4f} bpw clipped to SLQ's range [{lo}, {hi}]"
        if c.get("missing"):
            missing.append(round(budget, 4))
        comparisons.append(c)
    result = {
        "what": "llama.cpp K-quant mixes vs SLQ on the reference model, same held-out tokens (slq.py's protocol)",
        "protocol": {"model": "smollm2-135m (the FP16 reference every SLQ number uses)", "llama_cpp": LLAMA_CPP_SDIST,
                     "calibration": f"imatrix from the first {args.calib_blocks} x {args.seq_len} Brown calibration "
                                    f"tokens (slq.py's GPTQ blocks), decoded to text",
                     "heldout": f"{args.eval_blocks} x {args.seq_len} Brown evaluation blocks, teacher-forced, fp32 "
                                f"full-vocabulary softmax (as --slq-json)",
                     "scoring": "GGUF dequantized by transformers' GGUF loader to fp32; bpw from stored tensor bytes",
                     "slq_json": str(args.slq_json.name),
                     "slq_json_settings": {k: st[k] for k in ("seq_len", "calib_blocks", "eval_blocks")},
                     "slq_tuning": st.get("tuning"), "heldout_sha256": heldout_sha,
                     "paired": f"{args.n_boot} bootstrap resamples of whole sequences, seed {args.seed}"},
        "reference_grid": reference_grid(model),
        "peers": peer_rows, "comparisons": comparisons, "auto_round": auto_rows, "wall_s": time.perf_counter() - t0,
    }
    cols = [("mix", "mix", "s"), ("bpw", "bpw linears", ".3f"), ("bpw_all", "bpw all (peer)", ".3f"),
            ("best_peer", "best llama.cpp", "s"), ("best_peer_kl", "its KL", ".5f"), ("slq_kl", "SLQ KL", ".5f"),
            ("kl_ratio", "SLQ / peer", ".3f"), ("ci_text", "paired 95% CI", "s")]
    for c in comparisons:
        c["ci_text"] = None if c["kl_ratio_ci"] is None else f"[{c['kl_ratio_ci'][0]:.3f}, {c['kl_ratio_ci'][1]:.3f}]"
    result["table"] = print_table(comparisons, cols)
    for c in comparisons:
        c.pop("ci_text")
    write_json(args.out, result)
    plot(peer_rows, slq_rows, uniform, args.out.with_suffix(".png"), auto_rows)
    if missing:
        print(f"\nSLQ rows missing at bpw {missing}; measure them on the same protocol with:\n"
              f"  PYTHONPATH=.. python slq.py --out {args.slq_json} --skip-sym --bisect-steps 0 "
              f"--seq-len {args.seq_len} --calib-blocks {args.calib_blocks} --eval-blocks {args.eval_blocks} "
              f"--rco-steps {slq_res['settings']['rco']['steps']} --budgets {' '.join(map(str, missing))}\n"
              f"(add --resume to keep the points already there)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
