"""HF and vLLM evaluation backends, the evaluate() API and its error handling.

Fast tests use the tiny random Llama; the HF-vs-vLLM agreement test uses a
4-bit checkpoint of the reference model (slow, vllm).
"""
import json
import os

import pytest
import torch

from vllm_slq.eval.api import Evaluator, check_tokenizers, evaluate
from vllm_slq.eval.hf_backend import EvalError, HFRunner, sample_continuations
from vllm_slq.eval.metrics import position_metrics, summarize
from vllm_slq.eval.report import ReportError, gather, load_runs, log_interpolate, paired_comparison, write_run
from vllm_slq.testing import tiny_llama


def _perturbed(seed=0, noise=0.02):
    m = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and "layers" in n:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return m


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls on a shared 2-core machine: extra OpenMP threads only spin
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(0))


def _eval(ref, cand, blocks, **kw):
    kw.setdefault("sample_prompts", 2)
    kw.setdefault("sample_prompt_len", 8)
    kw.setdefault("sample_new_tokens", 8)
    return evaluate(ref, cand, blocks=blocks, progress=False, n_boot=200, **kw)


def test_identical_models_give_exactly_one(blocks):
    r = _eval(tiny_llama(), tiny_llama(), blocks)
    tf = r["teacher_forced"]
    assert tf["ear"] == 1.0 and tf["kl"] == 0.0 and tf["top1"] == 1.0 and tf["ear_ci95"] == [1.0, 1.0]
    assert tf["n_positions"] == 4 * 47 and r["protocol"]["n_positions"] == 4 * 47
    assert r["sampled"]["ear"] == 1.0 and r["sampled"]["n_positions"] == 2 * 8
    assert r["backend"] == "hf" and r["protocol"]["candidate_backend"] == "hf"


def test_hf_backend_matches_direct_full_logits_and_is_deterministic(blocks):
    ref, cand = tiny_llama(), _perturbed()
    r1 = _eval(ref, cand, blocks, vocab_chunk=100)
    r2 = _eval(ref, cand, blocks, vocab_chunk=512)
    tf = r1["teacher_forced"]
    assert 0.5 < tf["ear"] < 1.0 and tf["kl"] > 0
    assert tf["ear_ci95"][0] <= tf["ear"] <= tf["ear_ci95"][1]
    assert tf["ear"] >= tf["pinsker_ear_lower_bound"]
    # direct: the models' own [T, V] logits, one call over all blocks
    with torch.no_grad():
        lp = ref(blocks).logits[:, :-1].reshape(-1, 512)
        lq = cand(blocks).logits[:, :-1].reshape(-1, 512)
    direct = position_metrics(lp, lq, targets=blocks[:, 1:].reshape(-1), vocab_chunk=512)
    assert tf["ear"] == pytest.approx(direct.ear.mean().item(), abs=1e-5)
    assert tf["kl"] == pytest.approx(direct.kl.mean().item(), rel=1e-4)
    assert tf["top1"] == pytest.approx(direct.top1.double().mean().item())
    assert tf["ppl_cand"] == pytest.approx(torch.exp(direct.nll_cand.mean()).item(), rel=1e-5)
    # chunk size does not matter; same seed -> same everything (sampling included)
    for k in ("ear", "kl", "top1", "ear_p5", "ppl_ref"):
        assert r2["teacher_forced"][k] == pytest.approx(tf[k], abs=1e-6)
    assert r1["sampled"] == _eval(ref, cand, blocks, vocab_chunk=100)["sampled"]
    # a larger perturbation is less faithful
    r3 = _eval(ref, _perturbed(noise=0.1), blocks)
    assert r3["teacher_forced"]["ear"] < tf["ear"]


def test_sampled_continuations_are_seeded(blocks):
    runner = HFRunner(tiny_llama())
    a = sample_continuations(runner, blocks[:2, :5], 6, seed=1, progress=False)
    b = sample_continuations(runner, blocks[:2, :5], 6, seed=1, progress=False)
    c = sample_continuations(runner, blocks[:2, :5], 6, seed=2, progress=False)
    assert a.shape == (2, 11) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], blocks[:2, :5])
    # greedy: every new token is the reference's argmax after the tokens before it, whatever the seed
    g = sample_continuations(runner, blocks[:2, :5], 6, seed=1, progress=False, greedy=True)
    assert torch.equal(g, sample_continuations(runner, blocks[:2, :5], 6, seed=2, progress=False, greedy=True))
    with torch.no_grad():
        logits = runner.model(input_ids=g).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), g[:, 5:])


