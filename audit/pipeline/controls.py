"""The controls of `audit run`: is the effect the refusal direction's, and does the audit see nothing where nothing was done?

The random-direction control takes what reached the weights (audit/intent/reached.py's config), replaces the direction
at each measurement index it uses by a random one orthogonal to r with r's norm (seeded: the same every run), and
runs those edits as hooks on the base (audit/forward/intervene.py ``from_config``, through the Simulator's public
``generate`` and ``kl``): no weight is written. Its refusal (judged generation on every harmful prompt) and its
first-token KL go beside the ablated model's in checks/controls.py. It runs whenever the simulation may (not with
--no-simulate or --no-controls), for passing verdicts too: one generation and two forward passes over the prompts.

The no-op control (``audit run BASE --base BASE --control``) needs no code here: the run's own checks measure it and
checks/controls.py ``noop_check`` / ``control_gate`` judge it.
"""

from __future__ import annotations

import time

import torch

from audit.forward.intervene import from_config
from audit.intent.config import AblationConfig
from audit.intent.directions import Directions
from audit.pipeline.simulate import Simulator
from checks.controls import controls_check
from checks.errors import AuditError
from checks.findings import CheckResult

SEED = 0


def random_directions(directions, indices, seed: int = SEED) -> Directions:
    """``directions`` with the refusal direction at each of ``indices`` replaced by a random vector orthogonal to it,
    of the same norm (float64 arithmetic, orthogonalized twice); the means are kept (biprojection reads them)."""
    rows = directions.refusal_dir.double().clone()
    for i in sorted(set(indices)):
        r = rows[i]
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        v = torch.randn(r.shape[0], generator=g, dtype=torch.float64)
        if r.norm() > 0:
            u = r / r.norm()
            for _ in range(2):
                v = v - (v @ u) * u
            v = v * (r.norm() / v.norm())
        rows[i] = v
    return Directions(rows.float(), directions.harmful_mean, directions.harmless_mean, metadata={**(directions.metadata or {}),
                      "random_control": {"indices": sorted(set(indices)), "seed": seed}})


def control_config(cfg: AblationConfig | None) -> tuple[AblationConfig | None, str | None]:
    """The reached config's directional edits alone (a router suppression has no direction to randomise), or why none."""
    if cfg is None or not cfg.entries:
        why = ("what reached the weights is a router suppression only: no direction to randomise" if cfg is not None and cfg.suppressed()
               else "no directional edit reached the weights")
        return None, why
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("suppress_experts", "suppress_strength", "suppress_measurement")}
    d["router_mode"] = "input" if cfg.router_mode == "suppress" else cfg.router_mode
    return AblationConfig.from_dict(d, source="random-direction control of what reached the weights"), None


def random_direction_control(sim: Simulator, done) -> tuple[dict | None, str | None]:
    """The control's measurements on ``sim``'s base model: refusal (every harmful prompt, judged), KL, and the reached
    edits' own KL as hooks; or (None, why) when it cannot be run."""
    cfg, why = control_config(done.config)
    if cfg is None:
        return None, why
    t0 = time.perf_counter()
    indices = sorted({e.measurement for e in cfg.entries})
    rand = random_directions(done.directions, indices)
    try:
        ivs = from_config(cfg, rand)
        real = from_config(cfg, done.directions)
    except AuditError as e:  # e.g. norm-preserving edits have no hook counterpart
        return None, f"the reached edits cannot be run as hooks: {e}"
    gen = sim.generate(ivs, decide=False)
    cos = [abs(float(rand.refusal_dir[i].double() @ done.directions.refusal_dir[i].double())) /
           max(1e-30, float(rand.refusal_dir[i].norm() * done.directions.refusal_dir[i].norm())) for i in indices]
    return {"refusal": gen["rate"] if gen["n"] else None, "lo": gen["lo"], "hi": gen["hi"], "n": gen["n"], "n_unknown": gen["n_unknown"],
            "kl": sim.kl(ivs), "edit_kl": sim.kl(real), "indices": indices, "max_abs_cos_to_r": max(cos) if cos else None,
            "entries": len(cfg.entries), "max_new_tokens": min(sim.opts.max_new_tokens, 48),
            "seconds": round(time.perf_counter() - t0, 3)}, None


def run_controls(ctx, opts, done, directions, layout, m_base, tok, prompts: dict, judged: dict, scores, jd, refusal_ids, lp_harmless,
                 refusal: dict, damage: dict) -> CheckResult:
    """The "controls" check of a run (see the module docstring); ``refusal`` and ``damage`` are those checks' result dicts."""
    before = ((refusal.get("data") or {}).get("before") or {}).get("rate")
    after = ((refusal.get("data") or {}).get("after") or {}).get("rate")
    kl = ((damage.get("data") or {}).get("first_token") or {}).get("mean")
    if not opts.simulate or not getattr(opts, "controls", True):
        return controls_check(before, after, None, kl, why_not="controls not run (--no-simulate or --no-controls)")
    with ctx.stage("controls: random direction"):
        labels = [x.refused for side in ("base", "abl") for k in prompts for x in judged[side, k]]
        sim = Simulator(m_base, tok, prompts["harmful"], prompts["harmless"], scores, labels, jd, opts, directions, layout, refusal_ids,
                        lp_harmless=lp_harmless)
        control, why = random_direction_control(sim, done)
    return controls_check(before, after, control, kl, why_not=why)
