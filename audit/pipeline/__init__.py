"""The commands as sequences of stages: `audit run` (inputs, weights, forward passes, judgement, diagnosis,
simulation, outputs), the fix simulator, output folders that never touch an input, and `audit demo`.
"""
