"""vllm_slq.eval: fidelity of a quantized model against its FP16 reference.

    metrics       EAR / KL / top-1 / NLL, vocabulary-chunked; top-k EAR bounds; bootstrap
    hf_backend    teacher-forced and sampled-continuation protocols on HF transformers
    vllm_backend  the candidate served by vLLM, scored through prompt logprobs
    api           evaluate(reference, candidate, ...) -> dict
    lmeval        task-lossless check through lm-eval (model="vllm" | "hf"), local tasks
    report        per-run Markdown/JSON, fidelity-vs-bpp plot
    cli           `vllm-slq eval` / `vllm-slq report`
"""
from .api import Evaluator, evaluate, evaluate_many  # noqa: F401
from .hf_backend import EvalError  # noqa: F401
from .metrics import position_metrics, summarize, topk_ear_bounds  # noqa: F401
