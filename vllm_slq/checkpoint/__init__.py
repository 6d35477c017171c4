"""vllm_slq.checkpoint"""
