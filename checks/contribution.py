"""Contribution check: which components write r into the residual stream, before and after ablation.

From probe summaries (per prompt: attention, dense MLP, shared expert and each routed expert's
output along r, and the residual stream's projection on r per layer) it finds the main writers of
r on harmful prompts (``main-writers``), the components that still write r after the ablation
(``still-writes-r``) and the layers where r survives in the residual stream (``r-survives``).

Amounts are means over prompts of the per-prompt value at the last prompt token (where refusal is
read out) or averaged over the prompt's tokens, whichever is larger in magnitude. Tolerances are
relative: a component still writes r when its amount after ablation exceeds ``rel_tol`` times the
reference scale, the largest mean residual projection on r over layers on harmful prompts before
ablation; r survives at a layer when the residual projection after exceeds ``rel_tol`` times its
value before.
"""

from __future__ import annotations

import time

import numpy as np

from checks.conditions import Condition, Measured, value_at
from checks.findings import FAIL, INFO, PASS, SKIP, WARN, CheckResult, Finding

_KINDS = ("attn", "mlp", "shared", "experts")


def _residual_left(result: dict) -> Measured:
    v = value_at(result, "data", "residual_left_max")
    return Measured(None, "the residual stream was not probed in this run") if v is None else Measured(v)


CONDITIONS = (
    # opt-in (default off): mechanistic, not behavioural
    Condition("max_residual_projection", "contribution", "<=", None, "largest share of the residual projection on r left after ablation",
              _residual_left),
)
_LABEL = {"attn": "attention", "mlp": "dense MLP", "shared": "shared_experts", "experts": "experts"}


def _get(x, name, default=None):
    if x is None:
        return default
    if isinstance(x, dict):
        return x.get(name, default)
    return getattr(x, name, default)


def _arr(x, name) -> np.ndarray:
    return np.asarray(_get(x, name), dtype=np.float64)


def _amount(x, name: str) -> np.ndarray:
    """Mean over prompts at the last token and over tokens; the one of larger magnitude (shape without n)."""
    last, mean = _arr(x, name + "_last").mean(0), _arr(x, name + "_mean").mean(0)
    return np.where(np.abs(last) >= np.abs(mean), last, mean)


def writes(x) -> dict[str, np.ndarray]:
    """Per kind, the amount each component writes along r: attn/mlp/shared [L], experts [L, E].

    ``mlp`` is kept for dense layers only (on MoE layers it is the experts + shared total).
    """
    moe = {int(i) for i in (_get(x, "moe_layers") or [])}
    out = {"attn": _amount(x, "attn"), "shared": _amount(x, "shared"), "experts": _amount(x, "expert")}
    mlp = _amount(x, "mlp")
    mlp[list(moe)] = 0.0
    out["mlp"] = mlp
    return out


def group_writes(harmful, harmless) -> tuple[dict[str, list[float]], list[float]]:
    """Per writer target group and layer, the mean write along r at the last prompt token, harmful minus harmless (the
    refusal-specific part); and the residual stream's projection on r per hidden-states index, harmful minus harmless.
    NaN stays NaN: a broken activation is never read as "writes nothing"."""
    def d(name):
        return (_arr(harmful, name).mean(0) - _arr(harmless, name).mean(0)).astype(float)

    L = _arr(harmful, "attn_last").shape[1]
    moe = {int(i) for i in (_get(harmful, "moe_layers") or [])}
    mlp = d("mlp_last")
    out = {"attn_out": d("attn_last").tolist(), "mlp_down": [float(mlp[l]) if l not in moe else 0.0 for l in range(L)],
           "shared_down": d("shared_last").tolist()}
    if _arr(harmful, "expert_last").ndim == 3 and _arr(harmful, "expert_last").shape[2]:
        out["experts_down"] = d("expert_last").sum(-1).tolist()
    resid = d("resid_last").tolist()
    out["embed"] = [resid[0]] + [0.0] * (L - 1)
    return out, resid


