"""Static performance MODEL of the WNA16 Triton kernels from their compiled SASS (no GPU needed).

This is a model, not a timing. For every kernel variant the dispatcher would pick
(bits 2..8, sym/asym, M = 1 (GEMV) and M = 4/16 (tl.dot), Llama-3-8B and reference
model shapes), the script compiles the kernel for sm_80 and sm_90 with the launch
config that kernels/autotune.py would use (kernels/sass.py), reads registers,
spills, shared memory and the inner K loop, and predicts the fraction of the
ideal speedup over fp16 on H100 and H200:

    t_ideal   = N*K*(b + 16/G [+ b/G if asym]) / 8 / BW          (the issue's ideal)
    t_mem     = bytes actually moved (padded containers, scales, zeros, x, y) / BW
    t_issue   = loop SASS per warp-iteration * warp-iterations / (SMs * 4 * f)
    t_flight  = weight bytes / min(BW, SMs * bytes_in_flight_per_SM / latency)
    fraction  = t_ideal / max(t_mem, t_issue, t_flight)

bytes in flight per SM = resident warps (registers, shared memory, grid) x one
iteration's weight loads per warp (all issued before first use), times num_stages - 1
for the tensor-core kernel, whose pipelined cp.async loads run that many tiles ahead. With split-K
(M == 1 and M <= 16) the fp32 partial tiles are counted in t_mem as if they went
to DRAM, an upper bound on the atomics' cost. Device constants (stated, not
measured): H100 SXM 3.35 TB/s, H200 4.8 TB/s, 132 SMs, 4 schedulers x 1.98 GHz,
600 ns DRAM latency, 64K registers and 228 KB shared memory per SM. The loop's instruction
count is exact (from SASS); everything outside the loop is ignored.

    python benchmarks/kernel_model.py            # -> benchmarks/results/kernel_model.{json,png}
    python benchmarks/kernel_model.py --quick    # one shape per family, for a look

Rows: kernel, device, arch, bits, symmetric, m, shape ("KxN"), registers, spills,
shared_bytes, weight_request_ratio, sass_per_weight_byte, barriers/shuffles in
the loop, the three times and predicted_fraction_of_ideal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vllm_slq.fileio import atomic_write_json
from vllm_slq.kernels import autotune, triton_wna16
from vllm_slq.kernels.layout import container_format, padded_n
from vllm_slq.kernels.sass import SASS_BUDGET, SassError, compile_variant
import gemlite_sass
from common import save_figure

RESULTS = Path(__file__).resolve().parent / "results"

DEVICES = {  # stated constants of the model
    "H100": {"bw": 3.35e12, "sms": 132, "clock": 1.98e9, "config": "nvidia_h100"},
    "H200": {"bw": 4.8e12, "sms": 132, "clock": 1.98e9, "config": "nvidia_h200"},
}
SCHEDULERS = 4
LATENCY_S = 600e-9
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SMEM_PER_SM = 228 * 1024  # Hopper: shared memory per SM, of which each CTA also reserves 1 KB
SMEM_PER_CTA = 1024

# (name, K, N) -- N = out_features, K = in_features
LLAMA_8B = [("q/o_proj", 4096, 4096), ("k/v_proj", 4096, 1024), ("gate/up_proj", 4096, 14336),
            ("down_proj", 14336, 4096)]
# how many of each shape one Llama-3-8B decoder layer holds (q and o, k and v, gate and up, down)
LLAMA_8B_COUNT = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}
REFERENCE = [("q/o_proj", 576, 576), ("k/v_proj", 576, 192), ("gate/up_proj", 576, 1536), ("down_proj", 1536, 576)]


def ideal_bits(bits: int, group: int, symmetric: bool) -> float:
    return bits + 16 / group + (0 if symmetric else bits / group)


def actual_bytes(bits: int, group: int, symmetric: bool, k: int, n: int, m: int, split: int = 1) -> float:
    """Bytes moved: padded containers, scales (and zeros), x, y; with split-K the fp32 y
    buffer is zeroed, receives `split` partial tiles by atomics and is read back once. The
    atomics reduce in L2; counting them at DRAM bandwidth is an upper bound on their cost."""
    fmt = container_format(bits)
    npad, kpad = padded_n(n), fmt.padded_k(k)
    groups = -(-kpad // group)
    w = fmt.container_rows(k) * npad * fmt.container_bits / 8
    meta = groups * npad * 2 * (1 if symmetric else 2)
    y = m * n * 2 if split == 1 else m * n * 4 * (split + 2)
    return w + meta + m * k * 2 + y


def predict(v, dev: dict, bits: int, group: int, symmetric: bool, k: int, n: int, m: int, cfg: dict) -> dict:
    bw, sms, clock = dev["bw"], dev["sms"], dev["clock"]
    fmt = container_format(bits)
    w_bytes = fmt.container_rows(k) * padded_n(n) * fmt.container_bits / 8
    tiles = fmt.padded_k(k) // fmt.tile_k
    split = max(1, min(int(cfg.get("SPLIT_K", 1)), tiles))
    t_ideal = n * k * ideal_bits(bits, group, symmetric) / 8 / bw
    t_mem = actual_bytes(bits, group, symmetric, k, n, m, split) / bw
    bytes_per_warp_iter = v.unique_weight_bytes_per_thread * 32
    warp_iters = w_bytes / bytes_per_warp_iter
    t_issue = v.loop_instructions * warp_iters / (sms * SCHEDULERS * clock)
    block_n = int(cfg["BLOCK_N"])
    n_tiles = padded_n(n) // block_n
    programs = n_tiles * split * (1 if m == 1 else -(-m // int(cfg["BLOCK_M"])))
    # the tensor-core loop is software-pipelined: its cp.async loads run num_stages - 1 tiles
    # ahead; the GEMV's loads are not (its SASS loads and uses each tile in one iteration)
    ahead = max(1, int(cfg.get("num_stages", 2)) - 1) if v.kernel == "_wna16_dot_kernel" else 1
    return _roofline(dev, w_bytes, t_ideal, t_mem, t_issue, v.registers, v.shared_bytes, v.num_warps, programs,
                     bytes_per_warp_iter * ahead)


def _roofline(dev: dict, w_bytes: float, t_ideal: float, t_mem: float, t_issue: float, registers: int,
              shared_bytes: int, num_warps: int, programs: int, flight_bytes_per_warp: float) -> dict:
    """The bytes-in-flight bound (resident warps from registers, shared memory and the grid)
    and the verdict: the largest of the three times."""
    sms = dev["sms"]
    reg_warps = REGS_PER_SM // max(1, registers * 32)
    smem_warps = SMEM_PER_SM // (shared_bytes + SMEM_PER_CTA) * num_warps  # resident CTAs x warps
    warps_per_sm = min(MAX_WARPS_PER_SM, reg_warps, smem_warps, max(1, programs * num_warps // sms))
    t_flight = w_bytes / min(dev["bw"], sms * warps_per_sm * flight_bytes_per_warp / LATENCY_S)
    t = max(t_mem, t_issue, t_flight)
    bound = {t_mem: "memory", t_issue: "issue", t_flight: "bytes in flight"}[t]
    return dict(t_ideal_us=t_ideal * 1e6, t_mem_us=t_mem * 1e6, t_issue_us=t_issue * 1e6,
                t_flight_us=t_flight * 1e6, bound=bound, warps_per_sm=warps_per_sm,
                predicted_fraction_of_ideal=t_ideal / t)


def config_for(device: str, bits: int, m: int, n: int, k: int) -> dict:
    """What a launch on `device` gets from the shipped data: its entry for the shape, else the heuristic."""
    table = autotune.device_table(device)
    entry = table["entries"].get(autotune.config_key(bits, m, n, k))
    if entry is not None:
        return dict(entry)
    return autotune.heuristic_config(bits, m, n, k, table["num_sms"], table["defaults"])


# Block configs the search tries for the small-M tensor-core path (BLOCK_M 16: one mma tile of rows).
DOT_SMALL_CANDIDATES = [{"BLOCK_M": 16, "BLOCK_N": bn, "GROUP_M": 8, "num_warps": w, "num_stages": st}
                        for bn in (64, 128, 256, 512) for w in (4, 8) for st in (2, 3, 4) if bn >= 32 * w]
SPLITS = (1, 2, 4, 8, 16, 32, 64)


def gemv_candidates(bits: int) -> list[dict]:
    """GEMV block configs with warps along N and each thread on all 16 rows of VEC_N columns
    (BLOCK_N = VEC_N x 32 x num_warps), with 32- to 128-bit loads per row."""
    widest = 128 // container_format(bits).container_bits
    vecs = [v for v in (1, 2, 4, 8) if widest // 4 <= v <= widest]
    # 1-2 warps: narrow layers whose N_pad only 64 or 128 divides (reference model: N 576, 192)
    return [{"BLOCK_N": v * 32 * w, "num_warps": w, "num_stages": 2, "VEC_N": v} for v in vecs for w in (1, 2, 4, 8)]
SEARCH_M = (1, 2, 4, 8, 16)  # the M buckets of the GEMV and small-M paths


def best_configs(device: str, shapes, bits_list, cache: dict, arch: int = 90) -> dict:
    """Per (bits, M bucket, N, K): the launch config with the best predicted fraction of
    the ideal (time-weighted over sym and asym), among those the CI gates accept (0
    spills, each weight word loaded once). GEMV: the shipped default and gemv_candidates;
    M 2..16: DOT_SMALL_CANDIDATES; each with every split-K. The model of a split-K > 1
    program also stands for split 1 (same loop; the epilogue differs)."""
    dev, table = DEVICES[device], autotune.device_table("NVIDIA " + device)
    entries, ungated = {}, []
    jobs = [(name, k, n, b, m) for name, k, n in shapes for b in bits_list for m in SEARCH_M]
    for name, k, n, b, m in tqdm(jobs, desc=f"config search {device}", file=sys.stderr):
        group = 128 if k % 128 == 0 else 64
        tiles = container_format(b).padded_k(k) // container_format(b).tile_k
        if m <= autotune.GEMV_MAX_M:
            default = autotune.heuristic_config(b, 1, n, k, table["num_sms"], table["defaults"])
            default.pop("SPLIT_K")
            path, blocks = "gemv", [default] + gemv_candidates(b)
        else:
            path, blocks = "dot", DOT_SMALL_CANDIDATES
        scored = []
        # as a launch on this shape would run them (BLOCK_N dividing N_pad), each once
        resolved = {tuple(sorted(c.items())): c for c in
                    (triton_wna16.launch_blocks(path, b, blk, padded_n(n)) for blk in blocks)}
        for block in resolved.values():
            try:
                variants = [compiled(cache, path, b, sym, group, dict(block, SPLIT_K=2), arch, k)
                            for sym in (True, False)]
            except SassError:  # e.g. a tile too narrow for 16-byte weight loads: the gates cannot pass it
                continue
            for split in SPLITS:
                if split > tiles:
                    break
                cfg = dict(block, SPLIT_K=split)
                preds = [predict(v, dev, b, group, sym, k, n, m, cfg) for v, sym in zip(variants, (True, False))]
                score = sum(p["t_ideal_us"] for p in preds) / sum(p["t_ideal_us"] / p["predicted_fraction_of_ideal"]
                                                                   for p in preds)
                scored.append((score, len(scored), cfg))
        # the best config that CI's gates accept, exactly as they compile it (both archs)
        best = next((cfg for _, _, cfg in sorted(scored, key=lambda t: (-t[0], t[1]))
                     if passes_gates(cache, path, b, cfg)), None)
        key = autotune.config_key(b, m, n, k)
        if best is None:  # no entry: such a launch takes the heuristic config, which the gates do not pass either
            ungated.append(key)
            continue
        entries[key] = best
    return entries, ungated


def passes_gates(cache: dict, path: str, bits: int, cfg: dict, archs=(80, 90)) -> bool:
    """tests/test_kernel_sass.py's gates for one config: 0 spills, each weight word loaded once,
    no barriers in a GEMV loop, SASS per weight byte within SASS_BUDGET."""
    for arch in archs:
        try:
            v = compiled(cache, path, bits, False, 128, cfg, arch)  # asymmetric g128, as the gates compile it
        except SassError:
            return False
        if v.spill_bytes or abs(v.weight_request_ratio - 1.0) > 1e-6:
            return False
        if path == "gemv" and v.barriers_in_loop:
            return False
        if v.sass_per_weight_byte > SASS_BUDGET[path][bits]:
            return False
    return True


def export_configs(bits_list, cache: dict) -> dict:
    """Write the model's best configs into kernels/configs/<device>.json "entries" (atomic write)."""
    written = {}
    for device, dev in DEVICES.items():
        path = autotune.CONFIG_DIR / f"{dev['config']}.json"
        data = json.loads(path.read_text())
        found, ungated = best_configs(device, LLAMA_8B + REFERENCE, bits_list, cache)
        data["entries"] = dict(sorted(found.items()))
        # shapes where, with BLOCK_N cut to divide N_pad, no candidate passes the CI gates
        data["no_gate_passing_config"] = ungated
        data["entries_source"] = ("MODEL, not measured: benchmarks/kernel_model.py --export-configs picked each "
                                  "entry as the best predicted config for Llama-3-8B and reference-model shapes; "
                                  "a measured `benchmarks/kernel_timing.py --tune --export-configs` run replaces them")
        atomic_write_json(path, data)
        written[str(path)] = len(found)
    autotune.shipped_configs.cache_clear()
    return written


