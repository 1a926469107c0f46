"""Forward passes on a loaded model: the probe (routing, writes along r), direction measurement, generation (local or
a server), first-token estimates, KL, and interventions (hooks that stand for a weight edit).
"""
