"""Checkpoint writer/reader: mixed-precision round trip, HF transformers loads our files through
compressed-tensors and gets our dequantized weights, compressed-tensors accepts our config,
and every bad input fails with a named error leaving no output directory behind."""
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vllm_slq.checkpoint import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    InvalidQuantizedWeightError,
    LayoutError,
    MixedFusedModuleError,
    QuantConfigError,
    dequantized_model,
    expected_shapes,
    load_checkpoint,
    parse_quant_config,
    save_checkpoint,
)
from vllm_slq.checkpoint import layout
from vllm_slq.quant.grid import NonFiniteWeightError, rtn
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec, QuantSpecError
from vllm_slq.testing import tiny_llama

torch.set_num_threads(2)

# per-layer specs covering 3..8 bits, sym/asym, group 32/64/per-channel; fused shards agree
ATTN = [QuantSpec(3, 32, False), QuantSpec(5, 64, True)]
O_PROJ = [QuantSpec(8, None, False), QuantSpec(2, 32, True)]
GATE_UP = [QuantSpec(6, 64, True), QuantSpec(4, 32, False)]
DOWN = [QuantSpec(7, 32, False), QuantSpec(3, None, True)]


def tiny_specs(layers=2):
    specs = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj"):
            specs[f"{p}.self_attn.{n}"] = ATTN[i % 2]
        specs[f"{p}.self_attn.o_proj"] = O_PROJ[i % 2]
        for n in ("gate_proj", "up_proj"):
            specs[f"{p}.mlp.{n}"] = GATE_UP[i % 2]
        specs[f"{p}.mlp.down_proj"] = DOWN[i % 2]
    return specs


def quantize(model, specs):
    return {n: rtn(model.get_submodule(n).weight.detach().float(), s, n) for n, s in specs.items()}


def leftovers(parent: Path, name: str):
    """Anything the writer may have left next to out_dir (temp or old dirs)."""
    return sorted(p.name for p in parent.iterdir() if name in p.name)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=0)
    specs = tiny_specs()
    return model, specs, quantize(model, specs)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tiny_tokenizer, tmp_path_factory):
    model, specs, quantized = tiny
    out = tmp_path_factory.mktemp("ckpt") / "tiny-mixed"
    extra = {"method": "rtn"}
    save_checkpoint(model, quantized, out, tokenizer=tiny_tokenizer, extra=extra)
    return out


# ------------------------------------------------------------------ layout


def test_expected_shapes_follow_the_layout():
    shapes = expected_shapes(576, 1536, QuantSpec(3, 64, False))
    assert shapes == {"weight_packed": (576, 144), "weight_scale": (576, 24), "weight_shape": (2,),
                      "weight_zero_point": (54, 24)}
    sym = expected_shapes(100, 70, QuantSpec(5, None, True))
    assert sym == {"weight_packed": (100, 11), "weight_scale": (100, 1), "weight_shape": (2,)}
    with pytest.raises(QuantSpecError, match="layer 'x.y': group_size 64 does not divide in_features 96"):
        expected_shapes(8, 96, QuantSpec(4, 64), module="x.y")


def test_written_config_is_accepted_by_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.quantization")
    specs = tiny_specs()
    qc = layout.build_quant_config(specs, ignore=["lm_head"])
    parsed = ct.QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                                   if k not in ("sparsity_config", "transform_config", "version")})
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    seen = set()
    for scheme in parsed.config_groups.values():
        assert not seen & set(scheme.targets), "target lists must be disjoint"
        seen |= set(scheme.targets)
        assert scheme.format == "pack-quantized" and scheme.weights.type == "int"
        for t in scheme.targets:
            s = specs[t]
            assert (scheme.weights.num_bits, scheme.weights.symmetric) == (s.bits, s.symmetric)
            assert scheme.weights.strategy == ("channel" if s.group_size is None else "group")
    assert seen == set(specs)


