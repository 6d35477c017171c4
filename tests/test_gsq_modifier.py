"""GSQModifier through real llmcompressor oneshot on the tiny random Llama."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.llmcompressor, pytest.mark.slow]  # ~6 oneshot runs of the tiny model

MLP_SUFFIXES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import datasets

    from vllm_slq.testing import save_tiny_llama

    path = save_tiny_llama(tmp_path_factory.mktemp("gsq") / "tiny")
    ids = torch.randint(3, 512, (16, 32), generator=torch.Generator().manual_seed(0))
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return path, _tokenizer(), ds, ids


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _run(tiny, modifier, model=None, **kw):
    from llmcompressor import oneshot

    path, tok, ds, _ = tiny
    model = model if model is not None else _load(path)
    oneshot(model=model, processor=tok, dataset=ds, recipe=[modifier], num_calibration_samples=16,
            max_seq_length=32, **kw)
    return model


@torch.no_grad()
def _layer0_mse(model, fp_model, ids):
    # layer 0's inputs are the FP embeddings in every run, so its output MSE is comparable across runs
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    ref = fp_model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    return torch.nn.functional.mse_loss(h, ref).item()


@pytest.fixture(scope="module")
def gsq_run(tiny):
    from vllm_slq.modifiers.gsq import GSQModifier

    mod = GSQModifier(bits=2, group_size=32, epochs=3, batch_size=4, logit_lr=2e-3, scale_lr=1e-4,
                      keep_init_if_worse=False)
    model = _run(tiny, mod)
    return model, mod


def test_gsq_lowers_block_mse_below_its_gptq_init(tiny, gsq_run):
    from vllm_slq.modifiers import SLQGPTQModifier
    from vllm_slq.modifiers.gsq import MLP_TARGETS

    path, _, _, ids = tiny
    model, mod = gsq_run
    stats = mod.stats
    assert set(stats) == {"model.layers.0", "model.layers.1"}
    for block, s in stats.items():
        assert s["kept"] == "final" and s["steps"] == 3 * 4
        assert s["final_mse"] < 0.97 * s["init_mse"], (block, s)

    # independent check on layer 0 (same inputs in both runs): GSQ vs llmcompressor run of our GPTQ
    fp = _load(path)
    # GSQ's init is in-order GPTQ with the searched range: the same settings here
    gptq = _run(tiny, SLQGPTQModifier(bits=2, group_size=32, symmetric=True, targets=MLP_TARGETS,
                                      act_order=False, try_minmax=False))
    mse_gsq, mse_gptq = _layer0_mse(model, fp, ids), _layer0_mse(gptq, fp, ids)
    assert mse_gsq < 0.97 * mse_gptq, (mse_gsq, mse_gptq)
    # the modifier's recorded losses are the same quantity
    assert mse_gsq == pytest.approx(stats["model.layers.0"]["final_mse"], rel=1e-3)
    assert mse_gptq == pytest.approx(stats["model.layers.0"]["init_mse"], rel=1e-3)


def test_written_weights_codes_and_true_bit_checkpoint(tiny, gsq_run, tmp_path):
    from vllm_slq.checkpoint import load_checkpoint, save_checkpoint
    from vllm_slq.modifiers import quantized_weights

    model, _ = gsq_run
    qws = quantized_weights(model)
    assert sorted(qws) == sorted(f"model.layers.{i}.{s}" for i in range(2) for s in MLP_SUFFIXES)
    modules = dict(model.named_modules())
    for name, qw in qws.items():
        assert qw.spec.bits == 2 and qw.spec.symmetric and qw.zero_point is None
        assert qw.meta["method"] == "gsq"
        assert int(qw.codes.min()) >= -2 and int(qw.codes.max()) <= 1
        torch.testing.assert_close(modules[name].weight.data, qw.dequantize(torch.float32))
    out = save_checkpoint(model, qws, tmp_path / "ckpt", tokenizer=tiny[1], extra={"method": "gsq"})
    ck = load_checkpoint(out)
    groups = ck.config["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"] for g in groups.values()} == {2}  # stored as 2-bit, not 4
    for name, qw in qws.items():
        assert torch.equal(ck.quantized[name].codes, qw.codes)
    from safetensors import safe_open

    with safe_open(str(next(Path(out).glob("*.safetensors"))), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    assert tuple(packed.shape) == (128, 64 * 2 // 32)


def test_ternary_and_mixed_bits_from_layer_specs(tiny):
    from vllm_slq.modifiers.gsq import GSQModifier
    from vllm_slq.modifiers import quantized_weights

    mod = GSQModifier(bits=2, group_size=32, ternary=True, epochs=1, batch_size=8, logit_lr=2e-3)
    qws = quantized_weights(_run(tiny, mod))
    assert qws and all(set(q.codes.unique().tolist()) <= {-1, 0, 1} and q.spec.bits == 2 for q in qws.values())

    specs = {"model.layers.0.mlp.down_proj": 3, "re:model\\.layers\\.1\\.mlp\\.(gate|up)_proj": {"bits": 4}}
    mod = GSQModifier(bits=2, group_size=32, epochs=1, batch_size=8, logit_lr=2e-3, layer_specs=specs)
    qws = quantized_weights(_run(tiny, mod))
    bits = {n: q.spec.bits for n, q in qws.items()}
    assert bits["model.layers.0.mlp.down_proj"] == 3 and bits["model.layers.0.mlp.up_proj"] == 2
    assert bits["model.layers.1.mlp.gate_proj"] == bits["model.layers.1.mlp.up_proj"] == 4
    for q in qws.values():
        assert q.spec.qmin <= int(q.codes.min()) and int(q.codes.max()) <= q.spec.qmax


def test_asymmetric_gsq_at_widths_2_to_8_keeps_zero_points_and_round_trips(tiny, tmp_path):
    """symmetric: false refines codes and scales on the asymmetric grid at every width, GPTQ's
    integer zero points fixed; the block MSE is below its GPTQ init and the checkpoint reads back."""
    from vllm_slq.checkpoint import load_checkpoint, save_checkpoint
    from vllm_slq.modifiers import quantized_weights
    from vllm_slq.modifiers.gsq import GSQModifier

    # fused shards (q/k/v, gate/up) share a width, as vLLM serves them; block 0 at 2-4 bits,
    # block 1 at 5-8
    widths = {0: {"qkv": 2, "o": 3, "gate_up": 4, "down": 2}, 1: {"qkv": 5, "o": 6, "gate_up": 7, "down": 8}}
    specs = {}
    for i, w in widths.items():
        for x in "qkv":
            specs[f"model.layers.{i}.self_attn.{x}_proj"] = w["qkv"]
        specs[f"model.layers.{i}.self_attn.o_proj"] = w["o"]
        specs[f"model.layers.{i}.mlp.gate_proj"] = specs[f"model.layers.{i}.mlp.up_proj"] = w["gate_up"]
        specs[f"model.layers.{i}.mlp.down_proj"] = w["down"]
    mod = GSQModifier(bits=4, group_size=32, symmetric=False, include_attention=True, epochs=3, batch_size=4,
                      logit_lr=2e-3, layer_specs={k: {"bits": b, "symmetric": False} for k, b in specs.items()})
    model = _run(tiny, mod)
    st = mod.stats["model.layers.0"]  # 2-4 bits: refined below the GPTQ init
    assert st["kept"] == "final" and st["final_mse"] < 0.97 * st["init_mse"], st
    # 5-8 bits: GPTQ is already close to the FP block (measured: MSE 3e-9 at 6-8 bits), and the
    # logit prior's ~3% neighbour codes are not all undone in 12 steps; the block keeps
    # whichever measured lower
    st = mod.stats["model.layers.1"]
    assert st["final_mse"] <= st["init_mse"], st
    qws = quantized_weights(model)
    assert {n: q.spec.bits for n, q in qws.items()} == specs
    for name, qw in qws.items():
        assert not qw.spec.symmetric and qw.zero_point is not None and qw.meta["method"] == "gsq"
        assert qw.spec.qmin <= int(qw.codes.min()) and int(qw.codes.max()) <= qw.spec.qmax
    ck = load_checkpoint(save_checkpoint(model, qws, tmp_path / "ckpt", tokenizer=tiny[1], extra={"method": "gsq"}))
    for name, qw in qws.items():
        got = ck.quantized[name]
        assert got.spec == qw.spec and torch.equal(got.codes, qw.codes) and torch.equal(got.zero_point, qw.zero_point)


def test_rejects_asymmetric_or_wide_ternary():
    from vllm_slq.modifiers.gsq import GSQModifier

    with pytest.raises(ValueError, match="ternary codes .* symmetric"):
        GSQModifier(bits=2, ternary=True, symmetric=False)
    with pytest.raises(ValueError, match="ternary"):
        GSQModifier(bits=3, ternary=True)


def test_interrupted_run_leaves_no_checkpoint(tiny, tmp_path):
    """An exception mid-model (NaN weights in layer 1) stops before anything is published."""
    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.modifiers import quantized_weights
    from vllm_slq.modifiers.gsq import GSQModifier

    model = _load(tiny[0])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    out = tmp_path / "ckpt"
    llmc_out = tmp_path / "llmc"
    mod = GSQModifier(bits=2, group_size=32, epochs=1, batch_size=8)
    with pytest.raises(Exception, match="layers.1"):
        _run(tiny, mod, model=model, output_dir=str(llmc_out))
        save_checkpoint(model, quantized_weights(model), out)  # the CLI's next step; never reached
    assert mod.stats and "model.layers.0" in mod.stats  # it did get past layer 0
    assert not out.exists()
    assert not (llmc_out / "config.json").exists() and not list(llmc_out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_recipes_parse(tiny):
    from llmcompressor.recipe import Recipe

    import vllm_slq.modifiers.gsq  # noqa: F401  (registers GSQModifier by name)

    root = Path(__file__).resolve().parents[1] / "recipes"
    for name, bits, ternary in [("gsq_2bit", 2, False), ("gsq_3bit", 3, False), ("gsq_ternary", 2, True)]:
        recipe = Recipe.create_instance(str(root / f"{name}.yaml"))
        mods = [m for m in recipe.modifiers]
        assert len(mods) == 1 and type(mods[0]).__name__ == "GSQModifier"
        assert mods[0].bits == bits and mods[0].ternary == ternary and mods[0].group_size == 64
