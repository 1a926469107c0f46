"""report.html: one self-contained page (inline CSS and SVG, no network) from a results dict.

``render_html`` first turns results into a view model (plain dicts, every chart already drawn by
charts.py), then fills ``templates/report.html.j2`` with jinja2 autoescaping on. The only markup
not escaped by jinja2 is the SVG from charts.py, which escapes every label itself; text from
results (completions, prompts, messages) always goes through autoescape, so HTML in a completion
shows as text. Any missing or malformed section is left out (and listed at the end of the page),
never a crash: a report that half-renders is worth more than a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from checks.findings import ranges

from reports import charts

TEMPLATES = Path(__file__).parent / "templates"
CHECK_ORDER = ["weights", "projection", "recovery", "contribution", "routing", "signal", "refusal", "damage", "capability", "health",
               "multiturn", "controls", "noop"]
CHECK_TITLES = {
    "weights": "Weights: what was modified",
    "projection": "Projection: how much of r each component still writes or reads",
    "recovery": "Recovery: residual stream along r, before vs after",
    "contribution": "Contribution: each expert's output along r",
    "routing": "Routing: which experts harmful prompts reach",
    "signal": "Signal: per-layer refusal-direction quality",
    "refusal": "Refusal: rates before and after",
    "damage": "Damage: KL divergence and degeneration",
    "capability": "Capability: multiple-choice accuracy before and after, with the drop's interval",
    "health": "Generation health: loops, cut-off loops, language switches, off-topic answers",
    "multiturn": "Multi-turn: refusal in a second user turn",
    "controls": "Controls: a random direction in place of r (specificity)",
    "noop": "No-op control: the base against itself",
}
RATE_LABELS = {"before": "refusal, harmful, before", "after": "refusal, harmful, after",
               "over_refusal_before": "over-refusal, harmless, before", "harmless_before": "over-refusal, harmless, before",
               "over_refusal_after": "over-refusal, harmless, after", "harmless_after": "over-refusal, harmless, after"}
KNOWN_DATA = {"matrices", "curves", "tables", "grid", "rates", "samples", "paired", "mcnemar_p", "truncation", "second_judge", "by_category", *RATE_LABELS,
              "tasks", "examples", "random_direction", "turn2"}  # shown as their tables: the refusal check's last three, the damage-beyond-KL checks' records
GRID_CLASSES = {  # (intended, actual) -> (css class, symbol, meaning)
    "ok": ("g-ok", "\u2713", "intended and changed"),
    "missed": ("g-missed", "\u2717", "intended but unchanged"),
    "partial": ("g-partial", "\u25d0", "partially changed"),
    "unintended": ("g-unint", "!", "changed but not intended"),
    "none": ("g-none", "", "not intended, unchanged"),
    "absent": ("g-absent", "\u2013", "no such tensor in this layer"),
}
# The page's one script (copy buttons, the sample filter). It is allowed by its hash in the
# Content-Security-Policy, so no other script can run, even one that slipped past escaping; the page
# works without it (every sample is shown).
COPY_SCRIPT = """
/* Copy buttons and the sample filter only; the page works without this script. */
document.querySelectorAll("button.copy").forEach(function (b) {
  b.addEventListener("click", function () {
    var el = document.getElementById(b.getAttribute("data-copy"));
    if (!el) return;
    var done = function () { b.textContent = "copied"; setTimeout(function () { b.textContent = "copy"; }, 1500); };
    try {
      if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(el.textContent).then(done, function () {}); return; }
      var r = document.createRange(); r.selectNodeContents(el); var s = window.getSelection(); s.removeAllRanges(); s.addRange(r);
      if (document.execCommand("copy")) done();
    } catch (e) { /* selection stays, user can copy by hand */ }
  });
});
document.querySelectorAll("div.sample-filter").forEach(function (bar) {
  var box = bar.querySelector("input"), pick = bar.querySelector("select"), count = bar.querySelector(".shown");
  var items = bar.parentNode.querySelectorAll("details.sample");
  var apply = function () {
    var q = box.value.toLowerCase(), want = pick.value, n = 0;
    items.forEach(function (d) {
      var ok = (!want || d.getAttribute("data-label") === want || d.getAttribute("data-group") === want) &&
               (!q || d.textContent.toLowerCase().indexOf(q) >= 0);
      d.style.display = ok ? "" : "none"; if (ok) n += 1;
    });
    count.textContent = n + " of " + items.length + " shown";
  };
  box.addEventListener("input", apply); pick.addEventListener("change", apply);
});
"""
SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(COPY_SCRIPT.encode("utf-8")).digest()).decode("ascii")
MAX_TABLE_ROWS = 500


def _list(x: Any) -> list:
    """x if it is a list (or tuple), else an empty list: results from other tools may hold anything."""
    return list(x) if isinstance(x, (list, tuple)) else []


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _anchor(name: Any) -> str:
    return "check-" + (re.sub(r"[^a-z0-9_-]+", "-", str(name).lower()).strip("-") or "x")


def _ranges(xs: Any) -> str:
    """[1,2,3,7] -> '1-3, 7' (anything that is not a list shown as it is)."""
    return ranges(xs) if isinstance(xs, (list, tuple)) else str(xs)


def _experts(pairs: Any, limit: int = 40) -> str:
    """[[layer, expert], ...] -> 'L3:E7, L3:E12, ... (+n more)'."""
    if not isinstance(pairs, (list, tuple)):
        return ""
    items = [f"L{p[0]}:E{p[1]}" if isinstance(p, (list, tuple)) and len(p) >= 2 else str(p) for p in pairs]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" (+{more} more)" if more > 0 else "")


def _pct(x: Any) -> str:
    v = charts._num(x)
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _val(x: Any) -> str:
    """A table cell: numbers shortened, lists and dicts compact, None as a dash."""
    if x is None:
        return "\u2014"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return charts.fmt(x)
    if isinstance(x, (list, dict)):
        s = json.dumps(x, ensure_ascii=False, default=str)
        return s if len(s) <= 200 else s[:197] + "..."
    return str(x)


class _Notes:
    """Collects what could not be drawn, so the page can say so instead of crashing."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def guard(self, where: str, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a report must render whatever the data holds
            self.items.append(f"{where}: {type(e).__name__}: {e}")
            return default


