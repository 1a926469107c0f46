"""Models the project grows itself: trained tiny MoE organisms with a planted refusal direction (variants put
it in different writers), random tiny models, the test tokenizer, the diagnosis matrix's cases, and `audit demo`."""
