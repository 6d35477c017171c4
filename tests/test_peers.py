"""benchmarks/peers.py's accounting: bits per weight read from a real GGUF file, and the paired comparison."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize


def _peers():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("_bench_peers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_gguf(path: Path, tensors: dict) -> None:
    w = GGUFWriter(str(path), "llama")
    for name, (arr, qtype) in tensors.items():
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, arr.astype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_bits_counts_stored_bytes_per_role(tmp_path):
    peers = _peers()
    rng = np.random.default_rng(0)
    q8, f16, f32 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16, GGMLQuantizationType.F32
    path = tmp_path / "m.gguf"
    _write_gguf(path, {
        "token_embd.weight": (rng.standard_normal((100, 64)).astype(np.float32), f16),
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64)).astype(np.float32), q8),
        "blk.0.ffn_down.weight": (rng.standard_normal((32, 64)).astype(np.float32), q8),
        "blk.0.attn_norm.weight": (np.ones(64, np.float32), f32),
    })
    b = peers.gguf_bits(path)
    # Q8_0: blocks of 32 int8 codes + one fp16 scale = 34 bytes per 32 weights = 8.5 bits
    assert b["bpw_linears"] == pytest.approx(8.5)
    assert b["linear_params"] == 64 * 64 + 32 * 64
    all_bits = 8.5 * (64 * 64 + 32 * 64) + 16 * 100 * 64 + 32 * 64
    assert b["bpw_all"] == pytest.approx(all_bits / (64 * 64 + 32 * 64 + 100 * 64 + 64))
    assert b["tensor_types"]["attn_q"] == {"Q8_0": 1} and b["tensor_types"]["token_embd"] == {"F16": 1}


def test_gguf_without_linears_is_named(tmp_path):
    peers = _peers()
    path = tmp_path / "embed-only.gguf"
    _write_gguf(path, {"token_embd.weight": (np.zeros((8, 32), np.float32), GGMLQuantizationType.F16)})
    with pytest.raises(peers.PeerError, match="embed-only.gguf: no decoder linear"):
        peers.gguf_bits(path)


def _row(name, kl_sums, positions=(10, 10, 10)):
    n = sum(positions)
    return {"name": name, "kl": sum(kl_sums) / n, "ear": 0.9, "bpw_linears": 4.5, "bpw_all": 4.6,
            "kl_seq_sums": list(kl_sums), "n_positions": n, "achieved_bpp": 4.5}


def test_compare_pairs_slq_with_the_best_peer():
    peers = _peers()
    plain, imat = _row("Q4_K_M", [4.0, 6.0, 2.0]), _row("Q4_K_M+imatrix", [2.0, 3.0, 1.0])
    slq = _row("slq", [1.0, 1.5, 0.5])
    c = peers.compare("Q4_K_M", [plain, imat], slq, n_boot=200, seed=0)
    assert c["best_peer"] == "Q4_K_M+imatrix"  # the lower KL of the two, whichever it is
    assert c["kl_ratio"] == pytest.approx(0.5)
    assert c["kl_ratio_ci"] == pytest.approx([0.5, 0.5])  # every sequence halves: no spread
    assert c["meets_0_75"] and c["slq_lower_beyond_noise"]
    missing = peers.compare("Q4_K_M", [plain], None, n_boot=10, seed=0)
    assert missing["kl_ratio"] is None and "no SLQ row" in missing["missing"]
    other_text = _row("slq", [1.0, 1.0], positions=(10, 10))
    with pytest.raises(peers.PeerError, match="different positions"):
        peers.compare("Q4_K_M", [plain], other_text, n_boot=10, seed=0)


def test_compare_uses_the_tuned_row_and_keeps_the_allocation_only_one():
    """SLQModifier tunes scales by default: the tuned row is SLQ's, the untuned one is reported beside it."""
    peers = _peers()
    best = _row("Q4_K_M+imatrix", [2.0, 3.0, 1.0])
    untuned = {**_row("slq", [1.0, 1.5, 0.5]), "curve": "slq_asym"}
    tuned = {**_row("slq", [0.5, 0.75, 0.25]), "curve": "slq_asym_tuned"}
    c = peers.compare("Q4_K_M", [best], tuned, n_boot=200, seed=0, untuned=untuned)
    assert c["slq_scale_tuned"] and c["kl_ratio"] == pytest.approx(0.25)
    assert c["allocation_only"]["kl_ratio"] == pytest.approx(0.5)
    assert c["allocation_only"]["kl_ratio_ci"] == pytest.approx([0.5, 0.5])
    alone = peers.compare("Q4_K_M", [best], untuned, n_boot=200, seed=0, untuned=untuned)
    assert not alone["slq_scale_tuned"] and "allocation_only" not in alone
    rows = [untuned, tuned]
    assert peers.slq_row_at(rows, 4.5, 0.01, curve="slq_asym_tuned") is tuned
    assert peers.slq_row_at(rows, 4.5, 0.01) is untuned
    w8 = [{"curve": "uniform_asym", "achieved_bpp": 8.375}]
    assert peers.slq_row_at(w8, 8.375, 0.01, top=8.375, curve="slq_asym_tuned") is None  # never tuned