def test_parse_llmcompressor_style_config_with_class_and_regex_targets():
    ct = pytest.importorskip("compressed_tensors.quantization")
    # a config exactly as compressed-tensors 0.19 dumps it (zp_dtype, observer_kwargs, ...)
    g0 = ct.QuantizationScheme(targets=["Linear"], format="pack-quantized",
                               weights=ct.QuantizationArgs(num_bits=4, symmetric=False, group_size=64,
                                                           strategy="group", observer="minmax"))
    g1 = ct.QuantizationScheme(targets=["re:.*down_proj$"], format="pack-quantized",
                               weights=ct.QuantizationArgs(num_bits=6, symmetric=True, strategy="channel"))
    g2 = ct.QuantizationScheme(targets=["model.layers.0.mlp.down_proj"], format="pack-quantized",
                               weights=ct.QuantizationArgs(num_bits=8, symmetric=True, group_size=32,
                                                           strategy="group"))
    qc = ct.QuantizationConfig(config_groups={"group_0": g0, "group_1": g1, "group_2": g2},
                               format="pack-quantized", quantization_status="compressed",
                               ignore=["lm_head", "re:.*layers\\.1\\.self_attn\\.o_proj"])
    config = {"quantization_config": json.loads(json.dumps(qc.model_dump(), default=str))}
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")] + ["lm_head"]
    parsed = parse_quant_config(config, names)
    assert parsed.unresolved_targets == []
    # exact name beats regex beats class name; ignore wins over all
    assert parsed.specs["model.layers.0.mlp.down_proj"] == QuantSpec(8, 32, True)
    assert parsed.specs["model.layers.1.mlp.down_proj"] == QuantSpec(6, None, True)
    assert parsed.specs["model.layers.0.self_attn.q_proj"] == QuantSpec(4, 64, False)
    assert "model.layers.1.self_attn.o_proj" not in parsed.specs and "lm_head" not in parsed.specs
    # class names can be given explicitly: an Embedding does not match "Linear"
    assert parsed.spec_for("model.embed_tokens", ("Embedding", "Module")) is None
    assert parsed.spec_for("x.qkv", ("QKVParallelLinear", "LinearBase")) == QuantSpec(4, 64, False)
    # without module names only explicit names are resolved
    lazy = parse_quant_config(config)
    assert set(lazy.specs) == {"model.layers.0.mlp.down_proj"}
    assert lazy.unresolved_targets == ["Linear", "re:.*down_proj$"]


def test_fused_spec_reports_disagreeing_shards():
    specs = tiny_specs()
    specs["model.layers.1.self_attn.k_proj"] = QuantSpec(4, 64, True)
    parsed = parse_quant_config(layout.build_quant_config(specs, ["lm_head"]))
    assert parsed.fused_spec("model.layers.0.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")) == ATTN[0]
    with pytest.raises(MixedFusedModuleError, match=r"model\.layers\.1\.self_attn\.qkv_proj.*k_proj: w4sg64"):
        parsed.fused_spec("model.layers.1.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"))


@pytest.mark.parametrize("field,value,match", [
    ("num_bits", 9, r"config_groups\.group_0\.weights\.num_bits: must be an integer in 2\.\.8, got 9"),
    ("num_bits", 1, r"num_bits: must be an integer in 2\.\.8, got 1"),
    ("type", "float", r"weights\.type: only integer"),
    ("strategy", "tensor", r"weights\.strategy: only 'group' and 'channel'"),
    ("unknown_field", 1, r"unknown key\(s\) \['unknown_field'\]"),
    ("actorder", "group", r"weights\.actorder"),
])
def test_bad_quant_args_rejected_naming_the_field(field, value, match):
    qc = layout.build_quant_config({"a.q_proj": QuantSpec(4, 32)}, [])
    qc["config_groups"]["group_0"]["weights"][field] = value
    with pytest.raises(QuantConfigError, match=match):
        parse_quant_config(qc)


