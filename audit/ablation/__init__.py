"""Our own ablation: a config and a direction in, a new checkpoint out (bf16/fp32, FP8 and MXFP4 re-quantized).
"""
