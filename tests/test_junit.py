"""junit.xml: one testcase per check and per gate threshold, counts right, valid against the JUnit shape."""

from __future__ import annotations

import copy
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reports.junit import render_junit
from reports.results_io import load_results

DATA = Path(__file__).parent / "data" / "sample_results.json"

# The common JUnit XML shape (as Jenkins, GitLab and Maven Surefire read it), written for this test.
JUNIT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified">
  <xs:complexType name="outcome">
    <xs:simpleContent><xs:extension base="xs:string">
      <xs:attribute name="message" type="xs:string"/><xs:attribute name="type" type="xs:string"/>
    </xs:extension></xs:simpleContent>
  </xs:complexType>
  <xs:element name="properties"><xs:complexType><xs:sequence>
    <xs:element name="property" maxOccurs="unbounded"><xs:complexType>
      <xs:attribute name="name" type="xs:string" use="required"/><xs:attribute name="value" type="xs:string" use="required"/>
    </xs:complexType></xs:element>
  </xs:sequence></xs:complexType></xs:element>
  <xs:element name="testcase"><xs:complexType><xs:sequence>
    <xs:choice minOccurs="0" maxOccurs="1">
      <xs:element name="skipped" type="outcome"/><xs:element name="error" type="outcome"/><xs:element name="failure" type="outcome"/>
    </xs:choice>
    <xs:element name="system-out" type="xs:string" minOccurs="0"/><xs:element name="system-err" type="xs:string" minOccurs="0"/>
  </xs:sequence>
    <xs:attribute name="name" type="xs:string" use="required"/><xs:attribute name="classname" type="xs:string" use="required"/>
    <xs:attribute name="time" type="xs:decimal" use="required"/>
  </xs:complexType></xs:element>
  <xs:element name="testsuite"><xs:complexType><xs:sequence>
    <xs:element ref="properties" minOccurs="0"/><xs:element ref="testcase" minOccurs="0" maxOccurs="unbounded"/>
    <xs:element name="system-out" type="xs:string" minOccurs="0"/><xs:element name="system-err" type="xs:string" minOccurs="0"/>
  </xs:sequence>
    <xs:attribute name="name" type="xs:string" use="required"/><xs:attribute name="tests" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="failures" type="xs:nonNegativeInteger" use="required"/><xs:attribute name="errors" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="skipped" type="xs:nonNegativeInteger"/><xs:attribute name="time" type="xs:decimal" use="required"/>
    <xs:attribute name="timestamp" type="xs:dateTime"/><xs:attribute name="id" type="xs:string"/>
  </xs:complexType></xs:element>
  <xs:element name="testsuites"><xs:complexType><xs:sequence>
    <xs:element ref="testsuite" minOccurs="0" maxOccurs="unbounded"/>
  </xs:sequence>
    <xs:attribute name="name" type="xs:string"/><xs:attribute name="tests" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="failures" type="xs:nonNegativeInteger" use="required"/><xs:attribute name="errors" type="xs:nonNegativeInteger"/>
    <xs:attribute name="skipped" type="xs:nonNegativeInteger"/><xs:attribute name="time" type="xs:decimal"/>
  </xs:complexType></xs:element>
</xs:schema>
"""


@pytest.fixture(scope="module")
def sample() -> dict:
    return load_results(DATA)


class _NoSchema:
    """Stand-in when xmlschema is not installed: only well-formedness is checked."""

    def validate(self, text: str) -> None:
        ET.fromstring(text.encode())


@pytest.fixture(scope="module")
def schema():
    try:
        import xmlschema
    except ImportError:
        return _NoSchema()
    return xmlschema.XMLSchema(JUNIT_XSD)


def _structure_ok(root: ET.Element) -> None:
    """Shape checks without a schema library: counts agree with the testcases they count."""
    assert root.tag == "testsuites"
    total = 0
    for suite in root.findall("testsuite"):
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
        for c in cases:
            assert c.get("name") and c.get("classname") and float(c.get("time")) >= 0
        total += len(cases)
    assert int(root.get("tests")) == total


def test_one_case_per_check_and_threshold(sample):
    root = ET.fromstring(render_junit(sample).encode())
    _structure_ok(root)
    checks = root.find("testsuite[@name='moe-ablation-audit.checks']")
    gate = root.find("testsuite[@name='moe-ablation-audit.gate']")
    assert [c.get("name") for c in checks.findall("testcase")] == list(sample["checks"])
    assert [c.get("name") for c in gate.findall("testcase")] == [t["name"] for t in sample["gate"]["thresholds"]]
    failed = {k for k, c in sample["checks"].items() if c["status"] == "fail"}
    failed |= {t["name"] for t in sample["gate"]["thresholds"] if not t["passed"]}
    got = {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None}
    assert got == failed and len(failed) >= 2
    skipped = {k for k, c in sample["checks"].items() if c["status"] == "skip"}
    assert {c.get("name") for c in root.iter("testcase") if c.find("skipped") is not None} == skipped
    assert int(root.get("failures")) == len(failed)
    weights = checks.find("testcase[@name='weights']/failure")
    assert "intended-untouched" in weights.text  # the failing findings are the failure body
    secs = {c.get("name"): float(c.get("time")) for c in checks.findall("testcase")}
    assert secs["refusal"] == pytest.approx(sample["checks"]["refusal"]["seconds"], abs=1e-3)


def test_validates_against_junit_schema(sample, schema):
    if isinstance(schema, _NoSchema):
        pytest.skip("xmlschema not installed (pip install xmlschema)")
    text = render_junit(sample)
    schema.validate(text)
    schema.validate(render_junit({}))
    broken = text.replace('classname="moe-ablation-audit.gate"', "", 1)  # control: the schema does reject
    assert not schema.is_valid(broken)


def test_control_characters_and_markup_in_text(sample, schema):
    r = copy.deepcopy(sample)
    r["checks"]["weights"]["summary"] = "bad \x00\x1b bytes <b>&</b> \ud800"
    r["checks"]["weights"]["findings"][0]["message"] = "</failure><script>x</script>"
    text = render_junit(r)
    root = ET.fromstring(text.encode())
    fail = root.find(".//testcase[@name='weights']/failure")
    assert fail.get("message") == "bad  bytes <b>&</b> "
    assert "</failure><script>x</script>" in fail.text
    schema.validate(text)


def test_empty_and_fuzzed_results_stay_valid(sample, schema):
    root = ET.fromstring(render_junit({}).encode())
    assert root.get("tests") == "0"
    junk = [None, 5, -1.5, "x\x00", [], {}, [None], True, float("nan"), float("inf")]

    def mutate(x, rng):
        if rng.random() < 0.1:
            return rng.choice(junk)
        if isinstance(x, dict):
            return {k: mutate(v, rng) for k, v in x.items()}
        return [mutate(v, rng) for v in x] if isinstance(x, list) else x

    for seed in range(30):
        text = render_junit(mutate(copy.deepcopy(sample), random.Random(seed)))
        _structure_ok(ET.fromstring(text.encode()))
        schema.validate(text)


def test_unmeasured_threshold_is_skipped(sample, schema):
    r = copy.deepcopy(sample)
    r["gate"]["thresholds"].append({"name": "max_kl", "value": None, "limit": 0.1, "op": "<=", "passed": None, "message": "not measured"})
    text = render_junit(r)
    case = ET.fromstring(text.encode()).find(".//testcase[@name='max_kl']")
    assert case.find("skipped") is not None and case.find("failure") is None
    schema.validate(text)