def test_errors_vocab_mismatch_seq_len_and_empty_dataset(blocks, tmp_path):
    with pytest.raises(EvalError, match="tokenizer mismatch"):
        _eval(tiny_llama(), tiny_llama(vocab=520), blocks)
    with pytest.raises(EvalError, match="max_position_embeddings"):
        _eval(tiny_llama(), tiny_llama(), torch.zeros(1, 600, dtype=torch.long))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(EvalError, match="empty.txt"):
        Evaluator(tiny_llama(), dataset=str(empty), tokenizer=_tokenizer({"a": 0}), progress=False)


def _tokenizer(vocab, **special):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab, unk_token=next(iter(vocab))))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def test_tokenizer_map_and_special_id_mismatch():
    a = _tokenizer({"<unk>": 0, "hello": 1, "world": 2})
    b = _tokenizer({"<unk>": 0, "hello": 2, "world": 1})
    assert check_tokenizers(a, _tokenizer({"<unk>": 0, "hello": 1, "world": 2}), 3, 3) == []
    with pytest.raises(EvalError, match="different ids for"):
        check_tokenizers(a, b, 3, 3)
    c = _tokenizer({"<unk>": 0, "hello": 1, "world": 2}, eos_token="world")
    d = _tokenizer({"<unk>": 0, "hello": 1, "world": 2}, eos_token="hello")
    with pytest.raises(EvalError, match="eos_token_id"):
        check_tokenizers(c, d, 3, 3)
    assert "no tokenizer" in check_tokenizers(a, None, 3, 3)[0]


def test_report_run_files_and_plot(blocks, tmp_path):
    ref = tiny_llama()
    runs = []
    for i, noise in enumerate((0.01, 0.03, 0.1)):
        r = _eval(ref, _perturbed(noise=noise), blocks, label=f"noise-{noise}",
                  meta={"method": "noise", "bpp": 8.0 - 2 * i})
        j, m = write_run(r, tmp_path / "runs")
        assert json.loads(j.read_text())["teacher_forced"]["ear"] == r["teacher_forced"]["ear"]
        assert "Protocol" in m.read_text() and "hf" in m.read_text()
        runs.append(r)
    out = gather([tmp_path / "runs"], tmp_path / "report")
    assert out["n_runs"] == 3 and out["png"] and os.path.getsize(out["png"]) > 1000
    assert len(load_runs([tmp_path / "runs"])) == 3


def test_full_vocabulary_vllm_scoring_that_cannot_fit_is_refused_with_a_seq_len_that_would(monkeypatch):
    """vLLM returns prompt logprobs as Python lists (~200 B per value): Gemma 3's 262k vocabulary
    at 512 tokens was OOM-killed on a 24 GB machine. The check says so before the engine starts."""
    from vllm_slq.eval import vllm_backend
    from vllm_slq.eval.vllm_backend import check_host_memory

    check_host_memory(512, 49152, available=16e9)  # the reference model: ~5 GB, fits
    with pytest.raises(EvalError, match=r"512-token sequence over a 262144-token vocabulary need about 26.8 GB"
                                        r".*16.0 GB are available\. Use --seq-len 244 or less, or --topk K"):
        check_host_memory(512, 262144, available=16e9)
    check_host_memory(244, 262144, available=16e9)
    monkeypatch.setattr(vllm_backend, "available_host_bytes", lambda: None)
    check_host_memory(10**6, 262144)  # no /proc/meminfo: nothing to check against


def test_log_interpolate_is_geometric_between_the_bracketing_points():
    pts = [(4.0, 0.4), (3.0, 1.6), (5.0, 0.1)]  # unsorted; KL falls 4x per bit
    assert log_interpolate(pts, 3.5) == (pytest.approx(0.8), (3.0, 4.0))
    assert log_interpolate(pts, 5.0)[0] == pytest.approx(0.1)
    assert log_interpolate(pts, 2.9) is None and log_interpolate(pts, 5.1) is None


