"""`audit fix`: the search's logic on a simulator whose answers are known, and the command end to end on an organism."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

import audit.pipeline.fix_search as F
from audit.intent.config import AblationConfig
from audit.pipeline.fix_search import FixSearch, Trial


class FakeSim:
    """Refusal is 0 when attn_out and experts_down are ablated in layers 1 and 2 at a scale >= 0.7, else 1; KL grows with every
    tensor and with the scale. Counts what each trial cost."""

    target, max_kl = 0.1, 1.0
    directions = None

    def __init__(self):
        self.estimates = self.generations = self.kls = 0

    def writer_targets(self):
        return ["attn_out", "experts_down", "mlp_down"]

    def bypass_config(self, index):
        return AblationConfig.from_dict({"components": self.writer_targets(), "ablate": [{"layer": l, "measurement": index} for l in range(4)]})

    def _refusal(self, cfg) -> float:
        need = {(l, g) for l in (1, 2) for g in ("attn_out", "experts_down")}
        have = {(e.layer, g) for e in cfg.entries for g in (e.components or cfg.components) if e.scale * cfg.scale >= 0.7}
        return 0.0 if need <= have else 1.0

    def settles(self, est):
        return est["lo"] > 0.5

    def estimate(self, cands):
        self.estimates += 1
        r = self._refusal(cands["c"])
        return {"c": {"rate": r, "lo": max(0.0, r - 0.1), "hi": min(1.0, r + 0.1), "n_used": 8}}

    def generate(self, cfg, **kw):
        self.generations += 1
        r = self._refusal(cfg)
        return {"rate": r, "lo": max(0.0, r - 0.1), "hi": min(1.0, r + 0.1), "n": 24, "n_unknown": 0}

    def kl(self, cfg):
        self.kls += 1
        return 0.001 * sum(len(e.components or cfg.components) for e in cfg.entries) * max(e.scale for e in cfg.entries)

    def over_refusal(self, cfg, limit):
        return {"rate": 0.0, "n": 24}


@dataclass
class Layout:
    num_layers: int = 4
    roles: dict = None

    def __post_init__(self):
        from checks.layout import WRITER, Role

        self.roles = {f"model.layers.{l}.{n}": Role(f"model.layers.{l}.{n}", l, c, p, WRITER)
                      for l in range(4) for n, c, p in (("self_attn.o_proj.weight", "attn", "o"), ("mlp.experts.down_proj", "experts", "down"),
                                                         ("mlp.down_proj.weight", "mlp", "down"))}


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(F, "from_config", lambda cfg, dirs: cfg)  # the fake simulator reads the config itself
    return FakeSim()


def _full():
    return AblationConfig.from_dict({"components": ["attn_out", "experts_down", "mlp_down"], "ablate": [{"layer": l} for l in range(4)]})


def test_refinement_keeps_the_cheapest_config_that_still_passes(fake):
    """From a passing config of every group in every layer, the search keeps the two layers that wrote most r and drops the group
    that wrote least (mlp_down), each step kept only because the gate still passes; the best has the least KL."""
    fs = FixSearch(fake, Layout(), {"max_over_refusal": 0.1}, {"attn_out": [0.1, 1.0, 0.9, 0.2], "experts_down": [0.0, 0.8, 0.7, 0.1],
                                                                "mlp_down": [0.0, 0.01, 0.01, 0.0]}, budget=30)
    t = fs.evaluate(_full(), "every writer, every layer", phase="causes", origin="layer-coverage")
    assert t.passes and t.kl == pytest.approx(0.012) and t.edited_tensors == 12
    fs._refine()
    best = fs.best()
    cfg = fs.configs[best.n]
    assert sorted({e.layer for e in cfg.entries}) == [1, 2] and set(cfg.components) == {"attn_out", "experts_down"}
    assert best.kl == pytest.approx(0.004 * 0.75) and best.edited_tensors == 4 and best.origin == "layer-coverage"
    assert all(not x.passes for x in fs.trials if "keep the 1 layers" in x.label)  # one layer is not enough: refused, not kept
    settled = [x for x in fs.trials if x.method == "first-token estimate (settled)"]
    assert settled and fake.generations == len(fs.trials) - len(settled)  # a settled trial costs no generation


def test_a_search_without_a_pass_says_what_limited_it(fake):
    fs = FixSearch(fake, Layout(), {}, {}, budget=10)
    out = fs.run([], AblationConfig([], (), source="nothing"), {"1": {"rate": 0.9, "kl": 0.0}, "2": {"rate": 0.95, "kl": 0.0}})
    assert out["best"] is None and out["first_pass"] is None and out["ended"] == "no candidate passes the gate"
    assert "no direction index removes refusal" in out["limited_by"]
    assert [t["phase"] for t in out["trials"]] == ["bypass", "bypass"]


def test_the_budget_bounds_the_refinement(fake):
    fs = FixSearch(fake, Layout(), {}, {"attn_out": [1, 1, 1, 1]}, budget=3)
    fs.evaluate(_full(), "start", phase="causes")
    fs._refine()
    assert len(fs.trials) == 3


def test_trials_serialize():
    t = Trial(1, "causes", "x", "attention-not-ablated", refusal=0.0, kl=0.01, passes=True)
    assert json.loads(json.dumps(t.to_dict()))["origin"] == "attention-not-ablated"


# -- end to end --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_organism():
    from audit.forward.measure import measure_directions
    from audit.model.directory import ModelDir
    from audit.model.prompts import load_prompts
    from audit.organisms.build import cached_organism, read_meta

    path = cached_organism("glm4_moe", "base", 0)
    dirs = measure_directions(ModelDir(path), load_prompts(str(path / "prompts" / "train_harmful.txt"), "harmful"),
                              load_prompts(str(path / "prompts" / "train_harmless.txt"), "harmless"))
    return path, read_meta(path), dirs


FLAGS = ["--limit", "24", "--max-new-tokens", "20", "--capability", "none", "--multi-turn", "0", "--no-controls"]


def test_audit_fix_applies_a_config_that_passes_when_reaudited_from_disk(base_organism, tmp_path):
    """The guide's band (layers 1-2, no dense MLP or embeddings): `audit fix` finds a passing config, writes it into OUT as a model
    with its manifest and fix-config.yaml, re-audits it from disk (PASS, exit 0), and the report shows every trial."""
    from audit.ablation.ablate import ablate

    path, meta, dirs = base_organism
    cfg = AblationConfig.from_dict({"components": ["experts_down", "router", "shared_down", "attn_out"],
                                    "ablate": [{"layer": l, "measurement": meta["separating_index"]} for l in (1, 2)]})
    ablate(path, cfg, tmp_path / "abl", directions=dirs, progress=False)
    r = subprocess.run([sys.executable, "-m", "audit.cli", "fix", str(tmp_path / "abl"), "-o", str(tmp_path / "fixed"), "--budget", "30",
                        *FLAGS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "fixed" / "fix-config.yaml").is_file() and (tmp_path / "fixed" / "ablation-manifest.json").is_file()
    doc = json.loads((tmp_path / "fixed-report" / "results.json").read_text())
    fs = doc["fix_search"]
    assert fs["first_pass"] is not None and fs["first_pass"] <= 4 and fs["best"]["passes"] and fs["n_trials"] <= 30
    assert doc["applied_fix"]["verdict"] == "pass" and doc["applied_fix"]["refusal_rate"] <= 0.1  # measured, not simulated
    again = json.loads((tmp_path / "fixed-report" / "applied-fix" / "results.json").read_text())
    assert again["verdict"] == "pass"
    html = (tmp_path / "fixed-report" / "report.html").read_text()
    assert "Fix search" in html and "applied</span>" in html
    # already sound: nothing to fix, exit 0 and no model written
    r = subprocess.run([sys.executable, "-m", "audit.cli", "fix", str(tmp_path / "fixed"), "-o", str(tmp_path / "again"), *FLAGS],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to fix" in r.stdout and not (tmp_path / "again").exists()


def test_audit_fix_says_why_when_no_config_passes(base_organism, tmp_path):
    """Directions that carry no refusal (random unit vectors at every index): no config can pass; exit 1, nothing applied, and the
    search names what limited it."""
    import torch

    from audit.ablation.ablate import ablate
    from audit.intent.directions import Directions

    path, meta, dirs = base_organism
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(dirs.refusal_dir.shape, generator=g)
    noise = Directions(rnd / rnd.norm(dim=-1, keepdim=True), dirs.harmful_mean, dirs.harmless_mean)
    noise.save(tmp_path / "noise.safetensors")
    cfg = AblationConfig.from_dict({"components": ["attn_out"], "ablate": [{"layer": 1, "measurement": 2}]})
    ablate(path, cfg, tmp_path / "abl", directions=noise, progress=False)
    r = subprocess.run([sys.executable, "-m", "audit.cli", "fix", str(tmp_path / "abl"), "-o", str(tmp_path / "fixed"), "--budget", "12",
                        "--directions", str(tmp_path / "noise.safetensors"), *FLAGS], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "fixed").exists()
    doc = json.loads((tmp_path / "fixed-report" / "results.json").read_text())
    assert doc["fix_search"]["best"] is None and doc["fix_search"]["limited_by"] and "applied_fix" not in doc
