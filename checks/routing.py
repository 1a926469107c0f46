"""Routing check: which experts harmful prompts prefer, and what the ablation did to that choice.

The prompt is the statistical unit (a prompt's tokens are not independent draws): each prompt gives
one selection frequency per layer x expert (tokens routed to the expert / prompt tokens). Harmful vs
harmless is compared with a two-sided Mann-Whitney U test per cell, harmful before vs after ablation
with a paired Wilcoxon signed-rank test (same prompts) or Mann-Whitney when unpaired, and the
p-values of all layer x expert cells are corrected together by Benjamini-Hochberg. Findings:
``refusal-experts`` (harmful-associated experts and whether their weights were ablated),
``routing-compensation`` (harmful prompts move to other refusal-associated experts after the
ablation), ``router-ineffective`` (the router was modified but harmful routing did not change).
Inputs are probe summaries: anything with ``sel_count`` [n, L, E] and ``tokens_per_prompt`` [n]
(audit.forward.probe.ProbeResult, or a dict of arrays), optionally ``moe_layers``.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import stats

from checks.findings import FAIL, INFO, PASS, SKIP, WARN, CheckResult, Finding


def _get(x, name, default=None):
    if isinstance(x, dict):
        return x.get(name, default)
    return getattr(x, name, default)


def selection_freq(x, position: str = "tokens") -> np.ndarray:
    """[n, L, E] per-prompt fraction of tokens routed to each expert ("tokens"), or 0/1 at the last prompt token ("last")."""
    if position == "last":
        return np.asarray(_get(x, "last_sel"), dtype=np.float64)
    if position != "tokens":
        raise ValueError(f"position must be 'tokens' or 'last', not {position!r}")
    cnt = np.asarray(_get(x, "sel_count"), dtype=np.float64)
    ntok = np.maximum(np.asarray(_get(x, "tokens_per_prompt"), dtype=np.float64), 1.0)
    return cnt / ntok[:, None, None]


def _moe_layers(x, freq: np.ndarray) -> list[int]:
    layers = _get(x, "moe_layers")
    if layers is None:
        layers = [i for i in range(freq.shape[1]) if freq[:, i].sum() > 0]
    return [int(i) for i in layers]


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values for any shape of p-values (scipy's false_discovery_control; NaN is treated as p = 1)."""
    p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)
    if p.size == 0:
        return p.copy()
    return stats.false_discovery_control(p.ravel(), method="bh").reshape(p.shape)


