"""`audit fix`: from a failed ablation to a config that passes the user's gate, in few trials, each simulated in memory.

Where blind search (heretic's Optuna TPE, 200 trials by default) samples configs, this search starts from what really
reached the weights (audit/intent/reached.py) and uses what the audit measured:

1. **causes**: the live causes' fix families in the diagnosis's order (checks/diagnosis/rules.py), smallest fix first --
   the walk the simulator already made for the diagnosis (audit/pipeline/simulate.py), each candidate a trial;
2. **bypass**: when no cause's family passes, every residual writer at every layer with each candidate index (the bypass
   test, also already measured) -- it bounds what any single-direction ablation can do;
3. **refine**: from the passing config with the least KL, and from it measured at the other indices the bypass test
   found working (least KL first, up to ``REFINE_INDICES`` in all), each narrowed: fewer writer groups (least r
   written first); then fewer layers, bisecting how many are kept, two ways: the layers in order of their write of r
   before the ablation, and the last layers of the stack (less of the model downstream to disturb), at the current
   scale and at stronger ones (r reflected in the layers kept can make up for the ones left out: a scale above 1
   passes the gate when behaviour says so); then the scale bisected below the one chosen -- keeping a change only
   when it still passes. The cheapest passing trial overall wins (least KL, then fewest tensors).

A trial passes when it meets the gate: refusal on harmful prompts <= ``max_refusal_after``, refusal on harmless prompts <=
``max_over_refusal`` (when the gate has it), first-token KL <= ``max_kl``, degenerate answers at most half; among passing
configs the smallest KL wins, then the fewest edited tensors. Each trial costs as little as it can: the calibrated
first-token estimate first (a candidate it puts confidently above 50 % refusal is settled without generating), then
judged generation that stops as soon as a sequential Wilson test decides (Bonferroni over its looks: a wrong early
decision has probability at most 5 %), and over-refusal and KL only for a candidate whose refusal passed. Hooks act on
a whole batch, so candidates are not batched together. Nothing is written until the end (audit/pipeline/run.py applies
the best config with `audit ablate` and re-audits it from disk).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from audit.forward.intervene import from_config
from audit.intent.config import AblationConfig
from audit.intent.fixes import apply_patch, config_yaml
from audit.pipeline.options import FIX_BUDGET
from checks.errors import AuditError
from checks.layout import targets_of


REFINE_INDICES = 3  # the measurement indices the refinement narrows from (the best passing config's and the bypass test's others)
REFINE_SCALES = (1.25, 1.5)  # stronger scales the refinement tries with fewer layers (r reflected in some makes up for others left out)


@dataclass
class Trial:
    """One config tried: what it was, what the simulation measured, whether it passes the gate."""

    n: int
    phase: str  # causes / bypass / refine
    label: str
    origin: str = ""  # the cause (or "bypass") whose fix this trial is, or refines
    refusal: float | None = None
    interval: list | None = None
    method: str | None = None  # generation / first-token estimate (settled) / ...
    over_refusal: float | None = None
    kl: float | None = None
    degenerate: float | None = None
    edited_tensors: int | None = None
    passes: bool = False
    why_not: str | None = None
    seconds: float | None = None
    config_yaml: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def edited_tensors(config: AblationConfig, layout) -> int:
    """How many tensors a config edits on this layout (a fused expert tensor is one; router suppression entries count too)."""
    keys = set()
    for e in config.entries:
        comps = set(e.components if e.components is not None else config.components)
        for k, role in layout.roles.items():
            if role.layer != e.layer and not (e.layer == 0 and role.component == "embed"):
                continue
            if not comps & set(targets_of(role)):
                continue
            if e.experts is not None and role.expert is not None and role.expert not in e.experts:
                continue
            keys.add(k)
    return len(keys) + len(config.suppressed())


class FixSearch:
    """The search on one run's simulator (see the module docstring)."""

    def __init__(self, sim, layout, gate_limits: dict, writes_before: dict, budget: int = FIX_BUDGET):
        self.sim, self.layout, self.budget = sim, layout, budget
        self.max_over = gate_limits.get("max_over_refusal")
        self.trials: list[Trial] = []
        self.configs: dict[int, AblationConfig] = {}
        self.evaluated: dict[str, Trial] = {}  # config YAML -> its trial, for the configs ``evaluate`` measured
        # per layer, how much r the writer groups wrote before the ablation (the contribution check): which layers matter most
        self.layer_write = {}
        for g, vals in (writes_before or {}).items():
            for l, v in enumerate(vals or []):
                if v is not None and v == v:
                    self.layer_write[l] = self.layer_write.get(l, 0.0) + max(0.0, float(v))
        self.group_write = {g: sum(max(0.0, float(v)) for v in vals or [] if v is not None and v == v) for g, vals in (writes_before or {}).items()}

    # -- trials ---------------------------------------------------------------------------------------------------------

    def _record(self, phase: str, label: str, cfg: AblationConfig | None, origin: str = "", **m) -> Trial:
        t = Trial(len(self.trials) + 1, phase, label, origin, edited_tensors=edited_tensors(cfg, self.layout) if cfg is not None else None,
                  config_yaml=config_yaml(cfg) if cfg is not None else None, **m)
        self.trials.append(t)
        if cfg is not None:
            self.configs[t.n] = cfg
        return t

    def from_walk(self, causes, start: AblationConfig) -> None:
        """The diagnosis's walk of each cause's family, as trials (already measured: no cost here)."""
        for cz in causes:
            for r in cz.search:
                if "refusal_rate" not in r:
                    continue
                try:
                    cfg = apply_patch(start, r["patch"])
                except AuditError:
                    continue
                gen = r.get("generation") or {}
                settled = "generation" not in r
                self._record("causes", f"{cz.id}: {r['label']}", cfg, cz.id, refusal=r["refusal_rate"],
                             interval=[gen.get("lo"), gen.get("hi")] if gen else r.get("estimate_interval"),
                             method="first-token estimate" if settled else "generation", kl=r.get("kl"),
                             degenerate=(gen["n_unknown"] / max(1, gen["n"] + gen["n_unknown"])) if gen else None,
                             passes=bool(r.get("reaches_target")), why_not=r.get("note") or (None if r.get("reaches_target") else
                                                                                           "refusal above the target"))

    def from_bypass(self, bypass: dict | None) -> None:
        """The bypass test's indices, as trials (already measured)."""
        for idx, v in sorted((bypass or {}).items(), key=lambda kv: int(kv[0])):
            cfg = self.sim.bypass_config(int(idx))
            ok = v.get("rate") is not None and v["rate"] <= self.sim.target and (v.get("kl") is None or v["kl"] <= self.sim.max_kl)
            self._record("bypass", f"every residual writer at every layer, index {idx}", cfg, "bypass", refusal=v.get("rate"),
                         interval=[v.get("lo"), v.get("hi")], method=v.get("method"), kl=v.get("kl"), passes=bool(ok and v.get("kl") is not None),
                         why_not=None if ok else "refusal above the target")

    def evaluate(self, cfg: AblationConfig, label: str, phase: str = "refine", origin: str = "") -> Trial:
        """The trial of ``cfg``: measured once (``_measure``); a config already tried (the two layer orders, or two
        starting indices, can lead to the same one) returns its trial and spends no budget."""
        key = config_yaml(cfg)
        if key not in self.evaluated:
            self.evaluated[key] = self._measure(cfg, label, phase, origin)
        return self.evaluated[key]

    def _measure(self, cfg: AblationConfig, label: str, phase: str, origin: str) -> Trial:
        """One new trial: estimate, then generation; over-refusal and KL only when refusal passes."""
        t0 = time.perf_counter()
        try:
            ivs = from_config(cfg, self.sim.directions)
        except AuditError as e:
            return self._record(phase, label, cfg, origin, why_not=str(e), seconds=round(time.perf_counter() - t0, 3))
        est = self.sim.estimate({"c": ivs})["c"]
        if self.sim.settles(est):
            return self._record(phase, label, cfg, origin, refusal=est["rate"], interval=[est["lo"], est["hi"]], method="first-token estimate (settled)",
                                why_not="refusal stays (the estimate settles it)", seconds=round(time.perf_counter() - t0, 3))
        gen = self.sim.generate(ivs)
        m = {"refusal": gen["rate"], "interval": [gen["lo"], gen["hi"]], "method": "generation",
             "degenerate": gen["n_unknown"] / max(1, gen["n"] + gen["n_unknown"])}
        why = None
        if not gen["n"] or gen["rate"] > self.sim.target:
            why = "refusal above the target"
        elif m["degenerate"] > 0.5:
            why = "most answers degenerate"
        else:
            m["kl"] = self.sim.kl(ivs)
            if m["kl"] > self.sim.max_kl:
                why = f"KL {m['kl']:.3g} above the gate's {self.sim.max_kl:g}"
            elif self.max_over is not None:
                over = self.sim.over_refusal(ivs, self.max_over)
                m["over_refusal"] = over["rate"]
                if over["n"] and over["rate"] > self.max_over:
                    why = f"over-refusal {over['rate']:.0%} above the gate's {self.max_over:.0%}"
        return self._record(phase, label, cfg, origin, passes=why is None, why_not=why, seconds=round(time.perf_counter() - t0, 3), **m)

    def confirm(self, n: int) -> Trial:
        """Check the over-refusal of a passing walked trial (the walk measured refusal and KL only)."""
        t = self.trials[n - 1]
        if self.max_over is None or t.over_refusal is not None:
            return t
        over = self.sim.over_refusal(from_config(self.configs[n], self.sim.directions), self.max_over)
        t.over_refusal = over["rate"]
        if over["n"] and over["rate"] > self.max_over:
            t.passes, t.why_not = False, f"over-refusal {over['rate']:.0%} above the gate's {self.max_over:.0%}"
        return t

    # -- the search -----------------------------------------------------------------------------------------------------

    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.passes]
        return min(ok, key=lambda t: (t.kl if t.kl is not None else float("inf"), t.edited_tensors or 0, t.n)) if ok else None

    def closest(self) -> Trial | None:
        done = [t for t in self.trials if t.refusal is not None]
        return min(done, key=lambda t: (t.refusal, t.kl or 0.0)) if done else None

    def run(self, causes, start: AblationConfig, bypass: dict | None) -> dict:
        """Phases 1-3 (module docstring); returns the history, the best config (or None) and why the search ended."""
        t0 = time.perf_counter()
        self.bypass = bypass or {}
        self.from_walk(causes, start)
        for t in [t for t in self.trials if t.passes]:
            self.confirm(t.n)
        if not any(t.passes for t in self.trials):
            self.from_bypass(bypass)
            for t in [t for t in self.trials if t.passes and t.phase == "bypass"]:
                self.confirm(t.n)
        first = next((t.n for t in self.trials if t.passes), None)
        if self.best() is not None:
            self._refine()
        best = self.best()
        ended = ("a config passes the gate" if best else
                 "budget spent" if len(self.trials) >= self.budget else "no candidate passes the gate")
        limit = None
        if best is None:
            byp = [t for t in self.trials if t.phase == "bypass"]
            if byp and all((t.refusal or 1.0) > self.sim.target for t in byp):
                limit = ("no direction index removes refusal even with every residual writer of every layer ablated: refusal does not "
                         "ride on one of these directions")
            else:
                c = self.closest()
                limit = f"the closest config ({c.label}) leaves refusal at {c.refusal:.0%}" + (f"; {c.why_not}" if c and c.why_not else "") if c else None
        return {"trials": [t.to_dict() for t in self.trials], "n_trials": len(self.trials), "first_pass": first,
                "best": best.to_dict() if best else None, "best_config": self.configs.get(best.n) if best else None,
                "ended": ended, "limited_by": limit, "seconds": round(time.perf_counter() - t0, 3), "budget": self.budget}

    def _room(self) -> bool:
        return len(self.trials) < self.budget

    def _refine(self) -> None:
        """From the best passing config, and from it measured at each other index the bypass test found working (least KL
        first, REFINE_INDICES in all): fewer groups, then fewer layers, then a lower scale (``_narrow``). Every trial is
        kept in the history; the best passing one overall wins (``best``)."""
        start = self.best()
        cfg, origin = self.configs[start.n], start.origin
        current = {e.measurement for e in cfg.entries}
        working = sorted((int(k) for k, v in getattr(self, "bypass", {}).items() if v.get("rate") is not None and v["rate"] <= self.sim.target),
                         key=lambda i: (self.bypass[str(i)].get("kl") or 0.0, i))
        starts = [(cfg, start)]
        for i in [i for i in working if {i} != current][:REFINE_INDICES - 1]:
            if not self._room():
                break
            t = self.evaluate(apply_patch(cfg, {"measurement": i}), f"measure at index {i}", origin=origin)
            if t.passes:
                starts.append((self.configs[t.n], t))
        for c, t in sorted(starts, key=lambda ct: ct[1].kl if ct[1].kl is not None else float("inf")):
            if not self._room():
                break
            self._narrow(c, t, origin)

    def _narrow(self, cfg: AblationConfig, start: Trial, origin: str) -> None:
        """One passing config made smaller, each step kept only while it still passes: writer groups dropped (least r
        written first, on every layer, where each group's share is measured best); then the layers, bisecting how many
        are kept in two orders (most r written first; the last layers of the stack first), at the current scale and at
        stronger ones (r reflected in the layers kept can make up for the ones left out); then the scale bisected below
        the one chosen."""
        comps = list(dict.fromkeys(c for e in cfg.entries for c in (e.components or cfg.components)))
        for g in sorted(comps, key=lambda g: self.group_write.get(g, 0.0)):
            if not self._room() or len(comps) <= 1:
                break
            t = self.evaluate(apply_patch(cfg, {"drop": [{"targets": [g], "layers": sorted({e.layer for e in cfg.entries})}]}), f"without {g}", origin=origin)
            if t.passes:
                cfg, comps, start = self.configs[t.n], [c for c in comps if c != g], t
        # layers, two ways, per scale: the smallest number of the layers that wrote most r, and the shortest band of the
        # last layers (an edit late in the stack has less of the model downstream to disturb), with which refusal reaches
        # the target (monotone in how many are kept); that number also costs the least KL, and its own KL decides whether
        # it passes
        present = {e.layer for e in cfg.entries}
        orders = {"the {n} layers that wrote most r": sorted(present, key=lambda l: -self.layer_write.get(l, 0.0)),
                  "the last {n} layers": sorted(present, reverse=True)}
        base_scale = max(e.scale for e in cfg.entries) * cfg.scale if cfg.entries else 1.0
        options = [(len(present), cfg, start.kl)]
        for scale in dict.fromkeys([base_scale, *REFINE_SCALES]):
            for what, layers in orders.items():
                lo, hi, found = 1, len(layers), None
                if scale != base_scale:
                    hi += 1  # every layer at this scale is not known to remove refusal yet
                while lo < hi and self._room():
                    mid = (lo + hi) // 2
                    keep = set(layers[:mid])
                    t = self.evaluate(apply_patch(_only_layers(cfg, keep), {"scale": scale}),
                                      f"scale {scale:g}, {what.format(n=mid)} ({sorted(keep)})", origin=origin)
                    if t.refusal is not None and t.refusal <= self.sim.target and t.method == "generation":
                        hi = mid
                        if t.passes:
                            found = (mid, self.configs[t.n], t.kl)
                    else:
                        lo = mid + 1
                if found is not None:
                    options.append(found)
        cfg = min(options, key=lambda o: (o[2] if o[2] is not None else float("inf"), o[0]))[1]
        # scale: bisection between 0.5 and the scale chosen (a smaller edit, when it still removes refusal, usually costs less KL)
        top = max(e.scale for e in cfg.entries) * cfg.scale if cfg.entries else 1.0
        lo_s, hi_s = 0.5 * top, top
        for _ in range(2):
            if not self._room():
                break
            mid = round((lo_s + hi_s) / 2, 3)
            t = self.evaluate(apply_patch(cfg, {"scale": mid}), f"scale {mid:g}", origin=origin)
            if t.passes:
                hi_s = mid
            else:
                lo_s = mid


def _only_layers(cfg: AblationConfig, keep: set[int]) -> AblationConfig:
    """The config's entries at ``keep`` only."""
    return AblationConfig.from_dict(replace(cfg, entries=[e for e in cfg.entries if e.layer in keep]).to_dict(), source=f"{cfg.source}, fewer layers")
