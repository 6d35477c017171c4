"""Triton kernels (shipped as vllm_slq.kernels) and the per-layer kernel registry."""
