"""report.html, the SVG charts and results.json: content, escaping, robustness, and a real browser.

The browser tests run headless Chromium (Debian: `apt-get install -y chromium`) and skip when no
binary is found. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from checks.errors import AuditError
from reports import charts
from reports.html import build_view, render_html
from reports.junit import render_junit
from reports.results_io import dumps_results, load_results

DATA = Path(__file__).parent / "data" / "sample_results.json"
ARTIFACTS = Path(__file__).parent / "artifacts"
EVIL_MARKERS = ("<script>document.title='pwned'</script>", "<img src=x onerror")


@pytest.fixture(scope="module")
def sample() -> dict:
    return load_results(DATA)


@pytest.fixture(scope="module")
def page(sample) -> str:
    return render_html(sample)


def _svg_blocks(html: str, cls: str) -> list[str]:
    return re.findall(rf'<svg [^>]*class="chart {cls}".*?</svg>', html, flags=re.DOTALL)


# ---------------------------------------------------------------- page content


def test_page_has_every_section(sample, page):
    for anchor in ("causes", "not-blamed", "modified", "gate", "run"):
        assert f'id="{anchor}"' in page, anchor
    for name in sample["checks"]:
        assert f'id="check-{name}"' in page, name
    n_matrices = sum(len(c.get("data", {}).get("matrices", {})) for c in sample["checks"].values())
    n_curves = sum(len(c.get("data", {}).get("curves", {})) for c in sample["checks"].values())
    assert len(_svg_blocks(page, "heatmap")) == n_matrices > 0
    assert len(_svg_blocks(page, "line")) == n_curves > 0
    assert sample["run"]["command"] in page
    assert 'class="banner fail"' in page
    assert build_view(sample)["problems"] == []


def test_causes_in_the_diagnosis_order_demoted_last(sample, page):
    """The page keeps the diagnosis's ranking (what each simulated fix achieves), not a re-sort by raw confidence."""
    order = [m for m in re.findall(r'<article class="card[^"]*" id="cause-([a-z0-9-]+)"', page)]
    causes = sorted(sample["causes"], key=lambda c: c["demoted"])
    assert order == [c["id"] for c in causes]
    demoted = [c["id"] for c in sample["causes"] if c["demoted"]]
    assert demoted and order[-len(demoted):] == demoted
    for c in sample["causes"]:  # every fix is shown, in a <pre>, escaped the way jinja escapes it
        yaml_html = c["fix"]["config_yaml"].replace("&", "&amp;").replace("<", "&lt;")
        assert f">{yaml_html}</pre>" in page


def test_cause_shows_simulated_and_applied_rates(sample, page):
    cause = next(c for c in sample["causes"] if c.get("applied"))
    card = page.split(f'id="cause-{cause["id"]}"')[1].split("</article>")[0]
    for rate in (cause["simulated"]["refusal_rate"], cause["applied"]["refusal_rate"]):
        assert f"{100 * rate:.1f}%" in card
    assert "simulated with fix" in card and "measured after fix" in card
    assert 'href="fix-expert-inputs/report.html"' in card


def test_modified_grid_counts_match_cells(sample, page):
    cells = [c for row in sample["checks"]["weights"]["data"]["grid"]["cells"] for c in row]
    missed = sum(1 for c in cells if c["intended"] and c["actual"] == "unchanged")
    unintended = sum(1 for c in cells if not c["intended"] and c["actual"] in ("changed", "partial"))
    assert missed > 0 and unintended > 0
    section = page.split('id="modified"')[1].split("</section>")[0]
    assert section.count('class="g-missed"') == missed + 1  # + the legend swatch
    assert section.count('class="g-unint"') == unintended + 1
    assert f"intended but unchanged: {missed}" in section


def test_rates_table_and_samples(sample, page):
    rates = sample["checks"]["refusal"]["data"]["rates"]
    for key in ("before", "after", "over_refusal_before", "over_refusal_after"):
        assert f"{100 * rates[key]['rate']:.1f}%" in page
    samples = sample["checks"]["refusal"]["data"]["samples"]
    assert page.count('<pre class="completion">') == len(samples)


