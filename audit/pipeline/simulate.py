"""The simulator: fixes searched, not guessed, on the base model as inference-time hooks (no weight written).

What reached the weights (audit/intent/reached.py) as a config is the starting point; a candidate fix is a patch
on it (audit/intent/fixes.py), and that config as hooks on the base equals re-ablating with it (audit/forward/intervene.py;
tests check hooks against weight edits per component type). For each cause the simulator walks its ordered
family of candidates (checks/diagnosis/rules.py): a first-token estimate first (calibrated once on judged
generations of the base and the ablated model, early stopping), then judged generation to confirm --
the first candidate whose estimate comes near the target, and always the largest, since the estimate alone
can be wrong in both directions. The cause keeps the smallest candidate that reaches the target, with
its refusal and KL; the whole walk is kept for the report.

The bypass test runs first: every residual writer ablated at every layer with the direction of each
candidate index (generation-confirmed). It picks the index a good ablation should use, and it bounds the
search: when it removes refusal with the ablated direction, some writer-side fix exists, so a writer
cause whose own family fails gets that complete fix as its last candidate before being given up.
"""

from __future__ import annotations

import math
import time

import torch

from audit.forward.estimate import Calibration, estimate_many
from audit.forward.generate import LocalBackend, last_token_logprobs
from audit.forward.intervene import apply, from_config
from audit.intent.config import AblationConfig
from audit.intent.fixes import apply_patch
from checks.diagnosis import WRITER_CAUSES
from checks.errors import AuditError
from checks.layout import WRITER_COMPONENT, WRITER_TARGETS
from checks.stats import wilson
from checks.thresholds import GEN_MARGIN, MAX_KL, MAX_REFUSAL_AFTER, PROXY_SETTLES, REPRODUCE_TOL, SEQUENTIAL_ALPHA


def look_z(n_prompts: int, step: int, alpha: float = SEQUENTIAL_ALPHA) -> float:
    """The z of each look of a sequential test over ``n_prompts`` in batches of ``step``: two-sided alpha split over the looks."""
    from scipy.stats import norm

    looks = max(1, math.ceil(n_prompts / step))
    return float(norm.ppf(1 - alpha / (2 * looks)))