def _unpaired_p(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sided Mann-Whitney p per cell of a [n1, C] vs b [n0, C]; 1 where both sides are constant and equal."""
    p = np.ones(a.shape[1])
    vary = (np.ptp(np.concatenate([a, b]), axis=0) > 0)
    if vary.any() and len(a) > 0 and len(b) > 0:
        p[vary] = stats.mannwhitneyu(a[:, vary], b[:, vary], alternative="two-sided", axis=0).pvalue
    return np.nan_to_num(p, nan=1.0)


def _paired_p(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Two-sided Wilcoxon signed-rank p per cell on paired per-prompt values; 1 where nothing changed."""
    d = after - before
    p = np.ones(d.shape[1])
    changed = np.abs(d).max(axis=0) > 0
    if changed.any():
        p[changed] = stats.wilcoxon(d[:, changed], zero_method="zsplit", alternative="two-sided", axis=0).pvalue
    return np.nan_to_num(p, nan=1.0)


EQUIV_MARGIN = 0.10  # a change of an expert's selection frequency smaller than this counts as "routing unchanged"


def _equivalent(before: np.ndarray, after: np.ndarray, paired: bool, alpha: float = 0.05, margin: float = EQUIV_MARGIN) -> np.ndarray:
    """Per cell, whether an equivalence test (two one-sided t-tests at ``alpha``: the 1 - 2 alpha interval of the mean
    change lies inside +-``margin``) shows the selection frequency unchanged. "No significant change" is not this: with
    few prompts a large change can go unnoticed, and then this is False."""
    if paired:
        d = after - before
        n = len(d)
        mean, se = d.mean(0), d.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(d.shape[1], np.inf)
        df = n - 1
    else:
        n1, n0 = len(after), len(before)
        mean = after.mean(0) - before.mean(0)
        v1 = after.var(0, ddof=1) / n1 if n1 > 1 else np.full(after.shape[1], np.inf)
        v0 = before.var(0, ddof=1) / n0 if n0 > 1 else np.full(before.shape[1], np.inf)
        se = np.sqrt(v1 + v0)
        df = max(min(n1, n0) - 1, 1)
    if df < 1:
        return np.zeros(mean.shape, dtype=bool)
    half = stats.t.ppf(1 - alpha, df) * se
    return (mean - half > -margin) & (mean + half < margin)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between two expert distributions (scipy's distance, squared)."""
    from scipy.spatial.distance import jensenshannon

    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return max(0.0, float(jensenshannon(p, q, base=2)) ** 2)


def _matrix(title, layers, values, unit, note, symmetric=True):
    v = np.asarray(values, dtype=np.float64)
    lim = float(np.nanmax(np.abs(v))) if v.size else 0.0
    return {"title": title, "rows": [f"layer {i}" for i in layers], "cols": [f"e{j}" for j in range(v.shape[1] if v.ndim == 2 else 0)],
            "values": v.tolist(), "vmin": -lim if symmetric else 0.0, "vmax": lim, "unit": unit, "note": note}


def _modified_set(modified_experts) -> set[tuple[int, int]] | None:
    if modified_experts is None:
        return None
    return {(int(a), int(b)) for a, b in modified_experts}


def _router_layers(router_modified, layers: list[int]) -> list[int]:
    if router_modified is None or router_modified is False:
        return []
    if router_modified is True:
        return list(layers)
    return [int(i) for i in router_modified if int(i) in layers]


def routing_check(harmful_before, harmless_before, harmful_after=None, modified_experts=None, router_modified=None,
                  alpha: float = 0.05, min_shift: float = 0.0, position: str = "tokens") -> CheckResult:
    """Compare routing on harmful vs harmless prompts (and harmful before vs after ablation).

    ``modified_experts``: [layer, expert] pairs whose weights the ablation changed (None: unknown).
    ``router_modified``: True / a list of layers whose router was modified / None or False.
    ``alpha``: false-discovery rate for the Benjamini-Hochberg correction.
    ``min_shift``: smallest risk difference (fraction of tokens) reported as an association.
    ``position``: "tokens" (per-prompt frequency over all prompt tokens) or "last" (selected at the last
    prompt token, where refusal is decided; the per-prompt value is then 0 or 1).
    """
    t0 = time.perf_counter()
    fh, fb = selection_freq(harmful_before, position), selection_freq(harmless_before, position)
    layers = _moe_layers(harmful_before, fh)
    if not layers or fh.shape[2] == 0:
        return CheckResult("routing", SKIP, "dense model: no routing to check", seconds=time.perf_counter() - t0)
    E = fh.shape[2]
    a, b = fh[:, layers].reshape(len(fh), -1), fb[:, layers].reshape(len(fb), -1)
    rd = (a.mean(0) - b.mean(0)).reshape(len(layers), E)
    q = benjamini_hochberg(_unpaired_p(a, b)).reshape(len(layers), E)
    findings: list[Finding] = []
    data: dict = {"matrices": {}, "curves": {}, "tables": {}}
    data["matrices"]["routing-rd"] = _matrix("Selection frequency, harmful - harmless (before ablation)", layers, rd, "fraction of tokens",
                                             f"per-prompt frequencies; Mann-Whitney U, BH q < {alpha} marks refusal-associated experts")
    data["matrices"]["routing-q"] = _matrix("BH q-value, harmful vs harmless", layers, q, "q", "", symmetric=False)
    js_hb = [js_divergence(fh[:, i].mean(0), fb[:, i].mean(0)) for i in layers]
    data["curves"]["routing-js"] = {"title": "Routing divergence per layer (Jensen-Shannon, bits)", "x": layers, "xlabel": "layer",
                                    "series": {"harmful vs harmless (before)": js_hb}}

    sig = (q < alpha) & (rd > min_shift)
    refusal = [(layers[li], int(e)) for li, e in zip(*np.nonzero(sig))]
    modified = _modified_set(modified_experts)
    rows = []
    for (layer, e) in refusal:
        li = layers.index(layer)
        rows.append({"layer": layer, "expert": e, "risk_difference": float(rd[li, e]), "q": float(q[li, e]),
                     "freq_harmful": float(fh[:, layer, e].mean()), "freq_harmless": float(fb[:, layer, e].mean()),
                     "ablated": None if modified is None else (layer, e) in modified})
    rows.sort(key=lambda r: -r["risk_difference"])
    data["refusal_experts"] = rows
    cols = ["layer", "expert", "risk_difference", "q", "freq_harmful", "freq_harmless", "ablated"]
    data["tables"]["refusal-experts"] = {"title": "Experts selected more on harmful prompts (BH q < alpha)", "columns": cols,
                                         "rows": [[r[c] for c in cols] for r in rows]}
    if refusal:
        left = [r for r in rows if r["ablated"] is False]
        sev = WARN if (modified is None or left) else INFO
        state = ("weights of these experts: unknown whether ablated" if modified is None else
                 f"{len(left)} of {len(rows)} not ablated" if left else "all of them ablated")
        findings.append(Finding(
            "refusal-experts", sev,
            f"{len(rows)} layer x expert cells selected more often on harmful prompts (BH q < {alpha}); {state}",
            value=float(len(rows)), threshold=alpha, layers=sorted({r["layer"] for r in rows}),
            experts=[[r["layer"], r["expert"]] for r in rows],
            evidence={"experts": rows, "position": position, "tested_cells": int(rd.size), "n_harmful": len(fh), "n_harmless": len(fb),
                      "not_ablated": [[r["layer"], r["expert"]] for r in left]}))

    if harmful_after is not None:
        fa = selection_freq(harmful_after, position)
        paired = fa.shape[0] == fh.shape[0]
        c = fa[:, layers].reshape(len(fa), -1)
        p_shift = _paired_p(a, c) if paired else _unpaired_p(a, c)
        q_shift = benjamini_hochberg(p_shift).reshape(len(layers), E)
        shift = (c.mean(0) - a.mean(0)).reshape(len(layers), E)
        data["matrices"]["routing-shift"] = _matrix("Selection frequency on harmful prompts, after - before ablation", layers, shift,
                                                    "fraction of tokens", ("Wilcoxon signed-rank (paired prompts)" if paired else "Mann-Whitney U")
                                                    + f"; BH over all cells, alpha {alpha}")
        if harmless_before is not None:
            rd_after = (c.mean(0) - b.mean(0)).reshape(len(layers), E)
            data["matrices"]["routing-rd-after"] = _matrix("Selection frequency, harmful (after) - harmless (before)", layers, rd_after,
                                                           "fraction of tokens", "")
        js_ba = [js_divergence(fh[:, i].mean(0), fa[:, i].mean(0)) for i in layers]
        data["curves"]["routing-js"]["series"]["harmful before vs after"] = js_ba
        moved = q_shift < alpha
        rs = {(layers[li], int(e)) for li, e in zip(*np.nonzero(sig))}
        down = [(layers[li], int(e)) for li, e in zip(*np.nonzero(moved & (shift < 0))) if (layers[li], int(e)) in rs]
        up = [(layers[li], int(e)) for li, e in zip(*np.nonzero(moved & (shift > 0))) if (layers[li], int(e)) in rs]
        mass_before = [float(sum(fh[:, layer, e].mean() for (l2, e) in refusal if l2 == layer)) for layer in layers]
        mass_after = [float(sum(fa[:, layer, e].mean() for (l2, e) in refusal if l2 == layer)) for layer in layers]
        data["curves"]["refusal-expert-mass"] = {"title": "Harmful prompts' tokens routed to refusal-associated experts", "x": layers,
                                                 "xlabel": "layer", "series": {"before": mass_before, "after": mass_after}}
        if down and up:
            findings.append(Finding(
                "routing-compensation", WARN,
                f"after ablation harmful prompts left {len(down)} refusal-associated expert(s) and moved to {len(up)} other(s)",
                value=float(len(up)), threshold=alpha, layers=sorted({x[0] for x in down + up}),
                experts=[list(x) for x in up],
                evidence={"decreased": [{"layer": l, "expert": e, "shift": float(shift[layers.index(l), e]), "q": float(q_shift[layers.index(l), e])} for l, e in down],
                          "increased": [{"layer": l, "expert": e, "shift": float(shift[layers.index(l), e]), "q": float(q_shift[layers.index(l), e])} for l, e in up],
                          "refusal_mass_before": sum(mass_before), "refusal_mass_after": sum(mass_after)}))
        rl = _router_layers(router_modified, layers)
        if rl:
            idx = [layers.index(i) for i in rl]
            changed = int(moved[idx].sum())
            same = _equivalent(a, c, paired, alpha).reshape(len(layers), E)
            if changed == 0 and not same[idx].all():  # no significant change, but too few prompts to show there was none
                findings.append(Finding(
                    "router-change-inconclusive", INFO,
                    f"router modified in {len(rl)} layer(s); no expert's selection frequency on harmful prompts changed significantly, "
                    f"but {len(fh)} prompts cannot show it unchanged (equivalence within +-{EQUIV_MARGIN:.0%} not shown for "
                    f"{int((~same[idx]).sum())} layer x expert cell(s)): not evidence that the router edit did nothing",
                    value=float((~same[idx]).sum()), threshold=EQUIV_MARGIN, layers=rl))
            elif changed == 0:
                findings.append(Finding(
                    "router-ineffective", WARN,
                    f"router modified in {len(rl)} layer(s) but routing on harmful prompts is unchanged: every expert's selection frequency "
                    f"is within +-{EQUIV_MARGIN:.0%} of before (equivalence test, {len(fh)} prompts); max JS divergence "
                    f"{max(js_ba[j] for j in idx):.4f} bits",
                    value=float(max(js_ba[j] for j in idx)), threshold=EQUIV_MARGIN, layers=rl,
                    experts=[[l, e] for (l, e) in refusal if l in rl],
                    evidence={"js_before_after": {str(layers[j]): js_ba[j] for j in idx},
                              "refusal_experts_still_selected": [{"layer": l, "expert": e, "freq_before": float(fh[:, l, e].mean()),
                                                                  "freq_after": float(fa[:, l, e].mean())} for (l, e) in refusal if l in rl]}))

    worst = max((f.severity for f in findings), key=lambda s: {INFO: 0, PASS: 0, WARN: 1, FAIL: 2}[s], default=PASS)
    status = {INFO: PASS, PASS: PASS}.get(worst, worst)
    summary = (f"{len(refusal)} refusal-associated expert cell(s) in {len(layers)} MoE layer(s)"
               + ("" if harmful_after is None else f"; {sum(1 for f in findings if f.code == 'routing-compensation')} compensation, "
                  f"{sum(1 for f in findings if f.code == 'router-ineffective')} ineffective-router finding(s)"))
    return CheckResult("routing", status, summary, findings, data, seconds=time.perf_counter() - t0)