# ---------------------------------------------------------------- view model parts


def _before_after(d: dict) -> list:
    """Dict items with 'before' names first and 'after' names next (results.json sorts keys alphabetically)."""
    rank = lambda k: 0 if "before" in str(k).lower() else 1 if "after" in str(k).lower() else 2
    return sorted(d.items(), key=lambda kv: rank(kv[0]))


def _rates_source(data: dict) -> dict:
    """Where a check keeps its rates: ``data["rates"]`` or, as checks/refusal_eval.py writes them, ``data`` itself."""
    return data["rates"] if isinstance(data.get("rates"), dict) else data


def _rate_items(rates: dict, keys: list[str] | None = None) -> list[dict]:
    """[{label, rate, lo, hi, k, n}] for each known rate key holding {rate, lo, hi, k, n}."""
    items = []
    for key in keys or list(RATE_LABELS):
        r = rates.get(key)
        if isinstance(r, dict) and charts._num(r.get("rate")) is not None:
            items.append({"label": RATE_LABELS.get(key, key), "rate": r.get("rate"), "lo": r.get("lo"), "hi": r.get("hi"),
                          "k": r.get("k"), "n": r.get("n")})
    return items


def _mcnemar_p(rates: dict) -> Any:
    return rates["mcnemar_p"] if rates.get("mcnemar_p") is not None else _dict(rates.get("paired")).get("p")


def _outcome(d: dict) -> dict:
    """A simulated or applied result with every key the template reads (missing ones as None)."""
    iv = d.get("interval") if isinstance(d.get("interval"), (list, tuple)) and len(d.get("interval")) == 2 else None
    return {"refusal_rate": d.get("refusal_rate"), "interval": iv, "n": d.get("n"), "kl": d.get("kl"),
            "method": str(d["method"]) if d.get("method") else None,
            "verdict": str(d["verdict"]) if d.get("verdict") is not None else None}


