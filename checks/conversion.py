"""Did the edit survive conversion? A quantized copy (a GGUF) of an ablated model judged against its source and its base.

Two facts per tensor, each measured against the same base and the same direction r: the share of r the source
(the safetensors ablation) keeps, ||r . W_src|| / ||r . W||, and the share the converted copy keeps,
||r . W_q|| / ||r . W||, with the copy's own rounding floor along r (``DirStats.floor``: the expected residue of
rounding into its type, from its stored scales; ``floor_requant``: what storing the exact edit in that type
leaves). The edit survived on a tensor when the copy keeps no more of r than the source plus what its type's
rounding explains; it was lost when the copy carries r back (at least ``NOT_ABLATED`` of it, as an untouched
tensor does), partly lost in between. A tensor the copy changed beyond rounding that the source left alone is a
change the conversion made.

``within_rounding`` is the rule the weights stage uses to call a quantized tensor unchanged: every stored value
moves under rounding, so "unchanged" means the difference is what the format's rounding explains, in total and
along each direction judged.
"""

from __future__ import annotations

import math

from checks.findings import FAIL, PASS, CheckResult, Finding
from checks.pair_stats import DirStats
from checks.projection import FLOOR_K, NOT_ABLATED, REQUANT_MARGIN, TensorProjection, classify

ROUNDING_K = FLOOR_K  # a difference within this many times the expected rounding residue is rounding


def within_rounding(diff_fro: float, noise_fro: float, dirs: dict[str, DirStats] | None = None, k: float = ROUNDING_K) -> bool:
    """Whether W' (stored in a quantized type) differs from W by no more than its rounding: ||W' - W|| <= k x sqrt(sum of its
    values' rounding variances) (``noise_fro``), and along each direction ||r . (W' - W)|| <= k x the expected ||r . e||."""
    if not (math.isfinite(diff_fro) and math.isfinite(noise_fro)) or diff_fro > k * noise_fro:
        return False
    for ds in (dirs or {}).values():
        along = math.sqrt(max(0.0, ds.before ** 2 + ds.after ** 2 - 2 * ds.dot))  # ||r.W' - r.W||
        if not math.isfinite(along) or along > k * ds.floor + 1e-6 * ds.before:
            return False
    return True


def _floor(ds: DirStats) -> float:
    """What the copy's type explains along r: the larger of k x its expected rounding and its re-quantization floor plus margin."""
    return max(FLOOR_K * ds.floor, (ds.floor_requant or 0.0) + REQUANT_MARGIN * ds.floor)


def survival(src: DirStats | None, conv: DirStats) -> str:
    """kept / partly-lost / lost for one tensor (``src``: the source's stats, None when only the copy is known)."""
    if conv.before <= 0:
        return "kept"
    left_src = src.after if src is not None else 0.0
    if conv.after <= left_src + _floor(conv):
        return "kept"
    return "lost" if conv.after / conv.before >= NOT_ABLATED else "partly-lost"


def check_conversion(converted: list[TensorProjection], source: list[TensorProjection], converted_changed: set[str],
                     source_changed: set[str], label: str = "the GGUF", direction: str | None = None) -> CheckResult:
    """Per tensor the source edited: its share of r left in the source and in the converted copy, the copy's floor, and
    whether the edit survived; findings ``edit-lost-in-conversion`` and ``conversion-changed`` (both fail), ``edit-survived``."""
    conv = {p.key: p for p in converted}
    src = {p.key: p for p in source}
    both = {n for p in source for n in p.dirs} & {n for p in converted for n in p.dirs}
    # the direction the ablation removed when the intent names it, else the layer's own measured one: the same on both sides
    dn = direction or next((n for n in ("ablated", "local") if n in both), min(both) if both else None)
    rows, lost, partly = [], [], []
    for key in sorted(source_changed, key=lambda k: (src[k].layer if k in src and src[k].layer is not None else -1, k)):
        s, c = src.get(key), conv.get(key)
        if s is None or c is None or dn not in s.dirs or dn not in c.dirs:
            continue
        ds, dc = s.dirs[dn], c.dirs[dn]
        if ds.before <= 0:
            continue
        verdict = survival(ds, dc)
        (lost if verdict == "lost" else partly if verdict == "partly-lost" else []).append(key)
        rows.append([key, c.layer, ",".join(c.targets), c.dtype, ds.share_left, classify(ds, True), dc.share_left,
                     _floor(dc) / dc.before if dc.before > 0 else None, classify(dc, key in converted_changed), verdict])
    added = sorted(converted_changed - source_changed)
    findings: list[Finding] = []
    bad = lost + partly
    if bad:
        worst = max(bad, key=lambda k: conv[k].dirs[dn].share_left or 0)
        findings.append(Finding(
            "edit-lost-in-conversion", FAIL,
            f"{len(bad)} of {len(rows)} edited tensor(s) carry r again in {label} ({len(lost)} as if never edited): e.g. {worst} keeps "
            f"{conv[worst].dirs[dn].share_left:.0%} of r where the source keeps {src[worst].dirs[dn].share_left:.1%} and its "
            f"{conv[worst].dtype} rounding explains {_floor(conv[worst].dirs[dn]) / conv[worst].dirs[dn].before:.1%}; "
            "re-convert from the ablated safetensors (check the converter reads the edited shards), or use a wider type",
            value=float(len(bad)), layers=sorted({conv[k].layer for k in bad if conv[k].layer is not None}),
            evidence={"keys": bad[:100], "lost": lost[:100], "partly_lost": partly[:100], "direction": dn}))
    if added:
        findings.append(Finding(
            "conversion-changed", FAIL, f"{len(added)} tensor(s) differ from the base beyond rounding in {label} but not in its source "
            f"({', '.join(added[:5])}{' ...' if len(added) > 5 else ''}): the conversion changed them, or it was made from another model",
            value=float(len(added)), layers=sorted({conv[k].layer for k in added if k in conv and conv[k].layer is not None}),
            evidence={"keys": added[:100]}))
    kept = len(rows) - len(bad)
    if rows and not bad:
        findings.append(Finding("edit-survived", PASS, f"all {len(rows)} edited tensor(s) keep the edit in {label}: what is left of r is "
                                "the source's residue plus at most its type's rounding", value=float(kept)))
    data = {"direction": dn, "kept": kept, "lost": len(lost), "partly_lost": len(partly), "edited": len(rows), "changed_by_conversion": added[:100],
            "tables": {"survival": {"title": f"Did the edit survive conversion? Share of r left per edited tensor ({dn} direction)",
                                    "columns": ["key", "layer", "groups", "type", "source share left", "source class", "converted share left",
                                                "type's floor (share)", "converted class", "survived"], "rows": rows}}}
    status = FAIL if any(f.severity == FAIL for f in findings) else PASS
    summary = ((f"{kept} of {len(rows)} edited tensors keep the edit in {label} ({dn} direction)" + (f"; {len(bad)} lost it" if bad else "")
                + (f"; {len(added)} changed by the conversion" if added else "")) if rows or added else
               "no direction to compare along: give --directions, or a source made by `audit ablate`" if dn is None else
               "the source edited no tensor along r")
    return CheckResult("conversion", status, summary, findings, data)
