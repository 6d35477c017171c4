"""vllm_slq.allocation"""