def random_quantized(n, k, spec, seed):
    g = torch.Generator().manual_seed(seed)
    groups = spec.groups(k)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.1 + 1e-3).to(torch.float16)
    zp = None if spec.symmetric else torch.randint(spec.qmin, spec.qmax + 1, (n, groups), generator=g,
                                                   dtype=torch.int8)
    return QuantizedWeight(codes, scale, zp, spec)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 40), n_groups=st.integers(1, 4),
       group=st.sampled_from([8, 16, 32, None]), k_channel=st.integers(1, 70), symmetric=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_layer_layout_agrees_with_compressed_tensors(bits, n, n_groups, group, k_channel, symmetric, seed):
    """Per layer: our tensors decode back exactly, have the documented shapes, and are exactly what
    compressed-tensors' PackedQuantizationCompressor writes (compress) and reads (decompress)."""
    ctq = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as PQC

    spec = QuantSpec(bits, group, symmetric)
    k = k_channel if group is None else group * n_groups
    qw = random_quantized(n, k, spec, seed)
    ours = layout.encode_weight(qw, module="m")
    assert {s: tuple(t.shape) for s, t in ours.items()} == expected_shapes(n, k, spec)
    back = layout.decode_weight("m", ours, spec)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert (back.zero_point is None) if symmetric else torch.equal(back.zero_point, qw.zero_point)

    scheme = ctq.QuantizationScheme(targets=["m"], weights=ctq.QuantizationArgs(**layout.quant_args(spec)),
                                    format="pack-quantized")
    theirs = PQC.decompress(dict(ours), scheme)
    assert torch.equal(theirs["weight"], qw.dequantize(torch.float16))
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale}
    if not symmetric:
        state["weight_zero_point"] = qw.zero_point
    compressed = PQC.compress(state, scheme)
    assert set(compressed) == set(ours)
    for suffix, t in ours.items():
        assert torch.equal(compressed[suffix].to(t.dtype), t), suffix


# ---------------------------------------------------------------- round trip


def test_mixed_precision_round_trip(tiny, tiny_ckpt):
    model, specs, quantized = tiny
    files = sorted(p.name for p in tiny_ckpt.iterdir())
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert f in files
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["dtype"] == "float16" and config["model_type"] == "llama"
    assert config["vllm_slq"]["method"] == "rtn"
    qc = config["quantization_config"]
    assert qc["ignore"] == ["lm_head"] and len(qc["config_groups"]) == len(set(specs.values()))

    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt.extra["layer_bpp"]["model.layers.0.mlp.down_proj"] == pytest.approx(DOWN[0].bpp(128))
    assert ckpt.extra["layer_spec"]["model.layers.1.self_attn.q_proj"] == "w5sg64"
    want = sum(s.bpp(model.get_submodule(n).in_features) * model.get_submodule(n).weight.numel()
               for n, s in specs.items()) / sum(model.get_submodule(n).weight.numel() for n in specs)
    assert ckpt.extra["bpp"] == pytest.approx(want)
    assert set(ckpt.quantized) == set(quantized)
    for name, qw in quantized.items():
        got = ckpt.quantized[name]
        assert got.spec == qw.spec, name
        assert torch.equal(got.codes, qw.codes), name
        assert got.scale.dtype == torch.float16
        assert torch.equal(got.scale, qw.scale.to(torch.float16)), name
        if qw.spec.symmetric:
            assert got.zero_point is None
        else:
            assert torch.equal(got.zero_point, qw.zero_point), name
    sd = model.state_dict()
    dense_keys = {k for k in sd if k.rsplit(".", 1)[0] not in quantized}
    assert set(ckpt.dense) == dense_keys
    for k in dense_keys:
        assert ckpt.dense[k].dtype == torch.float16 and torch.equal(ckpt.dense[k], sd[k].to(torch.float16)), k