def compiled(cache: dict, path: str, bits: int, sym: bool, group: int, cfg: dict, arch: int, k: int = 0):
    """compile_variant, memoised; split-K only changes the code between 1 (store) and > 1 (atomics).
    k: the layer's K, when known (a K that is a multiple of the tile compiles the GEMV's x loads
    without masks, as the launcher does); 0 compiles the masked code, a superset, as the gates do."""
    ccfg = _code_config(path, cfg)
    even_k = bool(k) and path == "gemv" and k % container_format(bits).tile_k == 0
    key = (path, bits, sym, group, arch, even_k, tuple(sorted(ccfg.items())))
    if key not in cache:
        cache[key] = compile_variant(path, bits, sym, group, ccfg, arch=arch, even_k=even_k)
    return cache[key]


def run(shapes: dict, bits_list, ms, archs, symmetries, cache: dict | None = None) -> list[dict]:
    rows, cache = [], ({} if cache is None else cache)
    jobs = [(fam, name, k, n, b, sym, m, arch, dev) for fam, ss in shapes.items() for name, k, n in ss
            for b in bits_list for sym in symmetries for m in ms for arch in archs for dev in DEVICES]
    for fam, name, k, n, b, sym, m, arch, dev in tqdm(jobs, desc="kernel model", file=sys.stderr):
        group = 128 if k % 128 == 0 else 64
        path = "gemv" if m <= autotune.GEMV_MAX_M else "dot"
        cfg = triton_wna16.launch_blocks(path, b, config_for("NVIDIA " + dev, b, m, n, k), padded_n(n))
        try:
            v = compiled(cache, path, b, sym, group, cfg, arch, k)
        except SassError as e:  # a narrow layer's tile with no 16-byte weight loads: not modelled
            rows.append(dict(kernel="ours", device=dev, arch=f"sm_{arch}", family=fam, layer=name, bits=b,
                             symmetric=sym, m=m, shape=f"{k}x{n}", group_size=group, path=path, config=cfg,
                             error=str(e)))
            continue
        pred = predict(v, DEVICES[dev], b, group, sym, k, n, m, cfg)
        rows.append(dict(kernel="ours", device=dev, arch=f"sm_{arch}", family=fam, layer=name, bits=b,
                         symmetric=sym, m=m, shape=f"{k}x{n}", group_size=group, path=path,
                         config={kk: vv for kk, vv in cfg.items()}, registers=v.registers,
                         spills=v.spill_bytes, shared_bytes=v.shared_bytes,
                         weight_request_ratio=round(v.weight_request_ratio, 4),
                         sass_per_weight_byte=round(v.sass_per_weight_byte, 3),
                         loop_instructions=v.loop_instructions, barriers_in_loop=v.barriers_in_loop,
                         shuffles_in_loop=v.shuffles_in_loop, weight_loads=dict(v.weight_loads),
                         **{kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in pred.items()}))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (kernel, device, bits, m): the Llama-8B decoder layer's time-weighted fraction, each
    shape counted as often as the layer holds it (LLAMA_8B_COUNT; sm_90; ours over sym and
    asym, gemlite asymmetric)."""
    out = {}
    for r in rows:
        if r["family"] != "llama-8b" or r["arch"] != "sm_90" or "predicted_fraction_of_ideal" not in r:
            continue
        key = (r["kernel"], r["device"], r["bits"], r["m"])
        acc = out.setdefault(key, [0.0, 0.0])
        count = LLAMA_8B_COUNT[r["layer"]]
        acc[0] += count * r["t_ideal_us"]
        acc[1] += count * r["t_ideal_us"] / r["predicted_fraction_of_ideal"]
    return [dict(kernel=kn, device=d, bits=b, m=m, predicted_fraction_of_ideal=round(i / t, 3))
            for (kn, d, b, m), (i, t) in sorted(out.items())]


def print_table(summ: list[dict]) -> None:
    ours = [s for s in summ if s["kernel"] == "ours"]
    ms = sorted({s["m"] for s in ours})

    def cell(kernel, dev, b, m):
        return next((f"{s['predicted_fraction_of_ideal']:.0%}" for s in summ
                     if (s["kernel"], s["device"], s["bits"], s["m"]) == (kernel, dev, b, m)), "-")
    for dev in DEVICES:
        print(f"\n{dev} (MODEL), Llama-3-8B linears, sm_90: predicted fraction of the ideal speedup")
        print("bits | " + " | ".join(f"M={m}" for m in ms) + " | gemlite M=1")
        for b in sorted({s["bits"] for s in ours}):
            print(f"{b:4d} | " + " | ".join(cell("ours", dev, b, m) for m in ms) + f" | {cell('gemlite', dev, b, 1)}")


# gemlite's decode kernel (GEMV_REVSPLITK) serves W_nbits < 8 at M = 1; 8-bit decode is another kernel
GEMLITE_BITS = (2, 4)


def predict_gemlite(r: dict, dev: dict, bits: int, k: int, n: int) -> dict:
    """The same roofline for a gemlite program (benchmarks/gemlite_sass.py): no K loop, so the
    issue time counts every instruction of every program; bytes: b-bit int32 packing, fp16
    scales and zeros per group of 128, x, and y by fp16 atomics from both K halves."""
    bw, sms, clock = dev["bw"], dev["sms"], dev["clock"]
    t_ideal = n * k * ideal_bits(bits, 128, False) / 8 / bw
    w_bytes = n * k * bits / 8
    t_mem = (w_bytes + 2 * (k // 128) * n * 2 + k * 2 + 2 * n * 2) / bw
    t_issue = r["instructions"] * r["num_warps"] * r["programs"] / (sms * SCHEDULERS * clock)
    return _roofline(dev, w_bytes, t_ideal, t_mem, t_issue, r["registers"], r["shared_bytes"], r["num_warps"],
                     r["programs"], r["unique_weight_bytes_per_thread"] * 32)


def gemlite_rows(archs) -> list[dict]:
    """gemlite's M = 1 kernel on the Llama-8B shapes, compiled as ours are, at the config its
    autotuner would most likely keep: its cached H100 entry for the shape, else the best
    predicted of its own "fast" autotune list (the model's best: generous to gemlite)."""
    out, compiled_gemlite = [], {}
    for dev_name, dev in DEVICES.items():
        for name, k, n in LLAMA_8B:
            for bits in GEMLITE_BITS:
                for arch in archs:
                    _, source = gemlite_sass.launch_config(bits, k, n)
                    cands = [None] if source == "h100.json" else gemlite_sass.fast_configs()
                    scored = []
                    for cfg in cands:
                        key = (bits, k, n, arch, tuple(sorted((cfg or {}).items())))
                        if key not in compiled_gemlite:
                            try:
                                compiled_gemlite[key] = gemlite_sass.compile_gemlite_gemv(bits, k, n, arch, cfg)
                            except (ValueError, SassError):  # pruned by gemlite's own rules, or no weight loads
                                compiled_gemlite[key] = None
                        r = compiled_gemlite[key]
                        if r is None:
                            continue
                        scored.append((predict_gemlite(r, dev, bits, k, n), r))
                    pred, r = max(scored, key=lambda t: t[0]["predicted_fraction_of_ideal"])
                    out.append(dict(kernel="gemlite", device=dev_name, arch=f"sm_{arch}", family="llama-8b",
                                    layer=name, bits=bits, symmetric=False, m=1, shape=f"{k}x{n}", group_size=128,
                                    path="gemv_revsplitK", config=r["config"],
                                    config_source=("gemlite/configs/h100.json" if source == "h100.json"
                                                   else "gemlite's fast autotune list, best predicted"),
                                    registers=r["registers"], spills=r["spill_bytes"],
                                    shared_bytes=r["shared_bytes"],
                                    weight_request_ratio=round(r["weight_request_ratio"], 4),
                                    sass_per_weight_byte=round(r["sass_per_weight_byte"], 3),
                                    instructions=r["instructions"], programs=r["programs"],
                                    weight_loads=r["weight_loads"],
                                    **{kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in pred.items()}))
    return out


def plot(summ: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DEVICES), figsize=(11, 4), sharey=True)
    for ax, dev in zip(axes, DEVICES):
        for m in sorted({s["m"] for s in summ if s["kernel"] == "ours"}):
            pts = [(s["bits"], s["predicted_fraction_of_ideal"]) for s in summ
                   if s["kernel"] == "ours" and s["device"] == dev and s["m"] == m]
            ax.plot(*zip(*pts), marker="o", label=f"ours, M={m}")
        gl = [(s["bits"], s["predicted_fraction_of_ideal"]) for s in summ
              if s["kernel"] == "gemlite" and s["device"] == dev]
        if gl:
            ax.plot(*zip(*gl), "ks-", label="gemlite 0.6, M=1 (compiled here, same model)")
        if dev == "H200":  # the issue quoted H200 fractions
            ax.plot([2, 4, 8], [0.27, 0.50, 0.875], "k:", marker="x", label="gemlite 0.6, M=1 (as quoted in issue #19)")
        ax.axhline(0.85, color="grey", lw=0.5)
        ax.axhline(0.70, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{dev}: MODEL, Llama-3-8B linears (sm_90 SASS)")
        ax.set_xlabel("bits")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted fraction of ideal speedup")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def shipped_variants() -> list[tuple[str, int, dict]]:
    """(path, bits, config) for every launch config the shipped data can hand out."""
    tables = [{"defaults": autotune._FALLBACK_DEFAULTS}] + list(autotune.shipped_configs())
    out = []
    for t in tables:
        d = t["defaults"]
        for bits in range(2, 9):
            out.append(("gemv", bits, dict(d["gemv"][str(bits)])))
            for key in ("dot_small", "dot"):
                out.append(("dot", bits, dict(d[key])))
        for key, cfg in t.get("entries", {}).items():
            b, mb = int(key.split("|")[0]), int(key.split("|")[1])
            out.append(("gemv" if mb <= autotune.GEMV_MAX_M else "dot", b, dict(cfg)))
    # split-K only changes the compiled code between 1 and > 1 (kernel_model.compiled)
    uniq = {(p, b, tuple(sorted(_code_config(p, c).items()))): (p, b, _code_config(p, c)) for p, b, c in out}
    return list(uniq.values())


def _code_config(path: str, cfg: dict) -> dict:
    out = dict(cfg)
    if "SPLIT_K" in out:
        out["SPLIT_K"] = 1 if int(out["SPLIT_K"]) == 1 and path == "dot" else 2
    return out


def gate_rows(archs=(80, 90)) -> list[dict]:
    """Compile every shipped config (asymmetric: the superset of the symmetric code) for CI's gates."""
    rows = []
    jobs = [(p, b, c, a) for p, b, c in shipped_variants() for a in archs]
    for path, bits, cfg, arch in tqdm(jobs, desc="kernel gates", file=sys.stderr):
        v = compile_variant(path, bits, False, 128, cfg, arch=arch)
        rows.append(dict(path=path, bits=bits, arch=f"sm_{arch}", config=cfg, registers=v.registers,
                         spills=v.spill_bytes, shared_bytes=v.shared_bytes,
                         weight_request_ratio=v.weight_request_ratio,
                         sass_per_weight_byte=v.sass_per_weight_byte, barriers_in_loop=v.barriers_in_loop,
                         shuffles_in_loop=v.shuffles_in_loop))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "kernel_model.json")
    ap.add_argument("--quick", action="store_true", help="one Llama shape and M=1 only")
    ap.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)))
    ap.add_argument("--gates", action="store_true",
                    help="compile every shipped config for sm_80/sm_90 and write only those rows (CI)")
    ap.add_argument("--export-configs", action="store_true",
                    help="write the model's best config per Llama-8B/reference shape into kernels/configs (MODEL)")
    args = ap.parse_args(argv)
    t0 = time.time()
    cache: dict = {}  # compiled variants, shared by the config search and the model run
    if args.export_configs:
        for path, count in export_configs(args.bits, cache).items():
            print(f"wrote {count} model-picked entries into {path}")
    if args.gates:
        atomic_write_json(args.out, {"gates": gate_rows(), "wall_s": round(time.time() - t0, 1)})
        print(f"wrote {args.out}")
        return 0
    if args.quick:
        shapes, ms, archs = {"llama-8b": LLAMA_8B[:1]}, [1], [90]
    else:
        shapes, ms, archs = {"llama-8b": LLAMA_8B, "reference": REFERENCE}, [1, 4, 16], [80, 90]
    rows = run(shapes, args.bits, ms, archs, (True, False), cache)
    try:
        rows += gemlite_rows([90] if args.quick else [90, 80])
        gemlite_status = "compiled"
    except gemlite_sass.GemliteNotFound as e:
        gemlite_status = f"not compiled: {e}"
        print(f"gemlite rows skipped: {e}", file=sys.stderr)
    summ = summary(rows)
    print_table(summ)
    data = {"what": "MODEL: predicted fraction of the ideal speedup from compiled SASS; not a timing",
            "devices": DEVICES, "latency_s": LATENCY_S, "schedulers": SCHEDULERS,
            "gemlite_quoted": {"source": "issue #19 (gemlite 0.6 compiled the same way)",
                               "H200_m1": {"2": 0.27, "4": 0.50, "8": 0.875}},
            "gemlite": gemlite_status,
            "summary": summ, "rows": rows, "wall_s": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, data)
    plot(summ, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} ({len(rows)} rows, {data['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