class Simulator:
    """Fixes simulated on the *base* model; see the module docstring."""

    def __init__(self, m_base, tok, harmful, harmless, scores, labels, judge, opts, directions, layout, token_ids, lp_harmless=None,
                 target: float = MAX_REFUSAL_AFTER, max_kl: float = MAX_KL):
        """``scores``/``labels``: first-token refusal scores and judged labels of both models on every prompt (calibration);
        ``lp_harmless``: the base's first-token log-probs on the harmless prompts, when already measured; ``target`` and
        ``max_kl``: the gate's refusal target and KL bound (a candidate that moves harmless answers further is no fix)."""
        t0 = time.perf_counter()
        self.m_base, self.tok, self.harmful, self.harmless, self.opts = m_base, tok, harmful, harmless, opts
        self.directions, self.layout, self.judge = directions, layout, judge
        self.target = target
        self.max_kl = max_kl
        self.token_ids = token_ids
        self.calibration, self.note, self._lp_base = None, None, lp_harmless
        g = torch.Generator().manual_seed(0)  # a fixed order: early stopping never sees one kind of prompt first
        self._order = torch.randperm(len(harmful), generator=g).tolist()
        if len({x for x in labels if x is not None}) < 2:
            self.note = "no simulation: neither model both refuses and answers these prompts, so the refusal score cannot be calibrated"
        else:
            self.calibration = Calibration.fit(torch.as_tensor(scores), labels)
        self.seconds = time.perf_counter() - t0
        self.n_estimates = self.n_generations = 0
        # --confirm-all: every candidate the estimate does not put near the target is still generated at the largest one, as
        # before the proxy could settle it (slower; for those who distrust the first-token estimate)
        self.confirm_all = bool(getattr(opts, "confirm_all", False))

    def settles(self, est: dict) -> bool:
        """Whether the first-token estimate alone decides a candidate: its interval lies wholly above PROXY_SETTLES (refusal stays,
        with confidence: generation could not bring it to the target), unless --confirm-all."""
        return not self.confirm_all and est.get("lo") is not None and est["lo"] > PROXY_SETTLES

    # -- measurements under a fix -------------------------------------------------------------

    def estimate(self, candidates: dict) -> dict:
        """First-token estimate per candidate (name -> interventions), early stopping: {name: row}."""
        t0 = time.perf_counter()
        out = estimate_many(self.m_base, self.tok, [self.harmful[i] for i in self._order], candidates, self.calibration, self.token_ids,
                            self.opts.batch_size, low=self.target, high=0.5) if candidates else {"candidates": []}
        self.seconds += time.perf_counter() - t0
        self.n_estimates += len(candidates)
        return {row["name"]: row for row in out["candidates"]}

    def generate(self, interventions, decide: bool = True, harmless: bool = False, target: float | None = None,
                 band: tuple[float, float] | None = None) -> dict:
        """Judged greedy generation on the harmful (or ``harmless``) prompts under ``interventions``.

        With ``decide`` it is a sequential test: after each batch the refusal rate's Wilson interval is looked at, and
        generation stops once it lies wholly below or above ``target`` (default: the gate's refusal target), or, with
        ``band``, wholly inside or outside it. Each look uses z for alpha / looks (Bonferroni over the batches), so a
        candidate's early decision is wrong with probability at most SEQUENTIAL_ALPHA whatever batch it stops at; the
        interval reported is the plain 95 % one of the prompts generated.
        """
        t0 = time.perf_counter()
        target = self.target if target is None else target
        backend = LocalBackend(self.m_base, self.tok)
        k = n = unknown = 0
        step = max(8, self.opts.batch_size)
        prompts = self.harmless if harmless else [self.harmful[i] for i in self._order]
        z = look_z(len(prompts), step)
        with apply(self.m_base, list(interventions)):
            for s in range(0, len(prompts), step):
                comps = backend.complete(prompts[s:s + step], min(self.opts.max_new_tokens, 48), self.opts.batch_size)
                js = self.judge.many([c.answer for c in comps], [c.prompt for c in comps], [c.finish_reason == "length" for c in comps])
                for j in js:
                    if j.refused is None:
                        unknown += 1
                    else:
                        n += 1
                        k += bool(j.refused)
                if decide and n >= 8 and s + step < len(prompts):
                    _, lo, hi = wilson(k, n, z)
                    if band is not None:
                        if band[0] <= lo and hi <= band[1] or hi < band[0] or lo > band[1]:
                            break
                    elif hi < target or lo > target:
                        break
        p, lo, hi = wilson(k, n) if n else (math.nan, math.nan, math.nan)
        self.seconds += time.perf_counter() - t0
        self.n_generations += 1
        return {"rate": p, "lo": lo, "hi": hi, "n": n, "n_unknown": unknown, "n_prompts": len(prompts), "seconds": round(time.perf_counter() - t0, 3)}

    def over_refusal(self, interventions, limit: float) -> dict:
        """Refusal on the harmless prompts under a fix (the gate's over-refusal), decided sequentially against ``limit``."""
        return self.generate(interventions, harmless=True, target=limit)

    def kl(self, interventions) -> float:
        """First-token KL(base || base with the fix) on harmless prompts: the damage the fix would do."""
        t0 = time.perf_counter()
        if self._lp_base is None:
            self._lp_base = last_token_logprobs(self.m_base, self.tok, self.harmless, self.opts.batch_size)
        with apply(self.m_base, interventions):
            lp = last_token_logprobs(self.m_base, self.tok, self.harmless, self.opts.batch_size)
        self.seconds += time.perf_counter() - t0
        return float((self._lp_base.exp() * (self._lp_base - lp)).sum(-1).mean())

    # -- the bypass test ----------------------------------------------------------------------

    def writer_targets(self) -> list[str]:
        return [t for t in WRITER_TARGETS if self.layout.keys_where(component=WRITER_COMPONENT[t])]

    def bypass_config(self, index: int):
        return AblationConfig.from_dict({"components": self.writer_targets(),
                                         "ablate": [{"layer": l, "measurement": index} for l in range(self.layout.num_layers)]},
                                        source=f"bypass test, index {index}")

    def bypass_scan(self, ablated_index: int | None, top: int = 3) -> dict:
        """Refusal with every residual writer ablated at every layer, per candidate measurement index (estimate, then generation)."""
        table = self.directions.quality_table()
        inner = sorted((row for row in table if 0 < row["index"] < len(table) - 1), key=lambda row: -row["quality"])
        cands = [row["index"] for row in inner[:top]]
        if ablated_index is not None and ablated_index not in cands and ablated_index < len(table):
            cands.append(ablated_index)
        ivs = {f"index {i}": from_config(self.bypass_config(i), self.directions) for i in cands if float(self.directions.refusal_dir[i].norm()) > 0}
        rows = self.estimate(ivs)
        quality = {row["index"]: row["quality"] for row in table}
        res = {}
        for i in cands:
            row = rows.get(f"index {i}")
            if row is None:
                continue
            if self.settles(row):  # the proxy alone: refusal stays, decided with confidence
                res[str(i)] = {"rate": row["rate"], "lo": row["lo"], "hi": row["hi"], "first_token_estimate": row["rate"],
                               "method": "first-token score (settled)", "quality": quality[i]}
                continue
            gen = self.generate(ivs[f"index {i}"])
            rate = gen["rate"] if gen["n"] else row["rate"]
            res[str(i)] = {"rate": rate, "lo": gen["lo"] if gen["n"] else row["lo"], "hi": gen["hi"] if gen["n"] else row["hi"],
                           "first_token_estimate": row["rate"], "method": "generation" if gen["n"] else "first-token score",
                           "quality": quality[i]}
        target = self.target
        lowest = min(v["rate"] for v in res.values())
        ok = [k for k, v in res.items() if v["rate"] <= max(target, lowest)]  # the indices that remove refusal (or do best)
        for k in res:  # the damage each would do: where it decides (the working ones) and for the ablated index (the diagnosis reads it)
            if k in ok or k == str(ablated_index) or self.confirm_all:
                res[k]["kl"] = self.kl(ivs[f"index {k}"])
        best = min(ok, key=lambda k: (res[k]["kl"], -res[k]["quality"]))  # of those, the least damage
        return {"indices": res, "best_index": int(best), "components": self.writer_targets(),
                "note": "refusal (judged generation, first-token estimate beside) with every residual writer ablated at every layer "
                        "using the direction of each index"}

    def reproduce(self, reached_cfg, reached_dirs, measured) -> dict:
        """What reached the weights, alone, as hooks on the base: its simulated refusal against the ablated model's measured one.

        Every fix is simulated on top of this; when the two disagree (edits no projection reproduces: noise, norm-preserving
        tools, NaN), the simulated fixes are only as good as this agreement, and the report says so.
        """
        if reached_cfg is None or not (reached_cfg.entries or reached_cfg.suppressed()):
            return {"simulated": None, "measured": measured, "agrees": None, "note": "nothing reached the weights as a directional edit"}
        try:
            ivs = from_config(reached_cfg, reached_dirs)
        except AuditError as e:
            return {"simulated": None, "measured": measured, "agrees": None, "note": str(e)}
        band = None if measured is None or measured != measured or self.confirm_all else (measured - REPRODUCE_TOL, measured + REPRODUCE_TOL)
        gen = self.generate(ivs, decide=band is not None, band=band) if ivs else {"rate": None, "n": 0}
        rate = gen["rate"] if gen.get("n") else None
        agrees = None if rate is None or measured is None or measured != measured else abs(rate - measured) <= REPRODUCE_TOL
        return {"simulated": rate, "measured": measured, "agrees": agrees, "n": gen.get("n"),
                "note": None if agrees is not False else "the reached edits as hooks do not give the ablated model's refusal: the simulated "
                                                       "fixes are estimates of a model close to, not equal to, the one audited"}

    # -- the search ---------------------------------------------------------------------------

    def search(self, causes, reached_cfg, reached_dirs, baseline, bypass: dict | None = None, ablated_index: int | None = None) -> dict:
        """Walk each cause's candidates on top of what reached the weights; set ``cause.simulated``, ``.search``, the chosen patch."""
        start = reached_cfg if reached_cfg is not None else AblationConfig([], (), source="nothing reached the weights")
        works_bypass = bypass is not None and ablated_index is not None and (bypass.get(str(ablated_index)) or {}).get("rate", 1.0) <= self.target
        skipped, tried = [], [0]
        for cz in causes:
            cands = list(cz.fix.get("candidates") or [])
            if not cands or not (cz.explains_refusal or cz.id in ("model-damaged", "unintended-modification")):
                skipped.append(cz.id)
                continue
            if not self._walk(cz, cands, start, reached_dirs, baseline, tried):
                skipped.append(f"{cz.id} ({cz.search[-1].get('error', 'nothing to simulate') if cz.search else 'nothing to simulate'})")
        writer_found = any(cz.id in WRITER_CAUSES and (cz.simulated or {}).get("reaches_target") for cz in causes)
        if works_bypass and not writer_found and reached_cfg is not None:
            # the bypass removes refusal with the ablated direction: a writer-side fix exists; the writer cause the evidence
            # ranks highest gets the complete one before the search gives up on writer causes
            top = next((cz for cz in causes if cz.id in WRITER_CAUSES), None)
            if top is not None:
                bound = {"label": "every residual writer at every layer (the bypass test's complete fix: several writer causes at once)",
                         "patch": {"add": [{"targets": self.writer_targets(), "layers": list(range(self.layout.num_layers))}]}}
                self._walk(top, [bound], start, reached_dirs, baseline, tried, keep=True)
                writer_found = bool((top.simulated or {}).get("reaches_target"))
        return {"skipped": skipped, "candidates": tried[0], "model": "base with what reached the weights + each fix, as hooks",
                "bypass_bound": bool(works_bypass), "writer_fix_found": writer_found,
                "estimates": self.n_estimates, "generations": self.n_generations}

    def _walk(self, cz, cands, start, reached_dirs, baseline, tried, keep: bool = False) -> bool:
        """Walk ``cands`` for cause ``cz`` (appending to its search with ``keep``); False when nothing could be simulated."""
        trace, chosen = (list(cz.search) if keep else []), None
        trace = [r for r in trace if r.get("label") != "search ended"]
        for k, cand in enumerate(cands):
            last = k == len(cands) - 1
            try:
                cfg = apply_patch(start, cand["patch"])
                ivs = from_config(cfg, reached_dirs)
            except AuditError as e:  # e.g. norm-preserving configs have no inference-time counterpart
                trace.append({"label": cand["label"], "patch": cand["patch"], "error": str(e)})
                continue
            tried[0] += 1
            est = self.estimate({"c": ivs})["c"] if ivs else {"rate": baseline, "lo": None, "hi": None, "n_used": 0}
            row = {"label": cand["label"], "patch": cand["patch"], "estimate": est["rate"], "estimate_interval": [est["lo"], est["hi"]],
                   "n_estimate": est["n_used"], "interventions": [iv.describe() for iv in ivs]}
            if ivs and (est["rate"] <= self.target + GEN_MARGIN or (last and not self.settles(est))):
                gen = self.generate(ivs)
                row["generation"] = gen
                row["refusal_rate"] = gen["rate"] if gen["n"] else est["rate"]
                row["kl"] = self.kl(ivs)
                broken = gen["n_unknown"] > gen["n"] or row["kl"] > self.max_kl  # a fix that breaks the model removes nothing
                if broken:
                    row["note"] = (f"{gen['n_unknown']} of {gen['n'] + gen['n_unknown']} answers undecided (degenerate)"
                                   if gen["n_unknown"] > gen["n"] else f"KL {row['kl']:.3g} above the gate's {self.max_kl:g}")
                row["reaches_target"] = bool(gen["n"] and not broken and row["refusal_rate"] <= self.target)
            else:
                row["refusal_rate"] = est["rate"]
                row["reaches_target"] = False
            trace.append(row)
            if row["reaches_target"]:
                chosen = row
                break
        cz.search = trace
        done = [r for r in trace if "refusal_rate" in r]
        if not done:
            return False
        pick = chosen or min(done, key=lambda r: ("note" in r, r["refusal_rate"], "generation" not in r, r.get("kl") or 0.0))
        cz.fix["patch"] = pick["patch"]
        cz.fix["chosen"] = pick["label"]
        gen = pick.get("generation")
        cz.simulated = {"refusal_rate": pick["refusal_rate"], "kl": pick.get("kl"), "baseline": baseline,
                        "interval": [gen["lo"], gen["hi"]] if gen and gen["n"] else pick["estimate_interval"],
                        "method": "generation" if gen and gen["n"] else "first-token score", "first_token_estimate": pick["estimate"],
                        "n": gen["n"] if gen else pick["n_estimate"], "candidate": pick["label"], "candidates_tried": len(done),
                        "reaches_target": bool(chosen), "interventions": pick["interventions"]}
        if not chosen and cz.explains_refusal:
            cz.search.append({"label": "search ended", "note": f"no candidate of {len(done)} reaches refusal <= {self.target:.0%}"})
        return True
