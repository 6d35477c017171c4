"""vllm_slq.modifiers"""
