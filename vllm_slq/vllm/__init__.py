"""vllm_slq.vllm"""