def _cause_view(c: dict, rank: int, current: dict | None, notes: _Notes) -> dict:
    fix = c.get("fix") if isinstance(c.get("fix"), dict) else {}
    links = []
    for link in _list(c.get("links")):
        s = str(link)
        links.append({"href": s if re.fullmatch(r"#[A-Za-z0-9_.:-]+", s) else None, "text": s.lstrip("#")})
    conf = charts._num(c.get("confidence"))
    bars = []
    if current and charts._num(current.get("rate")) is not None:
        bars.append({"label": "now (after ablation)", **{k: current.get(k) for k in ("rate", "lo", "hi", "k", "n")}})
    sim = _outcome(c["simulated"]) if isinstance(c.get("simulated"), dict) else None
    app = _outcome(c["applied"]) if isinstance(c.get("applied"), dict) else None
    for label, out in (("simulated with fix", sim), ("measured after fix", app)):
        if out and charts._num(out["refusal_rate"]) is not None:
            lo, hi = out["interval"] or (None, None)
            bars.append({"label": label, "rate": out["refusal_rate"], "lo": lo, "hi": hi, "n": out["n"], "k": None})
    chart = None
    if len(bars) > (1 if current else 0):
        chart = notes.guard(f"cause {c.get('id')} chart", lambda: Markup(charts.interval_bars_svg(bars, title="Refusal rate (harmful prompts)")))
    report = str(c["applied"]["report"]) if app and c["applied"].get("report") else None
    return {
        "rank": rank, "id": str(c.get("id") or "cause"), "title": str(c.get("title") or c.get("id") or "cause"),
        "anchor": "cause-" + re.sub(r"[^a-z0-9_-]+", "-", str(c.get("id") or rank).lower()),
        "confidence": conf, "confidence_pct": None if conf is None else max(0, min(100, round(100 * conf))),
        "label": str(c.get("confidence_label") or ("high" if (conf or 0) >= 0.67 else "medium" if (conf or 0) >= 0.34 else "low")),
        "summary": c.get("summary"), "evidence": [_evidence(e) for e in _list(c.get("evidence"))],
        "numbers": [(str(k), _val(v)) for k, v in _dict(c.get("numbers")).items()] if isinstance(c.get("numbers"), dict) else [],
        "layers": _ranges(_list(c.get("layers"))), "experts": _experts(_list(c.get("experts"))),
        "links": links, "fix_summary": fix.get("summary"), "fix_yaml": fix.get("config_yaml"),
        "simulated": sim, "applied": app, "chart": chart,
        "applied_report": report,
        "applied_report_href": report if report and re.fullmatch(r"[A-Za-z0-9_./-]+\.html?(#[A-Za-z0-9_-]*)?", report) and ".." not in report else None,
        "demoted": bool(c.get("demoted")), "demoted_reason": c.get("demoted_reason"),
        "search": [_search_row(r) for r in _list(c.get("search")) if isinstance(r, dict)],
        "why": _why(c),
    }


def _evidence(e) -> str:
    """One item of a cause's evidence: what was measured, and by which check (checks/diagnosis/cause.py ``cite``)."""
    if isinstance(e, dict):
        return f"{e.get('text', '')} [{e.get('source', '?')}]"
    return str(e)


def _diagnosis_view(d: dict, reached: str | None) -> dict | None:
    """The diagnosis's conclusion when it is "unexplained" (what was measured, tried and is next), and what reached the weights."""
    unexplained = d.get("status") == "unexplained" or bool(d.get("refusal_unexplained"))
    if not unexplained and not reached:
        return None
    tried = [{"what": str(r.get("what") or ""), "rate": charts._num(r.get("refusal_rate")), "kl": charts._num(r.get("kl")),
              "method": r.get("method"), "note": r.get("note")} for r in _list(d.get("tried")) if isinstance(r, dict)]
    return {"unexplained": unexplained, "heading": "No cause proven" if d.get("status") == "unexplained" else "Why refusal stays: not explained",
            "statement": d.get("statement"),
            "measured": [str(x) for x in _list(d.get("measured"))], "tried": tried, "next": [str(x) for x in _list(d.get("next"))],
            "reached": reached}


