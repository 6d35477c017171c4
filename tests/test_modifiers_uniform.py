"""RTNModifier / SLQGPTQModifier through llmcompressor's real oneshot on the tiny Llama."""
import json

import pytest
import torch

pytest.importorskip("llmcompressor")

from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from vllm_slq.modifiers import (  # noqa: E402
    RTNModifier,
    SLQGPTQModifier,
    SpecResolutionError,
    quantized_weights,
)
from vllm_slq.quant.grid import rtn  # noqa: E402
from vllm_slq.quant.spec import QuantSpec  # noqa: E402
from vllm_slq.testing import save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.llmcompressor

N_SAMPLES, SEQ = 8, 32
VOCAB = 512


def _save_word_tokenizer(path):
    """oneshot insists on a processor when given a dataset; a word-level one suffices."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2",
                                  unk_token="t0")
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(2)
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", vocab=VOCAB)
    tok = _save_word_tokenizer(path)
    ids = torch.randint(3, VOCAB, (N_SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return path, tok, ds, ids


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _run(tiny, recipe, data=True):
    path, tok, ds, _ = tiny
    model = _load(path)
    kw = dict(dataset=ds, num_calibration_samples=N_SAMPLES, max_seq_length=SEQ) if data else {}
    oneshot(model=model, processor=tok, recipe=recipe, **kw)
    return model


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.fixture(scope="module")
def rtn_model(tiny):
    return _run(tiny, RTNModifier(bits=3, group_size=32), data=False)


@pytest.fixture(scope="module")
def gptq_model(tiny):
    return _run(tiny, SLQGPTQModifier(bits=3, group_size=32))


@pytest.fixture(scope="module")
def fp_inputs(tiny):
    """Every target Linear's inputs on the FP model, and its FP weight."""
    path, _, _, ids = tiny
    model = _load(path)
    xs, handles = {}, []
    for name in _targets(model):
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(
            lambda m, a, o, name=name: xs.setdefault(name, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: (torch.cat(v), model.get_submodule(n).weight.detach().clone()) for n, v in xs.items()}


def _out_err(x, w, q):
    ref = x @ w.T
    return float((ref - x @ q.T).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("which", ["rtn_model", "gptq_model"])
def test_every_target_quantized_and_weights_are_its_dequant(which, request):
    model = request.getfixturevalue(which)
    qws = quantized_weights(model)
    assert sorted(qws) == sorted(_targets(model))
    assert "lm_head" not in qws
    for name, qw in qws.items():
        mod = model.get_submodule(name)
        assert mod.slq_quantized is qw
        assert qw.spec == QuantSpec(3, 32, False)
        assert torch.equal(mod.weight.data, qw.dequantize(mod.weight.dtype)), name
        # compressed-tensors qparams mirror ours (llmcompressor's save path reads these)
        assert torch.equal(mod.weight_scale.data.float(), qw.scale.float())
        assert torch.equal(mod.weight_zero_point.data.to(torch.int8), qw.zero_point)


def test_rtn_modifier_is_grid_rtn(rtn_model, fp_inputs):
    for name, (_, w) in fp_inputs.items():
        ref = rtn(w, QuantSpec(3, 32, False), layer=name)
        assert torch.equal(quantized_weights(rtn_model)[name].codes, ref.codes), name


def test_gptq_output_error_below_rtn(gptq_model, rtn_model, fp_inputs):
    g_q, r_q = quantized_weights(gptq_model), quantized_weights(rtn_model)
    tot_g = tot_r = 0.0
    for name, (x, w) in fp_inputs.items():
        eg = _out_err(x, w, g_q[name].dequantize())
        er = _out_err(x, w, r_q[name].dequantize())
        if name.startswith("model.layers.0."):
            # layer 0 calibrates on exactly these FP inputs: GPTQ's objective itself
            assert eg <= er, (name, eg, er)
        tot_g, tot_r = tot_g + eg, tot_r + er
    assert tot_g < 0.8 * tot_r, (tot_g, tot_r)
    assert all("rel_err" in q.meta for q in g_q.values())


def test_layer_specs_override_dict_file_and_regex(tiny, tmp_path):
    overrides = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": None},
                 "re:.*k_proj$": 2,
                 "model.layers.1.self_attn.k_proj": {"symmetric": True}}
    model = _run(tiny, RTNModifier(bits=4, group_size=64, layer_specs=overrides), data=False)
    qws = quantized_weights(model)
    assert qws["model.layers.0.mlp.down_proj"].spec == QuantSpec(8, None, False)
    assert qws["model.layers.0.self_attn.k_proj"].spec == QuantSpec(2, 64, False)
    assert qws["model.layers.1.self_attn.k_proj"].spec == QuantSpec(2, 64, True)  # exact name wins
    assert qws["model.layers.1.mlp.up_proj"].spec == QuantSpec(4, 64, False)
    assert qws["model.layers.1.self_attn.k_proj"].zero_point is None

    # the same overrides from an allocation artifact on disk
    f = tmp_path / "alloc.json"
    f.write_text(json.dumps({"budget_bpp": 4.2, "layer_specs": overrides}))
    model2 = _run(tiny, RTNModifier(bits=4, group_size=64, layer_specs=str(f)), data=False)
    assert {n: q.spec for n, q in quantized_weights(model2).items()} == {n: q.spec for n, q in qws.items()}


def test_layer_specs_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(SpecResolutionError, match="model.layers.9.mlp.down_proj"):
        _run(tiny, RTNModifier(group_size=32, layer_specs={"model.layers.9.mlp.down_proj": 3}), data=False)
    with pytest.raises(SpecResolutionError, match="model.layers.0.mlp.up_proj.*group_size 48"):
        _run(tiny, RTNModifier(group_size=32, layer_specs={"model.layers.0.mlp.up_proj": {"group_size": 48}}), data=False)
    with pytest.raises(SpecResolutionError, match="bitz"):
        _run(tiny, RTNModifier(group_size=32, layer_specs={"model.layers.0.mlp.up_proj": {"bitz": 3}}), data=False)
    with pytest.raises(SpecResolutionError, match="does not exist"):
        _run(tiny, RTNModifier(layer_specs=str(tmp_path / "missing.json")), data=False)


def test_yaml_recipe_resolves_by_name(tiny, rtn_model, tmp_path):
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    RTNModifier:\n      bits: 3\n      group_size: 32\n")
    model = _run(tiny, str(recipe), data=False)
    got, ref = quantized_weights(model), quantized_weights(rtn_model)
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[n].codes, ref[n].codes) for n in ref)


