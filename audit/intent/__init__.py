"""What was meant, and with which direction: ablation configs (ours and llm-abliteration's YAML), direction files,
llm-abliteration's measurement, the config that reproduces what reached the weights, and patches of a config (fixes).
"""