def _fix_search_view(fs: dict, notes) -> dict | None:
    """The fix search's trials (config, refusal with its interval, KL, edits) as a table and a chart, and how it ended."""
    trials = [t for t in _list(fs.get("trials")) if isinstance(t, dict)]
    if not trials:
        return None
    best = _dict(fs.get("best"))
    rows = [{"n": t.get("n"), "phase": t.get("phase"), "label": str(t.get("label") or ""), "refusal": charts._num(t.get("refusal")),
             "interval": t.get("interval") if isinstance(t.get("interval"), list) else None, "over": charts._num(t.get("over_refusal")),
             "kl": charts._num(t.get("kl")), "edited": t.get("edited_tensors"), "method": t.get("method"), "passes": bool(t.get("passes")),
             "why_not": t.get("why_not"), "best": t.get("n") == best.get("n")} for t in trials]
    bars = [{"label": f"#{r['n']} {r['label'][:22]}", "rate": r["refusal"], "lo": (r["interval"] or [None, None])[0],
             "hi": (r["interval"] or [None, None])[1]} for r in rows if r["refusal"] is not None][:40]
    chart = notes.guard("fix search chart", lambda: Markup(charts.interval_bars_svg(bars, title="Refusal per trial (harmful prompts)",
                                                                                      limit=None))) if bars else None
    return {"rows": rows, "chart": chart, "ended": fs.get("ended"), "limited_by": fs.get("limited_by"), "first_pass": fs.get("first_pass"),
            "n": fs.get("n_trials"), "budget": fs.get("budget"), "seconds": charts._num(fs.get("seconds")), "best_yaml": best.get("config_yaml")}


def _gate_state(t: dict) -> str:
    """A gate row's state for people: pass, fail, not applicable, not measured, skipped (optional), waived, non-finite."""
    state = str(t.get("state") or ("pass" if t.get("passed") else "fail" if t.get("passed") is False else "not measured"))
    return state.replace("-", " ")


