"""What the user points at, read safely: model directories (config, safetensors headers, shards, identity), tensors
read in bounded memory, quantized storage (FP8, MXFP4) decoded, prompt files and the one chat format.
"""
