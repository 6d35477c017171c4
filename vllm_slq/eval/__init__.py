"""vllm_slq.eval"""