def test_sharded_checkpoint_round_trips(tiny, tmp_path):
    model, specs, quantized = tiny
    out = save_checkpoint(model, quantized, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2 and not (out / "model.safetensors").exists()
    ckpt = load_checkpoint(out)
    for name, qw in quantized.items():
        assert torch.equal(ckpt.quantized[name].codes, qw.codes)
    assert len(ckpt.dense) == len([k for k in model.state_dict() if k.rsplit(".", 1)[0] not in quantized])


def test_overwrite_replaces_and_refuses_without_flag(tiny, tmp_path):
    model, specs, quantized = tiny
    out = tmp_path / "ow"
    save_checkpoint(model, {"model.layers.0.self_attn.o_proj": quantized["model.layers.0.self_attn.o_proj"]}, out)
    with pytest.raises(CheckpointExistsError, match="exists; pass overwrite=True"):
        save_checkpoint(model, quantized, out)
    save_checkpoint(model, quantized, out, overwrite=True)
    assert set(load_checkpoint(out).quantized) == set(quantized)
    assert leftovers(tmp_path, "ow") == ["ow"]


# ------------------------------------------------------------------ HF load


def _hf_vs_ours(path, quantized_names, tokens):
    from transformers import AutoModelForCausalLM

    ours = dequantized_model(path, dtype=torch.float16)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16)
    with torch.no_grad():
        ref = ours(tokens).logits.float()
        got = hf(tokens).logits.float()  # compressed-tensors decompresses on this first forward
    for name in quantized_names:
        w_hf = hf.get_submodule(name).weight
        assert w_hf.dtype == torch.float16
        assert torch.equal(w_hf, ours.get_submodule(name).weight), f"{name}: HF decompression differs"
    return ref, got


def test_hf_transformers_loads_it_and_matches_our_dequantization(tiny, tiny_ckpt):
    model, specs, quantized = tiny
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref, got = _hf_vs_ours(tiny_ckpt, quantized, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    # and quantization actually changed the model (the comparison above is not vacuous)
    with torch.no_grad():
        fp16 = model.to(torch.float16)(tokens).logits.float()
        model.float()
    assert (fp16 - ref).abs().max() > 1e-3


@pytest.mark.slow
def test_reference_model_checkpoint_loads_in_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    from vllm_slq.data import resolve_model

    src = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float16)
    specs = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        if ".self_attn." in name:
            specs[name] = QuantSpec(4, 64, False)
        elif name.endswith("down_proj"):
            specs[name] = QuantSpec(6, 64, False)
        else:
            specs[name] = QuantSpec(3, 64, True)
    assert len(specs) == 30 * 7
    quantized = quantize(model, specs)
    out = save_checkpoint(model, quantized, tmp_path / "smollm2-mixed")
    del model
    tokens = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    ref, got = _hf_vs_ours(out, quantized, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ bad inputs


def _assert_nothing_written(parent: Path, name: str):
    assert leftovers(parent, name) == [], "writer left files behind"


def test_nan_and_inf_rejected(tiny, tmp_path):
    model, specs, quantized = tiny
    w = model.model.layers[0].mlp.down_proj.weight.detach().float().clone()
    w[3, 5] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="model.layers.0.mlp.down_proj"):
        rtn(w, QuantSpec(4, 32), "model.layers.0.mlp.down_proj")

    bad = dict(quantized)
    qw = quantized["model.layers.1.mlp.up_proj"]
    scale = qw.scale.clone()
    scale[0, 0] = float("inf")
    bad["model.layers.1.mlp.up_proj"] = QuantizedWeight(qw.codes, scale, qw.zero_point, qw.spec)
    with pytest.raises(InvalidQuantizedWeightError, match=r"layer 'model\.layers\.1\.mlp\.up_proj': 1 scale\(s\) are NaN/inf"):
        save_checkpoint(model, bad, tmp_path / "nan")
    # a finite fp32 scale that overflows fp16 storage is caught too
    scale = qw.scale.clone().float()
    scale[1, 0] = 1e6
    bad["model.layers.1.mlp.up_proj"] = QuantizedWeight(qw.codes, scale, qw.zero_point, qw.spec)
    with pytest.raises(InvalidQuantizedWeightError, match="after casting to torch.float16"):
        save_checkpoint(model, bad, tmp_path / "nan")
    # NaN in a dense tensor
    nan_model = tiny_llama(seed=0)
    with torch.no_grad():
        nan_model.model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match="'model.norm.weight': 1 NaN/inf"):
        save_checkpoint(nan_model, quantized, tmp_path / "nan")
    _assert_nothing_written(tmp_path, "nan")


