"""`audit run` as a sequence of stages (inputs, weights, forward passes, judgement, diagnosis, simulation, outputs):
its options and inputs, the fix simulator, the run's summary and its output folder."""
