"""What a run says in words and records about itself: the headline, rates as text, and the run section of results.json
(versions, sources, placement, stage times)."""

from __future__ import annotations

import platform
import time

import torch

from audit import __version__


def version() -> str:
    return __version__


def rate_text(r: dict | None) -> str:
    """A rate for a headline: '40%', or why there is none (never 'nan%')."""
    if not r:
        return "not measured"
    rate = r.get("rate")
    if not r.get("n") or rate is None or rate != rate:
        return f"not measurable (all {r.get('unknown', 0)} outputs undecided: empty, cut off or degenerate)"
    return f"{rate:.0%}"


def headline(verdict, rates, conclusion: dict) -> str:
    """One sentence: the verdict, refusal before -> after, and what the diagnosis concluded (checks/diagnosis/outcome.py):
    a cause proven by its simulated fix, a cause named on its evidence, or "no cause proven" (never a guess called likely)."""
    rr = f"refusal {rate_text(rates.get('before'))} -> {rate_text(rates.get('after'))}"
    if verdict == "pass":
        return f"The ablation works: {rr}."
    status = conclusion.get("status")
    if status == "explained":
        return f"The ablation fails: {rr}. {'Cause' if conclusion.get('proven') else 'Cause named on evidence'}: {conclusion['statement']}."
    return f"The ablation fails: {rr}. No cause proven" + (f": {conclusion['next'][0]}." if conclusion.get("next") else ".")


def run_info(opts, ctx, abl, base, hs, ls, nh, nl, dsrc, separating, ref, intent_source, gate_source) -> dict:
    
    import transformers

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ctx.t0)), "command": opts.command,
            "model_dir": str(abl.path.resolve()), "base_dir": str(base.path.resolve()), "config": opts.config, "intent_source": intent_source,
            "prompts": {"harmful": {"source": hs or "embedded default", "n": nh}, "harmless": {"source": ls or "embedded default", "n": nl},
                        "cut_to_budget": ctx.prompts_cut},
            "directions": {"source": dsrc, "separating_index": separating, "ablated_index": ref}, "gate_source": gate_source,
            "max_new_tokens": opts.max_new_tokens, "device": opts.device or "cpu", "dtype": opts.dtype, "placement": ctx.placement,
            "stages": ctx.stages, "stages_cpu": ctx.stages_cpu,
            "completions_from": f"{opts.server} ({opts.served_model or abl.path})" if opts.server else "local transformers",
            "base_completions_from": f"{opts.base_server} ({opts.served_base_model or base.path})" if opts.base_server else "local transformers",
            "servers": ctx.servers,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
