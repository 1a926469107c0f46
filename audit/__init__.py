"""The shell of the ablation audit suite: CLI, model directories, forward passes, our own ablation."""

__version__ = "0.1.0"
