"""The shell of the ablation audit suite: its folders are the pipeline's stages (model, intent, weights, ablation,
forward, judgement, pipeline; organisms for the models it grows itself). The judging itself is in checks/."""

__version__ = "0.1.0"