def test_gptq_without_data_fails_clearly(tiny):
    with pytest.raises(Exception, match="calibration"):
        _run(tiny, SLQGPTQModifier(bits=4, group_size=32), data=False)


def test_checkpoints_from_both_writers(tiny, gptq_model, tmp_path):
    """Our writer round-trips the codes; llmcompressor's save_pretrained packs the same
    weights (via the attached compressed-tensors qparams) and HF loads them back."""
    from vllm_slq.checkpoint import load_checkpoint, save_checkpoint

    qws = quantized_weights(gptq_model)
    out = save_checkpoint(gptq_model, qws, tmp_path / "ours", tokenizer=tiny[1])
    ck = load_checkpoint(out)
    assert sorted(ck.quantized) == sorted(qws)
    for n, q in qws.items():
        assert torch.equal(ck.quantized[n].codes, q.codes), n
        assert torch.equal(ck.quantized[n].dequantize(), q.dequantize()), n

    gptq_model.save_pretrained(tmp_path / "llmc", save_compressed=True)
    cfg = json.loads((tmp_path / "llmc" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized"
    from transformers.utils.quantization_config import CompressedTensorsConfig

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llmc", dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(run_compressed=False))
    for n, q in qws.items():  # transformers decompresses compressed-tensors on load
        torch.testing.assert_close(reloaded.get_submodule(n).weight.float(), q.dequantize(), rtol=0, atol=1e-6)


def test_hessians_are_lazy_per_subgraph_and_shared_by_modules_reading_one_input(tiny, monkeypatch):
    """Accumulators exist only for the decoder layer being calibrated, and q/k/v (gate/up)
    share one, bit for bit the Hessian each would have accumulated alone."""
    import vllm_slq.modifiers.base as base

    made, seen, held = [], {}, []
    real_gptq = base.GPTQ

    class CountingGPTQ(real_gptq):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.layer)

    class Recording(SLQGPTQModifier):
        def quantize_module(self, name, module, H, spec):
            seen[name] = (H.clone(), self._hessians[name])
            held.append(len({id(h) for h in self._hessians.values()}))
            return super().quantize_module(name, module, H, spec)

    monkeypatch.setattr(base, "GPTQ", CountingGPTQ)
    _run(tiny, Recording(bits=3, group_size=32))
    layers = {n.rsplit(".", 2)[0] for n in seen}
    # per decoder layer: q/k/v one, o one, gate/up one, down one
    assert len(made) == 4 * len(layers), made
    assert max(held) == 4  # never more than one decoder layer's accumulators
    for layer in layers:
        qkv = [seen[f"{layer}.self_attn.{p}_proj"][1] for p in "qkv"]
        gu = [seen[f"{layer}.mlp.{p}_proj"][1] for p in ("gate", "up")]
        assert qkv[0] is qkv[1] is qkv[2] and gu[0] is gu[1]
        assert seen[f"{layer}.self_attn.o_proj"][1] is not qkv[0]
    # the shared H is what each module's own inputs give (the FP model's layer 0 sees FP inputs)
    path, _, _, ids = tiny
    model = _load(path)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
        acc = real_gptq(model.get_submodule(name).weight.shape[1])
        h = model.get_submodule(name).register_forward_hook(lambda m, a, o: acc.add_batch(a[0]))
        with torch.no_grad():
            for i in range(ids.shape[0]):
                model(input_ids=ids[i:i + 1])
        h.remove()
        assert torch.allclose(seen[name][0], acc.H, rtol=1e-5, atol=1e-6), name