def _proof_view(sim: dict) -> dict | None:
    """The simulation's own record: the bypass test per index, whether the reached edits reproduce the model, what it cost."""
    byp = _dict(sim.get("bypass"))
    rows = []
    for idx, v in sorted(_dict(byp.get("indices")).items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        v = _dict(v)
        rows.append({"index": str(idx), "rate": charts._num(v.get("rate")), "estimate": charts._num(v.get("first_token_estimate")),
                     "kl": charts._num(v.get("kl")), "quality": charts._num(v.get("quality")), "best": str(idx) == str(byp.get("best_index"))})
    rep = _dict(sim.get("reproduction"))
    cal = _dict(sim.get("calibration"))
    if not rows and not rep and not sim.get("note"):
        return None
    return {"bypass": rows, "reproduction": rep or None, "calibration_accuracy": charts._num(cal.get("accuracy")),
            "note": sim.get("note"), "seconds": charts._num(sim.get("seconds")), "estimates": sim.get("estimates"),
            "generations": sim.get("generations"), "reached": _dict(sim.get("reached")) or None}


def _search_row(r: dict) -> dict:
    """One candidate fix the simulator tried, for the cause card's table."""
    gen = r.get("generation") if isinstance(r.get("generation"), dict) else {}
    return {"label": str(r.get("label") or ""), "estimate": charts._num(r.get("estimate")), "generated": charts._num(gen.get("rate")),
            "n": gen.get("n"), "kl": charts._num(r.get("kl")), "reaches": r.get("reaches_target"),
            "note": str(r.get("error") or r.get("note") or "")}


def _why(c: dict) -> str | None:
    """Why the cause sits where it does, in one sentence."""
    sim = c.get("simulated") if isinstance(c.get("simulated"), dict) else {}
    if c.get("demoted"):
        return str(c.get("demoted_reason") or "demoted")
    if sim.get("reaches_target"):
        return f"its smallest fix that removes refusal is: {sim.get('candidate')}"
    if sim:
        return f"its best candidate ({sim.get('candidate')}) lowers refusal but does not reach the target"
    if c.get("explains_refusal") is False:
        return "a soundness problem: it does not explain the refusal, and is listed for what it is"
    return "not simulated: ranked by its evidence alone"


def _grid_view(g: dict) -> dict:
    if not isinstance(g, dict):
        raise charts.ChartDataError(f"the grid must be an object with rows, cols and cells, got {type(g).__name__}")
    rows, cols, cells = _list(g.get("rows")), _list(g.get("cols")), _list(g.get("cells"))
    counts = {k: 0 for k in GRID_CLASSES}
    out_rows = []
    for i, row in enumerate(cells):
        out = []
        for j, cell in enumerate(row if isinstance(row, list) else []):
            cell = cell if isinstance(cell, dict) else {}
            actual, intended = str(cell.get("actual") or "absent"), bool(cell.get("intended"))
            if actual == "absent":
                kind = "absent"
            elif intended:
                kind = {"changed": "ok", "unchanged": "missed"}.get(actual, "partial")
            else:
                kind = "none" if actual == "unchanged" else "unintended"
            counts[kind] += 1
            css, sym, _ = GRID_CLASSES[kind]
            col = cols[j] if j < len(cols) else j
            out.append({"css": css, "sym": sym,
                        "tip": f"layer {rows[i] if i < len(rows) else i}, {col}: {'intended' if intended else 'not intended'}, {actual}"})
        out_rows.append({"label": rows[i] if i < len(rows) else i, "cells": out})
    legend = [{"css": v[0], "sym": v[1], "meaning": v[2], "count": counts[k]} for k, v in GRID_CLASSES.items()]
    return {"title": g.get("title") or "Modified weights: layer x target group", "cols": cols, "rows": out_rows,
            "legend": legend, "counts": counts}


def _table_view(t: dict) -> dict:
    if not isinstance(t, dict):
        raise charts.ChartDataError(f"a table must be an object with columns and rows, got {type(t).__name__}")
    cols = [str(c) for c in _list(t.get("columns"))]
    rows = _list(t.get("rows"))
    if rows and isinstance(rows[0], dict) and not cols:
        cols = list(rows[0])
    body = []
    for r in rows[:MAX_TABLE_ROWS]:
        if isinstance(r, dict):
            body.append([_val(r.get(c)) for c in cols])
        elif isinstance(r, (list, tuple)):
            body.append([_val(v) for v in r])
        else:
            body.append([_val(r)])
    return {"title": t.get("title"), "columns": cols, "rows": body, "more": max(0, len(rows) - MAX_TABLE_ROWS)}


def _check_view(key: str, chk: dict, notes: _Notes) -> dict:
    name = str(chk.get("name") or key)
    data = chk.get("data") if isinstance(chk.get("data"), dict) else {}
    findings = []
    for f in _list(chk.get("findings")):
        if not isinstance(f, dict):
            continue
        ev = f.get("evidence")
        findings.append({"severity": str(f.get("severity") or "info"), "code": f.get("code"), "message": f.get("message"),
                         "value": _val(f.get("value")) if f.get("value") is not None else "",
                         "threshold": _val(f.get("threshold")) if f.get("threshold") is not None else "",
                         "layers": _ranges(_list(f.get("layers"))), "experts": _experts(_list(f.get("experts")), 12),
                         "evidence": json.dumps(ev, indent=1, ensure_ascii=False, default=str) if ev else None})
    sev = {"fail": 0, "warn": 1}
    findings.sort(key=lambda f: sev.get(f["severity"], 2))

    figures = []
    for mname, m in _before_after(data.get("matrices") or {}) if isinstance(data.get("matrices"), dict) else []:
        svg = notes.guard(f"{name}: heatmap {mname}", lambda m=m: Markup(charts.heatmap_svg(m)))
        if svg is not None:
            figures.append({"kind": "heatmap", "svg": svg, "note": m.get("note") if isinstance(m, dict) else None})
    for cname, c in _before_after(data.get("curves") or {}) if isinstance(data.get("curves"), dict) else []:
        svg = notes.guard(f"{name}: curve {cname}", lambda c=c: Markup(charts.line_chart_svg(
            {**c, "series": dict(_before_after(c["series"]))} if isinstance(c, dict) and isinstance(c.get("series"), dict) else c)))
        if svg is not None:
            figures.append({"kind": "line", "svg": svg, "note": c.get("note") if isinstance(c, dict) else None})

    tables = [notes.guard(f"{name}: table {tn}", lambda t=t: _table_view(t)) for tn, t in
              ((data.get("tables") or {}).items() if isinstance(data.get("tables"), dict) else [])]
    grid = notes.guard(f"{name}: grid", lambda: _grid_view(data["grid"])) if isinstance(data.get("grid"), dict) else None

    rates = None
    src = _rates_source(data)
    items = _rate_items(src)
    if items:
        svg = notes.guard(f"{name}: rates", lambda: Markup(charts.interval_bars_svg(items, title="Refusal rates with 95% intervals")))
        rates = {"svg": svg, "items": items, "mcnemar_p": _mcnemar_p(src)}
    other = [(str(k), _val(v)) for k, v in data.items() if k not in KNOWN_DATA]

    samples = None
    if isinstance(data.get("samples"), list):
        groups: dict[str, list] = {}
        for s in data["samples"]:  # every sample: the report is the record (filterable on the page)
            if isinstance(s, dict):
                group = str(s.get("when") or "other") + (f", {s['set']}" if s.get("set") else "")
                groups.setdefault(group, []).append(
                    {"prompt": str(s.get("prompt") or ""), "completion": str(s.get("completion") or ""),
                     "reasoning": str(s.get("reasoning") or ""), "label": str(s.get("label") or ""), "reason": s.get("reason"),
                     "group": group})
        order = sorted(groups, key=lambda w: ({"before": 0, "after": 1}.get(w.split(",")[0], 2), w))
        labels = sorted({x["label"] for g in groups.values() for x in g if x["label"]})
        samples = {"groups": [(w, groups[w]) for w in order], "labels": labels, "total": sum(len(g) for g in groups.values())}

    return {"key": key, "name": name, "anchor": _anchor(name), "title": CHECK_TITLES.get(name, name.replace("_", " ").capitalize()),
            "status": str(chk.get("status") or "skip"), "summary": chk.get("summary"),
            "seconds": charts._num(chk.get("seconds")), "findings": findings, "figures": figures,
            "tables": [t for t in tables if t], "grid": grid, "rates": rates, "samples": samples,
            "other": other}


def _judge_line(j: Any) -> str | None:
    """"rules (offline judge ...): accuracy 0.942, recall ... on 1771 held-out human-labelled GPTFuzz completions; RBR-gold: ..."
    from results["run"]["judge"]: the frozen-split numbers per source."""
    if not isinstance(j, dict) or not j.get("judge"):
        return None
    head = f"{j['judge']}" + (f" ({j['description']})" if j.get("description") else "")
    test = j.get("frozen_test") if isinstance(j.get("frozen_test"), dict) else {}
    sources = test.get("sources") if isinstance(test.get("sources"), dict) else {}
    parts = []
    for name, t in sources.items():
        m = t.get("judge") if isinstance(t, dict) and isinstance(t.get("judge"), dict) else {}
        if not all(isinstance(m.get(k), (int, float)) for k in ("accuracy", "recall", "precision")):
            continue
        whole = " (held out whole)" if t.get("held_out_whole") else ""
        parts.append(f"accuracy {m['accuracy']:.3f}, recall {m['recall']:.3f}, precision {m['precision']:.3f} on {t.get('rows')} held-out "
                     f"human-labelled {name} completions{whole}")
    if parts:
        card = f" (data card: {j['data_card']})" if j.get("data_card") else ""
        return f"{head}: " + "; ".join(parts) + card
    return f"{head}: accuracy not measured by this project"


def build_view(results: dict) -> dict:
    """The whole page as plain data (charts already drawn)."""
    notes = _Notes()
    results = results if isinstance(results, dict) else {}
    raw_checks = results.get("checks") if isinstance(results.get("checks"), dict) else {}
    keys = sorted(raw_checks, key=lambda k: (CHECK_ORDER.index(k) if k in CHECK_ORDER else len(CHECK_ORDER), k))
    checks = [v for v in (notes.guard(f"check {k}", lambda k=k: _check_view(k, raw_checks[k] if isinstance(raw_checks[k], dict) else {}, notes))
                          for k in keys) if v]

    refusal = (raw_checks.get("refusal") or {}) if isinstance(raw_checks.get("refusal"), dict) else {}
    rates = _rates_source(_dict(refusal.get("data")))
    current = rates.get("after") if isinstance(rates, dict) and isinstance(rates.get("after"), dict) else None

    raw_causes = [c for c in _list(results.get("causes")) if isinstance(c, dict)]
    raw_causes.sort(key=lambda c: bool(c.get("demoted")))  # the diagnosis's own order (by what the simulated fixes achieve), demoted last
    causes = [v for v in (notes.guard(f"cause {c.get('id')}", lambda c=c, i=i: _cause_view(c, i + 1, current, notes))
                          for i, c in enumerate(raw_causes)) if v]

    # The modified-weights grid gets its own section near the top; take it from whichever check has it.
    grid_check = next((c for c in checks if c["grid"]), None)
    grid = grid_check["grid"] if grid_check else None
    if grid_check:
        grid_check["grid"] = None

    gate = results.get("gate") if isinstance(results.get("gate"), dict) else None
    run = results.get("run") if isinstance(results.get("run"), dict) else {}
    model = results.get("model") if isinstance(results.get("model"), dict) else {}
    tool = results.get("tool") if isinstance(results.get("tool"), dict) else {}
    prompts = run.get("prompts") if isinstance(run.get("prompts"), dict) else {}
    run_rows = [(k, _val(run[k])) for k in ("started", "seconds", "model_dir", "base_dir", "config", "intent_source",
                                           "device", "python", "torch", "transformers") if k in run]
    judge_line = notes.guard("judge", lambda: _judge_line(run.get("judge")), None)
    run_rows += [(k, _val(v)) for k, v in run.items() if k not in dict(run_rows) and k not in ("command", "prompts", "judge")]
    if judge_line:
        run_rows.append(("judge", judge_line))
    prompt_rows = [(k, _val(v.get("source")) if isinstance(v, dict) else _val(v), _val(v.get("n")) if isinstance(v, dict) else "")
                   for k, v in prompts.items()]
    model_rows = [(k, _ranges(v) if k in ("moe_layers", "dense_layers") else _val(v)) for k, v in model.items()]

    verdict = str(results.get("verdict") or "unknown").lower()
    status_counts: dict[str, int] = {}
    for c in checks:
        status_counts[c["status"]] = status_counts.get(c["status"], 0) + 1
    key_rates = _rate_items(rates, ["before", "after"]) if isinstance(rates, dict) else []

    proof = notes.guard("simulation", lambda: _proof_view(_dict(results.get("simulation")))) if isinstance(results.get("simulation"), dict) else None
    reached = results.get("reached_config") if isinstance(results.get("reached_config"), str) else None
    diagnosis = notes.guard("diagnosis", lambda: _diagnosis_view(_dict(results.get("diagnosis")), reached))
    fix_search = notes.guard("fix search", lambda: _fix_search_view(_dict(results.get("fix_search")), notes)) if isinstance(results.get("fix_search"), dict) else None
    toc = []
    if diagnosis and diagnosis["unexplained"]:
        toc.append(("diagnosis", diagnosis["heading"]))
    if causes:
        toc.append(("causes", f"Causes ({len(causes)})"))
    if proof:
        toc.append(("proof", "How the diagnosis was proven"))
    if fix_search:
        toc.append(("fix-search", "Fix search"))
    if results.get("not_blamed"):
        toc.append(("not-blamed", "Not blamed"))
    if grid:
        toc.append(("modified", "What was modified"))
    toc += [(c["anchor"], c["title"].split(":")[0] + f" [{c['status']}]") for c in checks]
    if gate:
        toc.append(("gate", "Gate"))
    if run or model or tool:
        toc.append(("run", "How this run was made"))

    return {
        "verdict": verdict if verdict in ("pass", "fail") else "unknown", "headline": results.get("headline"),
        "tool": tool, "model": model, "model_rows": model_rows, "run": run, "run_rows": run_rows, "prompt_rows": prompt_rows,
        "command": run.get("command"), "causes": causes, "judge_line": judge_line,
        "not_blamed": [nb for nb in _list(results.get("not_blamed")) if isinstance(nb, dict)], "proof": proof,
        "grid": grid, "grid_anchor": grid_check["anchor"] if grid_check else None, "checks": checks, "gate": gate,
        "gate_rows": [{**t, "state_text": _gate_state(t)} for t in _list(gate.get("thresholds")) if isinstance(t, dict)] if gate else [],
        "diagnosis": diagnosis, "fix_search": fix_search,
        "status_counts": sorted(status_counts.items()), "key_rates": key_rates,
        "toc": toc, "problems": notes.items, "script": Markup(COPY_SCRIPT), "script_hash": SCRIPT_HASH, "schema_version": results.get("schema_version"),
    }


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = charts.fmt
    env.filters["pct"] = _pct
    env.filters["val"] = _val
    return env


def render_html(results: dict) -> str:
    """The report page as one string."""
    return _env().get_template("report.html.j2").render(v=build_view(results))
