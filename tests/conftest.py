"""Shared test setup.

Environment defaults are set before anything imports triton or vllm: on a
machine without a GPU, Triton kernels run in the interpreter, and vLLM runs
in-process with a small KV cache.
"""
import os

import pytest

try:
    import torch as _torch

    _has_cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_MININTERVAL", "5")


@pytest.fixture(scope="session")
def reference_model_dir():
    """The fp16 SmolLM2-135M-Instruct directory (converted once, then cached)."""
    from vllm_slq.data import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def brown_text():
    from vllm_slq.data import load_text

    return load_text("brown")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from vllm_slq.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
