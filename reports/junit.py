"""junit.xml: the audit as a CI test report (Jenkins, GitLab, GitHub test reporters read it).

One ``testsuite`` for the checks (one ``testcase`` per check: failure when its status is fail,
skipped when skip, warnings in system-out) and one for the gate (one ``testcase`` per threshold:
failure when not passed). The shape is the common JUnit XML one: testsuites > testsuite >
testcase > failure|skipped, with name, classname, time and tests/failures/errors/skipped counts.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Any

TOOL = "moe-ablation-audit"
_BAD_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _clean(x: Any, limit: int = 20000) -> str:
    """Text safe for XML 1.0 (control characters dropped), cut at ``limit`` characters."""
    s = _BAD_XML.sub("", "" if x is None else str(x))
    return s if len(s) <= limit else s[:limit] + " ..."


def _secs(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "0.000"
    return f"{v:.3f}" if math.isfinite(v) and v >= 0 else "0.000"


def _finding_line(f: Any) -> str:
    if not isinstance(f, dict):
        return str(f)
    parts = [f"[{f.get('severity', '?')}] {f.get('code', '')}: {f.get('message', '')}"]
    if f.get("value") is not None:
        parts.append(f"value={f['value']}")
    if f.get("threshold") is not None:
        parts.append(f"threshold={f['threshold']}")
    if f.get("layers"):
        parts.append(f"layers={f['layers']}")
    return " ".join(parts)


def _timestamp(results: dict) -> str | None:
    """run.started as the xs:dateTime-without-zone JUnit readers expect (YYYY-MM-DDTHH:MM:SS)."""
    started = str(_dict(results.get("run")).get("started") or "")
    m = re.match(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})", started)
    return f"{m.group(1)}T{m.group(2)}" if m else None


def _suite(parent: ET.Element, name: str, idx: int, stamp: str | None) -> ET.Element:
    s = ET.SubElement(parent, "testsuite", {"name": name, "id": str(idx)})
    if stamp:
        s.set("timestamp", stamp)
    return s


def _finish(suite: ET.Element) -> tuple[int, int, int, float]:
    cases = suite.findall("testcase")
    fails = sum(1 for c in cases if c.find("failure") is not None)
    skips = sum(1 for c in cases if c.find("skipped") is not None)
    secs = sum(float(c.get("time", "0")) for c in cases)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(fails))
    suite.set("errors", "0")
    suite.set("skipped", str(skips))
    suite.set("time", f"{secs:.3f}")
    return len(cases), fails, skips, secs


def build_junit(results: dict) -> ET.Element:
    """The <testsuites> element for a results dict (missing sections give empty suites)."""
    results = results if isinstance(results, dict) else {}
    stamp = _timestamp(results)
    root = ET.Element("testsuites", {"name": TOOL})

    checks = _suite(root, f"{TOOL}.checks", 0, stamp)
    props = ET.SubElement(checks, "properties")
    run, model = _dict(results.get("run")), _dict(results.get("model"))
    for key, val in (("verdict", results.get("verdict")), ("headline", results.get("headline")),
                     ("model_dir", run.get("model_dir")), ("base_dir", run.get("base_dir")),
                     ("family", model.get("family")), ("command", run.get("command")),
                     ("tool_version", _dict(results.get("tool")).get("version"))):
        if val is not None:
            ET.SubElement(props, "property", {"name": key, "value": _clean(val, 2000)})
    if not len(props):
        checks.remove(props)
    raw_checks = results.get("checks") or {}
    for key, chk in (raw_checks.items() if isinstance(raw_checks, dict) else []):
        chk = chk if isinstance(chk, dict) else {}
        name = str(chk.get("name") or key)
        case = ET.SubElement(checks, "testcase", {"name": _clean(name, 200), "classname": f"{TOOL}.checks",
                                                  "time": _secs(chk.get("seconds"))})
        status = str(chk.get("status") or "").lower()
        findings = chk.get("findings") if isinstance(chk.get("findings"), list) else []
        summary = _clean(chk.get("summary") or f"check {name}: {status or 'no status'}", 2000)
        if status == "fail":
            bad = [f for f in findings if isinstance(f, dict) and f.get("severity") == "fail"] or findings
            fail = ET.SubElement(case, "failure", {"message": summary, "type": "check-failed"})
            fail.text = _clean("\n".join(_finding_line(f) for f in bad) or summary)
        elif status == "skip":
            ET.SubElement(case, "skipped", {"message": summary})
        notes = [_finding_line(f) for f in findings if isinstance(f, dict) and f.get("severity") == "warn"]
        if status != "fail" and (notes or summary):
            out = ET.SubElement(case, "system-out")
            out.text = _clean("\n".join([f"{status}: {summary}", *notes]))

    gate = results.get("gate")
    if isinstance(gate, dict):
        gs = _suite(root, f"{TOOL}.gate", 1, stamp)
        if gate.get("source"):
            ET.SubElement(ET.SubElement(gs, "properties"), "property", {"name": "source", "value": _clean(gate["source"], 2000)})
        raw = gate.get("thresholds")
        thresholds = [t for t in (raw if isinstance(raw, list) else []) if isinstance(t, dict)]
        for i, t in enumerate(thresholds):
            name = str(t.get("name") or f"threshold-{i}")
            case = ET.SubElement(gs, "testcase", {"name": _clean(name, 200), "classname": f"{TOOL}.gate", "time": "0.000"})
            desc = f"{name}: value {t.get('value')} {t.get('op', '?')} limit {t.get('limit')}"
            if t.get("passed") is None:  # the gate could not measure it in this run
                ET.SubElement(case, "skipped", {"message": _clean(t.get("message") or f"{name}: not measured", 2000)})
            elif not t.get("passed"):
                fail = ET.SubElement(case, "failure", {"message": _clean(t.get("message") or desc, 2000), "type": "gate-threshold"})
                fail.text = _clean(desc)
        if not thresholds:  # a gate without thresholds still says pass/fail
            case = ET.SubElement(gs, "testcase", {"name": "gate", "classname": f"{TOOL}.gate", "time": "0.000"})
            if not gate.get("passed", True):
                ET.SubElement(case, "failure", {"message": "gate failed", "type": "gate"})

    totals = [_finish(s) for s in root.findall("testsuite")]
    root.set("tests", str(sum(t[0] for t in totals)))
    root.set("failures", str(sum(t[1] for t in totals)))
    root.set("errors", "0")
    root.set("skipped", str(sum(t[2] for t in totals)))
    root.set("time", f"{sum(t[3] for t in totals):.3f}")
    return root


def render_junit(results: dict) -> str:
    """junit.xml text (UTF-8, with XML declaration)."""
    root = build_junit(results)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