def test_group_not_dividing_k_and_bad_codes_rejected(tiny, tmp_path):
    model, specs, quantized = tiny
    name = "model.layers.0.self_attn.o_proj"  # K = 64
    qw = quantized[name]
    with pytest.raises(QuantSpecError, match=f"layer '{name}': group_size 48 does not divide in_features 64"):
        rtn(model.get_submodule(name).weight.float(), QuantSpec(4, 48), name)
    bad = dict(quantized)
    bad[name] = QuantizedWeight(qw.codes, torch.ones(64, 2), None, QuantSpec(4, 48, True))
    with pytest.raises(InvalidQuantizedWeightError, match=f"layer '{name}': group_size 48 does not divide"):
        save_checkpoint(model, bad, tmp_path / "bad")
    # 8-bit codes declared as 2-bit
    bad[name] = QuantizedWeight(qw.codes, qw.scale, qw.zero_point.clamp(-2, 1), QuantSpec(2, None, False))
    with pytest.raises(InvalidQuantizedWeightError, match=rf"layer '{name}': codes span .* outside the 2-bit range"):
        save_checkpoint(model, bad, tmp_path / "bad")
    bad[name] = QuantizedWeight(qw.codes, qw.scale, None, qw.spec)
    with pytest.raises(InvalidQuantizedWeightError, match=f"layer '{name}': .*asymmetric but no zero point"):
        save_checkpoint(model, bad, tmp_path / "bad")
    bad = {"model.layers.0.mlp.down_proj": qw}  # [64, 64] codes for a [64, 128] layer
    with pytest.raises(InvalidQuantizedWeightError, match="'model.layers.0.mlp.down_proj': codes shape"):
        save_checkpoint(model, bad, tmp_path / "bad")
    with pytest.raises(InvalidQuantizedWeightError, match="'model.nope': no such module"):
        save_checkpoint(model, {"model.nope": qw}, tmp_path / "bad")
    with pytest.raises(QuantSpecError, match="bits must be an integer in 2..8"):
        QuantSpec(bits=9)
    _assert_nothing_written(tmp_path, "bad")


def test_mixed_bits_in_fused_modules_rejected_unless_allowed(tiny, tmp_path):
    model, specs, quantized = tiny
    mixed = dict(quantized)
    k = "model.layers.0.self_attn.k_proj"
    mixed[k] = rtn(model.get_submodule(k).weight.float(), QuantSpec(4, 32, False), k)
    with pytest.raises(MixedFusedModuleError, match=r"'model\.layers\.0\.self_attn\.qkv_proj'.*k_proj: w4ag32.*q_proj: w3ag32"):
        save_checkpoint(model, mixed, tmp_path / "fused")
    partial = dict(quantized)
    del partial["model.layers.1.mlp.up_proj"]
    with pytest.raises(MixedFusedModuleError, match=r"gate_up_proj.*up_proj: dense"):
        save_checkpoint(model, partial, tmp_path / "fused")
    _assert_nothing_written(tmp_path, "fused")
    out = save_checkpoint(model, mixed, tmp_path / "fused", allow_mixed_fused=True)
    assert load_checkpoint(out).quantized[k].spec == QuantSpec(4, 32, False)


