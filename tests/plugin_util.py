"""Helpers for the vLLM plugin tests (not a test module): checkpoints, greedy runs, comparison."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]
N_TOKENS = 32
# Both sides run in fp32 with bit-identical dequantized weights, so their logits
# differ only by accumulation order (~1e-4); a divergence is accepted only where
# HF's top-2 logits are closer than this.
NEAR_TIE = 0.02

FUSED = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
         ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def mixed_specs(n_layers: int):
    """Per-module QuantSpec: bits 2..8 cycling over layers, sym/asym, group 64/32/channel.

    Bits are tied inside q/k/v and gate/up (vLLM runs them as one matmul). 2-bit is
    kept to every third layer so the model stays coherent enough to be a real test.
    """
    from vllm_slq.quant.spec import QuantSpec

    bits_cycle = [2, 3, 4, 5, 6, 7, 8]
    specs = {}
    for i in range(n_layers):
        for j, mods in enumerate(FUSED):
            b = bits_cycle[(i + j) % 7]
            if b == 2 and i % 3:
                b = 8
            spec = QuantSpec(b, [64, 32, None][(i + 2 * j) % 3], symmetric=(i + j) % 2 == 0)
            for m in mods:
                specs[f"model.layers.{i}.{m}"] = spec
    return specs


def build_mixed_checkpoint(out_dir, model_spec: str = "smollm2-135m"):
    """Reference model, RTN per mixed_specs, written by vllm_slq.checkpoint.save_checkpoint."""
    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.data import load_model
    from vllm_slq.quant.grid import rtn

    model, tok = load_model(model_spec, dtype=torch.float16)
    modules = dict(model.named_modules())
    specs = mixed_specs(model.config.num_hidden_layers)
    quantized = {name: rtn(modules[name].weight.detach().float(), spec, layer=name)
                 for name, spec in specs.items()}
    return save_checkpoint(model, quantized, out_dir, tokenizer=tok), specs


def prompt_ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@torch.no_grad()
def hf_greedy(model, ids_list, n=N_TOKENS):
    """Greedy tokens and the per-step logits of an HF model, one prompt at a time."""
    out = []
    for ids in ids_list:
        g = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        toks = g.sequences[0, len(ids):].tolist()
        out.append((toks, [lg[0].float() for lg in g.logits]))
    return out


def vllm_greedy(llm, ids_list, n=N_TOKENS):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
    res = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in ids_list], sp, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in res]


def compare_greedy(vllm_tokens, hf_results, tol=NEAR_TIE):
    """Assert token-for-token equality, or a first divergence at an HF near-tie.

    Returns a list of (prompt index, first divergence or None, HF top-2 gap there).
    """
    report = []
    for i, (vt, (ht, logits)) in enumerate(zip(vllm_tokens, hf_results)):
        n = min(len(vt), len(ht))
        assert n >= N_TOKENS, f"prompt {i}: only {n} tokens generated"
        div = next((t for t in range(n) if vt[t] != ht[t]), None)
        if div is None:
            report.append((i, None, None))
            continue
        lg = logits[div]
        gap = float(lg[ht[div]] - lg[vt[div]])
        assert gap <= tol, (
            f"prompt {i} ({PROMPTS[i]!r}): vLLM and HF diverge at token {div} "
            f"(vLLM {vt[div]}, HF {ht[div]}) with HF logit gap {gap:.4f} > near-tie tolerance {tol}")
        report.append((i, div, gap))
    return report


def layer_schemes(llm):
    """{scheme class name: count} and {kernel name: count} of the engine's linear layers
    (`kernels_serving`: a layer vLLM serves itself counts as "vllm:<its kernel class>")."""
    def probe(model):
        from vllm_slq.vllm.linear_method import kernels_serving

        schemes = {}
        for mod in model.modules():
            s = getattr(mod, "scheme", None)
            if s is not None:
                schemes[type(s).__name__] = schemes.get(type(s).__name__, 0) + 1
        return schemes, kernels_serving(model)

    return llm.apply_model(probe)[0]
