"""vllm-slq: make LLMs small and fast without changing what they say.

Data path (see README "Architecture"):
    data -> modifiers (llmcompressor) -> quant / allocation (pure math)
         -> checkpoint (compressed-tensors) -> vllm (plugin) / kernels -> eval
"""

__version__ = "0.1.0"