def test_refusal_data_as_refusal_eval_writes_it(sample):
    """checks/refusal_eval.py keeps rates in data itself (after/before/harmless_*) with paired.p: same rendering."""
    r = copy.deepcopy(sample)
    rates = r["checks"]["refusal"]["data"].pop("rates")
    r["checks"]["refusal"]["data"].update(before=rates["before"], after=rates["after"], harmless_before=rates["over_refusal_before"],
                                          harmless_after=rates["over_refusal_after"], paired={"n_pairs": 64, "b": 6, "c": 2, "p": 0.2891})
    for smp in r["checks"]["refusal"]["data"]["samples"]:
        smp["set"] = "harmful"
    view = next(c for c in build_view(r)["checks"] if c["name"] == "refusal")
    assert [i["rate"] for i in view["rates"]["items"]] == [rates[k]["rate"] for k in ("before", "after", "over_refusal_before", "over_refusal_after")]
    assert view["rates"]["mcnemar_p"] == 0.2891
    assert [w for w, _ in view["samples"]["groups"]] == ["before, harmful", "after, harmful"]
    assert view["other"] == []  # nothing of the refusal data left unrendered
    html = render_html(r)
    assert "McNemar p (before vs after, paired) = 0.289" in html
    assert f"refusal, harmful, after: <b>{100 * rates['after']['rate']:.1f}%</b>" in html


def test_gate_threshold_not_measured(sample):
    r = copy.deepcopy(sample)
    r["gate"]["thresholds"].append({"name": "max_kl", "value": None, "limit": 0.1, "op": "<=", "passed": None, "message": "not measured"})
    row = render_html(r).split("<td>max_kl</td>")[1].split("</tr>")[0]
    assert "not measured" in row and "b-fail" not in row


def test_refusal_left_unexplained_beside_a_named_soundness_cause_has_its_section(sample):
    """A damage cause on top with refusal that stayed (checks/diagnosis/outcome.py ``refusal_unexplained``): the page
    names the cause and shows what was tried for refusal under its own heading; a plain explained diagnosis does not."""
    r = copy.deepcopy(sample)
    r["diagnosis"] = {"status": "explained", "cause": "model-damaged", "proven": False, "refusal_unexplained": True,
                      "statement": "The ablation damaged the model (named on its evidence); why refusal stays is not explained",
                      "tried": [{"what": "layer-coverage: every layer", "refusal_rate": 0.85, "kl": 0.3, "method": "generation"}],
                      "next": ["no measured direction removes refusal even with every writer of every layer ablated"]}
    html = render_html(r)
    assert "Why refusal stays: not explained" in html and "layer-coverage: every layer" in html and "No cause proven</h2>" not in html
    r["diagnosis"] = {"status": "explained", "cause": "model-damaged", "proven": False, "statement": "x"}
    assert "Why refusal stays" not in render_html(r)


def test_sample_matches_the_results_schema(sample):
    """The hand-written fixture keeps to the shared contract (checks/schemas/results.schema.json)."""
    import jsonschema

    schema_file = Path(__file__).parents[1] / "checks" / "schemas" / "results.schema.json"
    jsonschema.validate(sample, json.loads(schema_file.read_text()))


def test_completion_html_is_escaped(page):
    for marker in EVIL_MARKERS:
        assert marker not in page
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=" in page
    # The only script element is the page's own, and the CSP allows exactly it, by hash.
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert f"'sha256-{digest}'" in csp and "unsafe-inline'" not in csp.split("script-src")[1]


def test_unsafe_links_are_not_links(page):
    assert 'href="javascript:' not in page.lower()
    assert "javascript:alert(1)" in page  # still shown, as text


def test_self_contained(page):
    assert not re.search(r'(?:src|href)\s*=\s*"(?:https?:)?//', page)
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?https?:", page)
    assert "<link " not in page


def test_missing_or_malformed_sections_never_crash(sample):
    assert "UNKNOWN" in render_html({})
    for key in list(sample):
        partial = {k: v for k, v in sample.items() if k != key}
        assert "<html" in render_html(partial)
    bad = copy.deepcopy(sample)
    bad["causes"] = [5, {"id": "x", "confidence": "high?", "fix": None, "numbers": [1, 2], "simulated": {"refusal_rate": None}}]
    bad["checks"]["projection"]["data"]["matrices"]["write_left"]["values"] = "not a matrix"
    bad["checks"]["recovery"]["data"]["curves"]["residual"]["series"] = {}
    bad["checks"]["junk"] = 7
    bad["checks"]["refusal"]["data"]["samples"] = [None, {"prompt": None}]
    bad["gate"] = {"thresholds": [None, {"name": 3}]}
    view = build_view(bad)
    assert any("write_left" in p for p in view["problems"]) and any("residual" in p for p in view["problems"])
    html = render_html(bad)
    assert "could not draw" in html and 'id="check-junk"' in html