def _components(w: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for kind in ("attn", "mlp", "shared"):
        for layer, v in enumerate(w[kind]):
            if v != 0.0:
                rows.append({"component": _LABEL[kind], "layer": layer, "expert": None, "amount": float(v)})
    for layer, e in zip(*np.nonzero(w["experts"])):
        rows.append({"component": "experts", "layer": int(layer), "expert": int(e), "amount": float(w["experts"][layer, e])})
    return rows


def reference_scale(harmful_before) -> float:
    """The largest |mean residual projection on r| over layers on harmful prompts before ablation."""
    return float(np.abs(_arr(harmful_before, "resid_last").mean(0)).max())


def _matrix(title, values, unit, note):
    v = np.asarray(values, dtype=np.float64)
    lim = float(np.abs(v).max()) if v.size else 0.0
    return {"title": title, "rows": [f"layer {i}" for i in range(v.shape[0])], "cols": [f"e{j}" for j in range(v.shape[1])],
            "values": v.tolist(), "vmin": -lim, "vmax": lim, "unit": unit, "note": note}


def contribution_check(before, after=None, *, harmless_before=None, harmless_after=None, rel_tol: float = 0.05,
                       top: int = 10) -> CheckResult:
    """Judge who writes r: ``before``/``after`` are harmful-prompt probe summaries of the base and ablated model."""
    t0 = time.perf_counter()
    L = _arr(before, "attn_mean").shape[1]
    scale = reference_scale(before)
    tol = rel_tol * scale
    wb = writes(before)
    findings: list[Finding] = []
    data: dict = {"matrices": {}, "curves": {}, "tables": {}}
    x_res = list(range(L + 1))
    series = {"harmful before": _arr(before, "resid_last").mean(0).tolist()}
    if harmless_before is not None:
        series["harmless before"] = _arr(harmless_before, "resid_last").mean(0).tolist()
    if after is not None:
        series["harmful after"] = _arr(after, "resid_last").mean(0).tolist()
    if harmless_after is not None:
        series["harmless after"] = _arr(harmless_after, "resid_last").mean(0).tolist()
    data["curves"]["resid-r"] = {"title": "Residual stream . r at the last prompt token (mean over prompts)", "x": x_res,
                                 "xlabel": "hidden_states index (input of layer i)", "series": series}

    def per_layer(w):
        return {"attention": w["attn"].tolist(), "dense MLP": w["mlp"].tolist(), "shared expert": w["shared"].tolist(),
                "routed experts (sum)": w["experts"].sum(-1).tolist() if w["experts"].ndim == 2 else [0.0] * L}

    wr = {f"{k} before": v for k, v in per_layer(wb).items()}
    if wb["experts"].ndim == 2 and wb["experts"].shape[1] > 0:
        data["matrices"]["expert-writes-before"] = _matrix("Routed expert output along r, harmful prompts, before ablation", wb["experts"],
                                                           "residual units", "weight x u_e . act(h); mean over prompts")

    # Main writers: harmful minus harmless when both are there (the refusal-specific part), else harmful.
    base = wb
    if harmless_before is not None:
        hb = writes(harmless_before)
        base = {k: wb[k] - hb[k] for k in _KINDS}
    ranked = sorted(_components(base), key=lambda r: -abs(r["amount"]))
    by_kind = {_LABEL[k]: float(np.abs(base[k]).sum()) for k in _KINDS}
    cols = ["component", "layer", "expert", "amount"]
    data["tables"]["writers-before"] = {"title": "Main writers of r before ablation (harmful minus harmless where both were probed)",
                                        "columns": cols, "rows": [[r[c] for c in cols] for r in ranked[:top]]}
    if ranked:
        main = max(by_kind, key=by_kind.get)
        findings.append(Finding(
            "main-writers", INFO,
            f"main writer of r before ablation: {main} ({by_kind[main] / max(sum(by_kind.values()), 1e-30):.0%} of the total); "
            f"top component {ranked[0]['component']} layer {ranked[0]['layer']}" + ("" if ranked[0]["expert"] is None else f" expert {ranked[0]['expert']}"),
            value=by_kind[main], layers=sorted({r["layer"] for r in ranked[:top]}),
            experts=[[r["layer"], r["expert"]] for r in ranked[:top] if r["expert"] is not None],
            evidence={"by_kind": by_kind, "top": ranked[:top], "harmful_minus_harmless": harmless_before is not None}))

    if after is not None:
        wa = writes(after)
        wr.update({f"{k} after": v for k, v in per_layer(wa).items()})
        if wa["experts"].ndim == 2 and wa["experts"].shape[1] > 0:
            data["matrices"]["expert-writes-after"] = _matrix("Routed expert output along r, harmful prompts, after ablation", wa["experts"],
                                                              "residual units", f"tolerance {tol:.3g} ({rel_tol:g} x reference scale {scale:.3g})")
        left = [r for r in _components(wa) if abs(r["amount"]) > tol]
        left.sort(key=lambda r: -abs(r["amount"]))
        for r in left:
            b = wb["experts"][r["layer"], r["expert"]] if r["expert"] is not None else wb[{v: k for k, v in _LABEL.items()}[r["component"]]][r["layer"]]
            r["before"] = float(b)
        by_comp: dict[str, list[dict]] = {}
        for r in left:
            by_comp.setdefault(r["component"], []).append(r)
        for comp, rows in by_comp.items():
            findings.append(Finding(
                "still-writes-r", WARN,  # mechanistic evidence: the behavioural checks decide whether it matters
                f"{comp} still write(s) r after ablation in {len(rows)} place(s) (largest {max(abs(r['amount']) for r in rows):.3g}, "
                f"tolerance {tol:.3g})",
                value=float(max(abs(r["amount"]) for r in rows)), threshold=tol, layers=sorted({r["layer"] for r in rows}),
                experts=[[r["layer"], r["expert"]] for r in rows if r["expert"] is not None],
                evidence={"component": comp, "places": rows[:50], "count": len(rows), "rel_tol": rel_tol, "reference_scale": scale}))
        rb = _arr(before, "resid_last").mean(0)
        ra = _arr(after, "resid_last").mean(0)
        ratio = np.abs(ra) / np.maximum(np.abs(rb), 1e-30)
        # index L is the final norm's output: its elementwise weight mixes other directions into r, which no
        # ablation of writers removes, so r-survives judges the residual stream proper (indices 0..L-1).
        surv = [i for i in range(L) if abs(ra[i]) > rel_tol * abs(rb[i]) and abs(ra[i]) > tol]
        data["curves"]["resid-r-ratio"] = {"title": "|residual . r| after / before (harmful, last token)", "x": x_res, "xlabel": "hidden_states index",
                                           "series": {"after / before": ratio.tolist()}}
        if surv:
            findings.append(Finding(
                "r-survives", WARN,  # mechanistic evidence (the gate's opt-in max_residual_projection bounds it)
                f"r survives in the residual stream after ablation at {len(surv)} hidden-state index(es) "
                f"(up to {max(ratio[i] for i in surv):.0%} of its value before)",
                value=float(max(ratio[i] for i in surv)), threshold=rel_tol, layers=surv,
                evidence={"before": {str(i): float(rb[i]) for i in surv}, "after": {str(i): float(ra[i]) for i in surv}, "reference_scale": scale}))
    data["curves"]["writes-r"] = {"title": "Output along r per layer on harmful prompts", "x": list(range(L)), "xlabel": "layer", "series": wr}
    data["reference_scale"] = scale
    data["tolerance"] = tol
    if harmless_before is not None:  # the refusal-specific writes per target group, what the diagnosis reads
        gw_before, res_before = group_writes(before, harmless_before)
        data["group_writes"] = {"before": gw_before, "residual_before": res_before}
        if after is not None and harmless_after is not None:
            gw_after, res_after = group_writes(after, harmless_after)
            data["group_writes"].update(after=gw_after, residual_after=res_after)
            peak = max((abs(x) for x in res_before if x == x), default=0.0) or 1.0
            # the largest share of the residual projection left (signed: a flipped r counts by its size); NaN stays NaN
            data["residual_left_max"] = float("nan") if any(x != x for x in res_after) else max(abs(a) / peak for a in res_after)
    broken = [name for name, x in (("harmful before", before), ("harmful after", after), ("harmless before", harmless_before),
                                   ("harmless after", harmless_after))
              if x is not None and not all(np.isfinite(_arr(x, k)).all() for k in ("resid_last", "attn_last", "mlp_last", "shared_last"))]
    if broken:
        findings.append(Finding("nan-inf", FAIL, f"NaN or infinite activations in the probes ({', '.join(broken)}): the writes along r are not "
                                "measured there; the model's forward pass breaks", value=float(len(broken)), evidence={"probes": broken}))

    worst = max((f.severity for f in findings), key=lambda s: {INFO: 0, PASS: 0, SKIP: 0, WARN: 1, FAIL: 2}[s], default=PASS)
    status = {INFO: PASS, PASS: PASS}.get(worst, worst)
    n_left = sum(f.evidence.get("count", 0) for f in findings if f.code == "still-writes-r")
    summary = (f"reference scale {scale:.3g}; " + ("no ablated model given" if after is None else
               f"{n_left} component(s) still write r above {tol:.3g}; r survives at "
               f"{len(next((f.layers for f in findings if f.code == 'r-survives'), []))} index(es)"))
    return CheckResult("contribution", status, summary, findings, data, seconds=time.perf_counter() - t0)
