"""The simulator: candidate fixes tried on the base model as inference-time hooks, no weight written.

A config as hooks on the base equals re-ablating with it (audit/intervene.py; tests check hooks
against weight edits per component type). The first-token refusal score is calibrated once on
judged generations of the base and the ablated model (both classes are then present); each
candidate is estimated with early stopping and the best confirmed by generation (audit/estimate.py).
The bypass test picks the measurement index: every residual writer ablated with the direction of
each candidate index; the one that removes refusal with the least damage wins.
"""

from __future__ import annotations

import time

import torch

from checks.errors import AuditError

WRITER_TARGETS = ("embed", "attn_out", "mlp_down", "experts_down", "shared_down")


class Simulator:
    """Fixes simulated on the *base* model: a config as inference-time hooks equals re-ablating with it.

    The first-token refusal score is calibrated once on judged generations of the base and the
    ablated model (both classes are then present); each candidate is estimated with early stopping
    and the best ones confirmed by generation (audit/estimate.py). Also runs the bypass test that
    picks the measurement index: every residual writer ablated with the direction of each
    candidate index, the one that removes refusal wins.
    """

    def __init__(self, m_base, tok, harmful, harmless, scores, labels, judge, opts, directions, layout, token_ids, lp_harmless=None):
        """``scores``/``labels``: first-token refusal scores and judged labels of both models on every prompt (calibration);
        ``lp_harmless``: the base's first-token log-probs on the harmless prompts, when already measured."""
        from audit.estimate import Calibration

        t0 = time.perf_counter()
        self.m_base, self.tok, self.harmful, self.harmless, self.opts = m_base, tok, harmful, harmless, opts
        self.directions, self.layout, self.judge = directions, layout, judge
        self.opts_target = 0.1
        self.token_ids = token_ids
        self.calibration, self.note, self._lp_base = None, None, lp_harmless
        if len({x for x in labels if x is not None}) < 2:
            self.note = "no simulation: neither model both refuses and answers these prompts, so the refusal score cannot be calibrated"
        else:
            self.calibration = Calibration.fit(torch.as_tensor(scores), labels)
        self.seconds = time.perf_counter() - t0

    def estimate(self, candidates: dict, confirm_top: int = 0) -> dict:
        from audit.estimate import estimate_many

        t0 = time.perf_counter()
        out = estimate_many(self.m_base, self.tok, self.harmful, candidates, self.calibration, self.token_ids, self.opts.batch_size,
                            confirm_top=confirm_top, judge=self.judge,
                            max_new_tokens=min(self.opts.max_new_tokens, 48)) if candidates else {"candidates": []}
        self.seconds += time.perf_counter() - t0
        return {row["name"]: row for row in out["candidates"]}

    def kl(self, interventions) -> float:
        """First-token KL(base || base with the fix) on harmless prompts: the damage the fix would do."""
        from audit.generate import last_token_logprobs
        from audit.intervene import apply

        t0 = time.perf_counter()
        if self._lp_base is None:
            self._lp_base = last_token_logprobs(self.m_base, self.tok, self.harmless, self.opts.batch_size)
        with apply(self.m_base, interventions):
            lp = last_token_logprobs(self.m_base, self.tok, self.harmless, self.opts.batch_size)
        self.seconds += time.perf_counter() - t0
        return float((self._lp_base.exp() * (self._lp_base - lp)).sum(-1).mean())

    def bypass_scan(self, ablated_index: int | None, top: int = 3) -> dict:
        """Refusal with every residual writer ablated at every layer, per candidate measurement index."""
        from audit.ablation_config import AblationConfig
        from audit.intervene import from_config

        table = self.directions.quality_table()
        inner = sorted((row for row in table if 0 < row["index"] < len(table) - 1), key=lambda row: -row["quality"])
        cands = [row["index"] for row in inner[:top]]
        if ablated_index is not None and ablated_index not in cands and ablated_index < len(table):
            cands.append(ablated_index)
        present = [t for t in WRITER_TARGETS if self.layout.keys_where(component={"embed": "embed", "attn_out": "attn", "mlp_down": "mlp",
                                                                                   "experts_down": "experts", "shared_down": "shared_experts"}[t])]
        ivs = {}
        for i in cands:
            if float(self.directions.refusal_dir[i].norm()) == 0:
                continue
            cfg = AblationConfig.from_dict({"components": present, "ablate": [{"layer": l, "measurement": i} for l in range(self.layout.num_layers)]},
                                           source=f"bypass test, index {i}")
            ivs[f"index {i}"] = from_config(cfg, self.directions)
        rows = self.estimate(ivs)
        quality = {row["index"]: row["quality"] for row in table}
        res = {str(i): {"rate": rows[f"index {i}"]["rate"], "lo": rows[f"index {i}"]["lo"], "hi": rows[f"index {i}"]["hi"], "quality": quality[i],
                        "kl": self.kl(ivs[f"index {i}"])} for i in cands if f"index {i}" in rows}
        target = self.opts_target
        lowest = min(v["rate"] for v in res.values())
        ok = [k for k, v in res.items() if v["rate"] <= max(target, lowest)]  # the indices that remove refusal (or do best)
        best = min(ok, key=lambda k: (res[k]["kl"], -res[k]["quality"]))  # of those, the least damage
        return {"indices": res, "best_index": int(best), "components": present,
                "note": "refusal (first-token estimate) with every residual writer ablated at every layer using the direction of each index"}

    def simulate_causes(self, causes, config, baseline) -> dict:
        from audit.fixes import apply_patch
        from audit.intervene import from_config

        candidates, skipped = {}, []
        for cz in causes:
            patch = cz.fix.get("patch")
            if not patch or set(patch) <= {"dtype"} or (not cz.explains_refusal and "measurement" not in patch):
                skipped.append(cz.id)
                continue
            try:
                ivs = from_config(apply_patch(config, patch), self.directions)
            except AuditError as e:  # e.g. norm-preserving configs have no inference-time counterpart
                skipped.append(f"{cz.id} ({e})")
                continue
            if ivs:
                candidates[cz.id] = ivs
            else:  # the fix adds nothing to what reached the weights: the model stays as it is
                cz.simulated = {"refusal_rate": baseline, "interval": None, "method": "nothing to apply", "baseline": baseline, "kl": 0.0,
                                "n": 0, "seconds": 0.0, "interventions": []}
        by_id = self.estimate(candidates, confirm_top=self.opts.confirm_top)
        for cz in causes:
            row = by_id.get(cz.id)
            if row is None:
                continue
            gen = row.get("generation")
            cz.simulated = {"kl": self.kl(candidates[cz.id]), "refusal_rate": gen["rate"] if gen else row["rate"],
                            "interval": [gen["lo"], gen["hi"]] if gen else [row["lo"], row["hi"]],
                            "method": "generation" if gen else "first-token score", "first_token_estimate": row["rate"],
                            "n": gen["n"] if gen else row["n_used"], "baseline": baseline,
                            "seconds": row["seconds"] + (gen["seconds"] if gen else 0.0), "interventions": row["interventions"]}
        return {"skipped": skipped, "candidates": len(candidates), "model": "base with the fixed config as hooks"}