def test_audit_report_writes_only_into_a_new_folder_or_one_of_results(tmp_path, sample):
    """`audit report -o DIR`: a new folder (made whole, with our marker), or a folder of results this tool wrote (its report
    files replaced); a user's folder or a model directory of ours is refused, untouched (issue 26)."""
    from audit.outputs import MARKER, OutputDir
    from audit.pipeline.write import write_report

    html, junit = write_report(sample, tmp_path / "sub" / "new")
    assert html.read_text(encoding="utf-8") == render_html(sample) and junit.read_text(encoding="utf-8") == render_junit(sample)
    assert (html.parent / MARKER).is_file()
    write_report(sample, html.parent)  # again: its own earlier report replaced
    assert sorted(p.name for p in html.parent.iterdir()) == [MARKER, "junit.xml", "report.html"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text("{}")
    with pytest.raises(AuditError, match="did not write"):
        write_report(sample, user)
    with OutputDir(tmp_path / "model", kind="ablated model") as od:
        (od.tmp / "config.json").write_text("{}")
        model = od.commit()
    with pytest.raises(AuditError, match="ablated model this tool wrote, not a folder of results"):
        write_report(sample, model)
    assert sorted(p.name for p in user.iterdir()) == ["config.json"] and sorted(p.name for p in model.iterdir()) == [MARKER, "config.json"]
    assert not [p for p in tmp_path.rglob(".*") if p.name != MARKER]  # no temporaries left


# ---------------------------------------------------------------- charts


def _decode_png(uri: str) -> list[list[tuple[int, int, int]]]:
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(raw):
        (n,), tag = struct.unpack(">I", raw[pos:pos + 4]), raw[pos + 4:pos + 8]
        body = raw[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", raw[pos + 8 + n:pos + 12 + n])[0]
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    px = zlib.decompress(idat)
    stride = 1 + 3 * w
    return [[tuple(px[r * stride + 1 + 3 * c: r * stride + 4 + 3 * c]) for c in range(w)] for r in range(h)]


def test_heatmap_scale_kind_and_missing_cells():
    div = charts.heatmap_svg({"title": "d", "values": [[-1.0, 0.0, 1.0], [None, float("nan"), 0.5]]})
    ET.fromstring(div)  # well-formed XML
    assert charts.DIVERGING[0] in div and charts.DIVERGING[-1] in div and charts.DIVERGING[4] in div
    assert div.count('<rect x="') - div.count("width=\"1\" height=\"1\"") >= 2  # two hatched missing cells
    assert "-na)" in div and "no data" in div
    seq = charts.heatmap_svg({"title": "s", "values": [[0.0, 0.5], [1.0, None]], "vmin": 0, "vmax": 1})
    assert charts.SEQUENTIAL[0] in seq and charts.SEQUENTIAL[-1] in seq and charts.DIVERGING[0] not in seq


def test_heatmap_labels_escaped():
    svg = charts.heatmap_svg({"title": "<b>x</b> & y", "rows": ["<r>"], "cols": ['"c"'], "values": [[1.0]], "unit": "<u>"})
    root = ET.fromstring(svg)
    assert "<b>" not in svg and "&lt;b&gt;x&lt;/b&gt; &amp; y" in svg
    assert root.find("{http://www.w3.org/2000/svg}title").text == "<b>x</b> & y"


def test_large_heatmap_is_an_exact_png_and_small():
    rows, cols = 94, 256  # DeepSeek-V3-sized: 61 MoE layers x 256 experts and more
    vals = [[None if (i * 7 + j) % 23 == 0 else math.sin(i * 0.37 + j * 0.11) for j in range(cols)] for i in range(rows)]
    svg = charts.heatmap_svg({"title": "big", "values": vals})
    ET.fromstring(svg)
    assert len(svg) < 200_000 and svg.count("<rect") < 20
    img = _decode_png(re.search(r'href="(data:image/png;base64,[^"]+)"', svg).group(1))
    assert len(img) == rows and len(img[0]) == cols
    scale = charts.Scale([v for r in vals for v in r if v is not None])
    for i, j in ((0, 0), (5, 17), (93, 255), (40, 128)):
        want = charts._hex(charts.MISSING) if vals[i][j] is None else scale.rgb(vals[i][j])
        assert img[i][j] == want, (i, j)


def test_rect_heatmap_size_scales_per_cell():
    vals = [[(i * j) % 7 / 7 for j in range(64)] for i in range(60)]  # 3840 cells: rects
    svg = charts.heatmap_svg({"title": "m", "values": vals})
    assert svg.count('width="1" height="1"') == 64 * 60
    assert len(svg) / (64 * 60) < 110  # bytes per cell stays bounded


def test_line_chart_breaks_at_missing_points():
    svg = charts.line_chart_svg({"title": "t", "x": [0, 1, 2, 3, 4], "series": {"a": [1, 2, None, 4, 5], "<b>": [1, 1, 1, 1, 1]}})
    ET.fromstring(svg)
    assert svg.count("<polyline") == 3  # a: two segments, <b>: one
    assert "&lt;b&gt;" in svg and "<b>" not in svg


def test_interval_bars_positions():
    svg = charts.interval_bars_svg([{"label": "x", "rate": 0.5, "lo": 0.25, "hi": 0.75, "k": 5, "n": 10}], title="r", width=640)
    ET.fromstring(svg)
    left, pw = 170, 640 - 170 - 185
    bar = re.search(r'<rect x="170" y="\d+" width="([\d.]+)"', svg)
    assert abs(float(bar.group(1)) - 0.5 * pw) < 0.2
    assert f'x1="{left + 0.25 * pw:.1f}" x2="{left + 0.75 * pw:.1f}"' in svg
    assert "50.0% [25.0%, 75.0%] (5/10)" in svg


# ---------------------------------------------------------------- results.json


def test_results_json_stable_and_sorted(tmp_path, sample):
    r = copy.deepcopy(sample)
    r["extra"] = {"z": 0.1 + 0.2, "a": float("nan"), "inf": float("inf"), "neg0": -0.0, "t": (1, 2)}
    p1, p2 = tmp_path / "a.json", tmp_path / "b.json"
    p1.write_text(dumps_results(r), encoding="utf-8")
    p2.write_text(dumps_results(copy.deepcopy(r)), encoding="utf-8")
    assert p1.read_bytes() == p2.read_bytes()
    back = load_results(p1)
    assert back["extra"] == {"a": None, "inf": None, "neg0": 0.0, "t": [1, 2], "z": 0.3}
    text = p1.read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert dumps_results(back) == text  # a round trip writes the same bytes


def test_every_results_json_is_checked_against_its_schema_before_it_is_written(sample):
    """The one text of results.json (audit run's, static's) is validated first: a document off the schema is this
    tool's bug, named where it is, and never written."""
    from reports.results_io import SCHEMA_VERSION

    assert sample["schema_version"].split(".")[0] == SCHEMA_VERSION.split(".")[0]
    bad = copy.deepcopy(sample)
    bad["checks"]["weights"]["data"]["tables"] = {"t": [{"a": 1}]}  # a table as a plain list (what two checks once wrote)
    with pytest.raises(ValueError, match=r"at \$\.checks\.weights\.data\.tables\.t"):
        dumps_results(bad)


def test_load_results_errors(tmp_path):
    with pytest.raises(AuditError, match="no such results file"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(AuditError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(AuditError, match="JSON object"):
        load_results(tmp_path / "list.json")
    (tmp_path / "new.json").write_text('{"schema_version": 99}')
    with pytest.raises(AuditError, match="newer"):
        load_results(tmp_path / "new.json")
    (tmp_path / "new2.json").write_text('{"schema_version": "2.1"}')
    with pytest.raises(AuditError, match="newer"):
        load_results(tmp_path / "new2.json")
    (tmp_path / "minor.json").write_text('{"schema_version": "1.7"}')
    assert load_results(tmp_path / "minor.json")["schema_version"] == "1.7"
    (tmp_path / "results.json").write_text('{"schema_version": 1}')
    assert load_results(tmp_path)["schema_version"] == 1  # a folder finds its results.json


# ---------------------------------------------------------------- headless Chromium


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)


def _run_chromium(args: list[str], url: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    if not exe:
        pytest.skip("no chromium binary (Debian: apt-get install -y chromium)")
    base = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
            "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    return subprocess.run(base + args + [url], capture_output=True, text=True, timeout=90, check=False)


def _console_lines(stderr: str) -> list[str]:
    """Messages the page wrote to the console (logs, errors, uncaught exceptions, CSP refusals)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.fixture(scope="module")
def report_file(tmp_path_factory, sample) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html(sample), encoding="utf-8")
    return path


def test_console_capture_detects_errors(tmp_path):
    """Control: the console capture used below does see an error when a page has one."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><title>t</title><script>undefinedFunction()</script>")
    res = _run_chromium(["--dump-dom"], bad.as_uri())
    assert any("undefinedFunction" in ln for ln in _console_lines(res.stderr)), res.stderr[-2000:]


def test_renders_in_chromium_without_console_errors(report_file):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    res = _run_chromium([f"--screenshot={shot}", "--window-size=1280,4000"], report_file.as_uri())
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert _console_lines(res.stderr) == [], _console_lines(res.stderr)


def test_injected_script_does_not_run(report_file, tmp_path):
    res = _run_chromium(["--dump-dom", "--virtual-time-budget=2000"], report_file.as_uri())
    dom = res.stdout
    assert "<main>" in dom
    title = re.search(r"<title>(.*?)</title>", dom, flags=re.DOTALL).group(1)
    assert title.startswith("Ablation audit: FAIL") and "pwned" not in title
    assert "<img" not in dom  # the completion's <img onerror> stayed text
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text
    assert len(re.findall(r"<script\b", dom)) == 1
    assert _console_lines(res.stderr) == []
    # Defence in depth: even markup that bypassed escaping could not run under the page's CSP.
    csp = re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', report_file.read_text()).group(0)
    probe = tmp_path / "csp.html"
    probe.write_text(f"<!DOCTYPE html><html><head>{csp}<title>safe</title></head><body>"
                     "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned2'\"></body></html>")
    res = _run_chromium(["--dump-dom", "--virtual-time-budget=2000"], probe.as_uri())
    assert re.search(r"<title>(.*?)</title>", res.stdout).group(1) == "safe"


def test_fuzzed_results_never_crash(sample):
    """Random nodes of the sample replaced by values of the wrong type: the page still renders."""
    import random

    junk = [None, 5, -1.5, "x<b>", [], {}, [None], {"a": None}, True, float("nan")]

    def mutate(x, rng):
        if rng.random() < 0.08:
            return rng.choice(junk)
        if isinstance(x, dict):
            return {k: mutate(v, rng) for k, v in x.items()}
        if isinstance(x, list):
            return [mutate(v, rng) for v in x]
        return x

    seen = 0
    for seed in range(16):
        broken = mutate(copy.deepcopy(sample), random.Random(seed))
        html = render_html(broken)
        assert html.rstrip().endswith("</html>")
        problems = build_view(broken)["problems"]
        seen += len(problems)
        # What cannot be drawn is reported with a deliberate message, never an accident of the code.
        assert all("ChartDataError" in p for p in problems), problems
    assert seen > 0  # the fuzzing did break some figures


def test_report_names_the_judge_and_its_accuracy(sample):
    import copy

    from audit.judgement.judges import OfflineJudge, RulesOnlyJudge

    r = copy.deepcopy(sample)
    r["run"]["judge"] = OfflineJudge().about()
    html = render_html(r)
    acc = r["run"]["judge"]["accuracy"]
    assert f"refusals judged by rules (offline judge (rules + linear n-gram model)): accuracy {acc:.3f}" in html
    assert "held-out human-labelled GPTFuzz completions" in html and "docs/judge-data-card.md" in html
    assert "human-labelled JAILJUDGE-mini completions (held out whole)" in html
    r["run"]["judge"] = {"judge": "server:some-llm", "description": "LLM judge", "accuracy": None}
    assert "server:some-llm (LLM judge): accuracy not measured by this project" in render_html(r)
    r["run"]["judge"] = RulesOnlyJudge().about()
    assert "rules-only (regular-expression rules" in render_html(r)
    r["run"]["judge"] = "garbage"
    assert "refusals judged by" not in render_html(r)  # an odd value renders nothing, never crashes