def test_slq_row_at_matches_the_budget():
    peers = _peers()
    rows = [{"curve": "slq_asym", "achieved_bpp": 4.496}, {"curve": "slq_asym", "achieved_bpp": 5.0},
            {"curve": "uniform_asym", "achieved_bpp": 4.5}]
    assert peers.slq_row_at(rows, 4.5, 0.01)["achieved_bpp"] == 4.496
    assert peers.slq_row_at(rows, 4.7, 0.01) is None
    assert peers.slq_row_at(rows, 4.5, 0.01, top=4.5)["curve"] == "slq_asym"  # SLQ's own row first
    top = [{"curve": "uniform_asym", "achieved_bpp": 8.375}, {"curve": "uniform_asym", "achieved_bpp": 7.36}]
    assert peers.slq_row_at(top, 8.375, 0.01, top=8.375)["achieved_bpp"] == 8.375  # all-w8: the only choice
    assert peers.slq_row_at(top, 7.36, 0.01, top=8.375) is None  # uniform below the top is not SLQ


def test_f16_gguf_carries_the_reference_weights_exactly(tmp_path):
    """The F16 GGUF llama.cpp quantizes from is the reference model, bit for bit, as
    transformers' GGUF loader reads it back (and keeps the original's BPE tokenizer)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from vllm_slq.data import load_model

    peers = _peers()
    out = peers.f16_gguf(peers.reference_gguf(), tmp_path / "ref-f16.gguf")
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    ref, _ = load_model("smollm2-135m", dtype=torch.float32)
    sd_back = back.state_dict()
    for name, w in ref.state_dict().items():
        assert torch.equal(sd_back[name], w), name


def test_reference_grid_counts_groups_on_a_16_level_grid():
    import torch

    peers = _peers()
    lin = torch.nn.Linear(64, 2, bias=False)
    with torch.no_grad():
        codes = torch.randint(0, 16, (2, 64)).float()
        lin.weight.copy_(codes * 0.01 - 0.05)  # every group of 32: at most 16 values
        lin.weight[1, 32:] = torch.linspace(-1, 1, 32)  # one group with 32 distinct values
    g = peers.reference_grid(torch.nn.Sequential(lin))
    assert g["groups"] == 4 and g["share_on_grid"] == 0.75


def test_missing_build_tool_is_named(tmp_path):
    peers = _peers()
    with pytest.raises(peers.PeerError, match="no-such-cmake-xyz not found"):
        peers._run(["no-such-cmake-xyz", "--version"], tmp_path / "x.log")


def test_auto_round_row_quantizes_every_decoder_linear_on_the_g64_grid():
    """auto-round (real SignRound, 2 iterations) on a 2-layer cut of the reference model: every
    decoder linear dequantized onto an asymmetric 2^b-level grid per group of 64, the caller's
    model untouched, and the row paired with a uniform row of the same bpw."""
    import copy

    import torch

    from vllm_slq.data import load_model, load_text, token_blocks
    from vllm_slq.quant.grid import rtn as rtn_quantize
    from vllm_slq.quant.spec import QuantSpec

    peers = _peers()
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    text = load_text("brown")
    calib = token_blocks(tok, text.calibration, 64, 4)
    held = token_blocks(tok, text.evaluation, 64, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = peers.auto_round_model(model, tok, calib, bits=3, iters=2, lr=5e-3, device="cpu")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the caller's model is kept
    assert not torch.are_deterministic_algorithms_enabled()  # auto-round's global switch is undone
    qmods = dict(q.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = qmods[name].weight.detach()
            assert w.dtype == torch.float32 and not torch.equal(w, mod.weight), name
            groups = w.reshape(-1, 64).sort(-1).values
            assert int(((groups.diff(dim=-1) != 0).sum(-1) + 1).max()) <= 8, name
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)

    scorer = peers.Scorer(model, held, n_boot=50, seed=0)
    rtn = copy.deepcopy(model)
    spec = QuantSpec(3, 64, False)
    for name, mod in rtn.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = rtn_quantize(mod.weight.detach(), spec).dequantize(torch.float32)
    uniform = {"achieved_bpp": peers.linears_bpw(model, spec), **scorer(rtn)}
    row = peers.auto_round_row(model, tok, calib, 3, 2, 5e-3, "cpu", scorer, uniform, n_boot=50, seed=0)
    assert row["bpw_linears"] == pytest.approx(3 + 19 / 64)  # b bits + fp16 scale + b-bit zero per 64
    assert row["kl"] > 0 and 0 < row["ear"] < 1
    v = row["vs_uniform_gptq"]
    assert v["kl_ratio"] == pytest.approx(row["kl"] / uniform["kl"], rel=1e-6)
    assert v["kl_ratio_ci"][0] <= v["kl_ratio"] <= v["kl_ratio_ci"][1]