def test_paired_comparison_of_two_runs_on_the_same_blocks(blocks, tmp_path):
    from vllm_slq.cli import main as cli_main

    ref = tiny_llama()
    ev = Evaluator(ref, blocks=blocks, sample_prompts=0, progress=False, n_boot=300)
    near = ev.evaluate(_perturbed(noise=0.01), label="near")
    far = ev.evaluate(_perturbed(noise=0.05), label="far")
    c = paired_comparison(near, far)
    # the ratio and difference are the runs' own means, and the intervals contain them
    assert c["kl"]["ratio_a_over_b"] == pytest.approx(near["teacher_forced"]["kl"] / far["teacher_forced"]["kl"])
    assert c["ear"]["a_minus_b"] == pytest.approx(near["teacher_forced"]["ear"] - far["teacher_forced"]["ear"])
    lo, hi = c["kl"]["ci95"]
    assert lo <= c["kl"]["ratio_a_over_b"] <= hi
    # 5x the weight noise: closer on every block, beyond sampling noise
    assert c["kl"]["a_lower_beyond_noise"] and hi < 1
    assert c["ear"]["a_higher_beyond_noise"] and c["ear"]["ci95"][0] > 0
    assert c["positions"] == 4 * 47 and c["sequences"] == 4
    # swapping the roles inverts the verdict
    assert not paired_comparison(far, near)["kl"]["a_lower_beyond_noise"]

    # through the CLI, from files: an eval run and a quantize report's "fidelity" section
    j_near, _ = write_run(near, tmp_path / "runs")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "slq_report.json").write_text(json.dumps({"bpp": 4.0, "fidelity": far}))
    rc = cli_main(["report", "--compare", str(j_near), str(tmp_path / "ck" / "slq_report.json"),
                   "--out", str(tmp_path / "cmp")])
    assert rc == 0
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["kl"]["ratio_a_over_b"] == pytest.approx(c["kl"]["ratio_a_over_b"])

    # different text, or runs without per-sequence sums, are refused with the reason
    other = Evaluator(ref, blocks=blocks[:3], sample_prompts=0, progress=False, n_boot=50)
    with pytest.raises(ReportError, match="n_blocks"):
        paired_comparison(near, other.evaluate(_perturbed(noise=0.05), label="other"))
    old = json.loads(json.dumps(far))
    del old["teacher_forced"]["per_sequence"]
    with pytest.raises(ReportError, match="per-sequence"):
        paired_comparison(near, old)
    assert cli_main(["report", "--compare", str(j_near), "--out", str(tmp_path / "cmp")]) == 2


# ---------------------------------------------------------------- reference model + vLLM
@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory):
    """A real compressed-tensors 4-bit (sym, group 64) RTN checkpoint of the reference model."""
    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.data import load_model
    from vllm_slq.quant.grid import rtn
    from vllm_slq.quant.spec import QuantSpec

    model, tok = load_model("smollm2-135m", dtype=torch.float16)
    spec = QuantSpec(4, 64, symmetric=True)
    quantized = {f"model.layers.{n}": rtn(m.weight.data.float(), spec, layer=n)
                 for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    out = tmp_path_factory.mktemp("ck") / "smollm2-w4s-g64"
    save_checkpoint(model, quantized, out, tokenizer=tok, extra={"method": "rtn"})
    return out


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_and_hf_backends_agree_on_w4_checkpoint(w4_checkpoint):
    from vllm_slq.data import load_model

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ev = Evaluator(model, tokenizer=tok, n_tokens=6 * 128, seq_len=128, sample_prompts=0,
                   progress=False, n_boot=500)
    hf = ev.evaluate(w4_checkpoint, backend="hf")
    vl = ev.evaluate(w4_checkpoint, backend="vllm", cand_dtype="float16")
    h, v = hf["teacher_forced"], vl["teacher_forced"]
    print(f"\nW4 sym g64, {h['n_positions']} positions: HF EAR {h['ear']:.4f} CI {h['ear_ci95']} KL {h['kl']:.4f}; "
          f"vLLM EAR {v['ear']:.4f} CI {v['ear_ci95']} KL {v['kl']:.4f}")
    assert vl["backend"] == "vllm" and v["ear_exact"] and v["n_positions"] == h["n_positions"]
    assert 0.5 < h["ear"] < 0.99  # 4-bit sym g64 on this model is clearly lossy
    lo, hi = h["ear_ci95"]
    assert lo <= v["ear"] <= hi, (h, v)
    assert v["kl"] == pytest.approx(h["kl"], rel=0.15)
    assert abs(v["top1"] - h["top1"]) < 0.03
    assert hf["candidate_info"]["bpp"] == pytest.approx(4 + 16 / 64)
    # the top-k mode gives an exact lower bound below the exact value
    from vllm_slq.eval.vllm_backend import VLLMCandidate

    ids = ev.blocks[0]
    cand = VLLMCandidate(w4_checkpoint, max_model_len=128, topk=5, dtype="float16")
    from vllm_slq.eval.hf_backend import score_sequence

    bound = score_sequence(ev.ref, cand, ids)
    cand.close()
    assert not bound.exact
    exact = score_sequence(ev.ref, HFRunner(__import__("vllm_slq.eval.hf_backend", fromlist=["x"])
                                            .load_hf_model(w4_checkpoint)[0]), ids)
    assert float(bound.ear.mean()) <= float(exact.ear.mean()) + 0.01
    assert float(bound.ear_upper.mean()) >= float(exact.ear.mean()) - 0.01