def test_exception_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    import vllm_slq.checkpoint.writer as writer

    model, specs, quantized = tiny
    calls = []

    def failing_write(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the first shard is on disk, the second fails
            raise OSError("disk full (simulated)")
        save_file(dict(tensors), str(path), metadata={"format": "pt"})

    monkeypatch.setattr(writer, "_write_shard", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(model, quantized, tmp_path / "crash", max_shard_bytes=40_000)
    assert len(calls) == 2
    _assert_nothing_written(tmp_path, "crash")
    # with an existing checkpoint and overwrite=True, a failure keeps the old one intact
    monkeypatch.undo()
    old = save_checkpoint(model, quantized, tmp_path / "crash")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    calls.clear()
    monkeypatch.setattr(writer, "_write_shard", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(model, quantized, tmp_path / "crash", max_shard_bytes=40_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert leftovers(tmp_path, "crash") == ["crash"]


@pytest.fixture()
def ckpt_copy(tiny_ckpt, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def test_truncated_safetensors_named(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_checkpoint(ckpt_copy)
    f.write_bytes(data[:5])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        load_checkpoint(ckpt_copy)


def test_config_tensor_shape_mismatch_named(ckpt_copy):
    cfg_path = ckpt_copy / "config.json"
    config = json.loads(cfg_path.read_text())
    # claim group 64 for the layer-0 attention group, stored with group 32
    for g in config["quantization_config"]["config_groups"].values():
        if "model.layers.0.self_attn.q_proj" in g["targets"]:
            g["weights"]["group_size"] = 64
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(LayoutError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj' in model\.safetensors: "
                                          r"field weight_scale has shape \(32, 2\), expected \(32, 1\)"):
        load_checkpoint(ckpt_copy)


def test_bits_mismatch_and_out_of_range_named(ckpt_copy):
    cfg_path = ckpt_copy / "config.json"
    original = cfg_path.read_text()
    config = json.loads(original)
    for g in config["quantization_config"]["config_groups"].values():
        if "model.layers.0.mlp.down_proj" in g["targets"]:
            g["weights"]["num_bits"] = 6  # stored as 7-bit
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(LayoutError, match=r"'model\.layers\.0\.mlp\.down_proj'.*field weight_packed has shape"):
        load_checkpoint(ckpt_copy)
    for g in config["quantization_config"]["config_groups"].values():
        g["weights"]["num_bits"] = 12
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(QuantConfigError, match=r"weights\.num_bits: must be an integer in 2\.\.8, got 12"):
        load_checkpoint(ckpt_copy)


def test_missing_weight_scale_and_untargeted_layer_named(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(LayoutError, match=r"'model\.layers\.1\.mlp\.down_proj'.*missing model\.layers\.1\.mlp\.down_proj\.weight_scale"):
        load_checkpoint(ckpt_copy)
    cfg_path = ckpt_copy / "config.json"
    config = json.loads(cfg_path.read_text())
    for g in config["quantization_config"]["config_groups"].values():
        if "model.layers.0.self_attn.o_proj" in g["targets"]:
            g["targets"].remove("model.layers.0.self_attn.o_proj")
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(LayoutError, match=r"'model\.layers\.0\.self_attn\.o_proj'.*no config group targets it"):
        load_checkpoint(ckpt_copy)


def test_weight_shape_tensor_mismatch_named(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor([128, 96])
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(LayoutError, match=r"'model\.layers\.0\.mlp\.up_proj'.*group_size 64 does not divide in_features 96"):
        load_checkpoint(ckpt_copy)
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor([64, 64])
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(LayoutError, match=r"'model\.layers\.0\.mlp\.up_proj'.*field weight_packed has shape \(128, 12\), expected \(64, 12\)"):
        load_checkpoint(ckpt_copy)


def test_bad_config_json_and_missing_files_named(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(ckpt_copy)
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "does-not-exist")
