"""The organisms the test suite audits, committed as fixtures so every machine audits the same weights.

Training an organism is reproducible on one machine (seeded, one torch thread: the same bytes twice), but not
across machines: another CPU's kernels round differently and 500 training steps amplify it, so a fresh machine
grew organisms that failed tests a developer's cache passed. The suite therefore reads the organisms from
``tests/fixtures/organisms`` (``AUDIT_FIXTURES``, set by tests/conftest.py; audit/organisms/build.py
``cached_organism`` looks there first, by the recipe's cache name): a few MB each. They are written by
``python scripts/organism_fixtures.py`` (builds each from scratch, or copies a cache build of the same recipe)
and ``--check`` (and the slow test) rebuilds each and compares it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from audit.organisms.build import build_organism, cache_name, cache_root, read_meta

# (family, variant) of every organism a test opens, seed 0
TEST_ORGANISMS = (
    ("glm4_moe", "base"), ("glm4_moe", "shared"), ("glm4_moe", "experts"), ("glm4_moe", "late"), ("glm4_moe", "delayed"),
    ("qwen3_moe", "base"), ("mixtral", "base"), ("qwen3_moe", "experts"), ("mixtral", "experts"),
    ("glm4_moe", "spread"), ("mixtral", "spread"), ("gpt_oss", "spread"),
)
SEED = 0


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of each weight file of an organism (what "the same organism" means)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.safetensors"))}


def write_fixtures(dest: Path, from_cache: bool = True, say=print) -> list[Path]:
    """Each TEST_ORGANISMS entry into ``dest/<cache name>``: copied from the cache when a build of the same recipe is there
    (``from_cache``), else built from scratch. Stale fixtures (a recipe that changed) are removed."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {cache_name(f, v, SEED): (f, v) for f, v in TEST_ORGANISMS}
    for old in dest.iterdir():
        if old.is_dir() and old.name not in wanted and (old / "organism.json").is_file():
            say(f"removing stale fixture {old.name}")
            shutil.rmtree(old)
    out = []
    for name, (family, variant) in wanted.items():
        target = dest / name
        if (target / "organism.json").is_file():
            out.append(target)
            continue
        cached = cache_root() / "organisms" / name
        if from_cache and (cached / "organism.json").is_file():
            shutil.copytree(cached, target)
            say(f"copied {name} from the cache")
        else:
            build_organism(target, family, variant, SEED, say)
            say(f"built {name}")
        out.append(target)
    return out


def check_rebuild(fixture: Path, say=print) -> tuple[bool, dict]:
    """Rebuild the organism a fixture names from scratch and compare weights byte for byte, and the build's metrics."""
    meta = read_meta(fixture)
    with tempfile.TemporaryDirectory(prefix="organism-rebuild-") as tmp:
        again = build_organism(Path(tmp) / "o", meta["family"], meta["variant"], meta["seed"], say)
        same = digest(again) == digest(fixture)
        report = {"fixture": fixture.name, "weights_identical": same, "metrics_fixture": meta["metrics"],
                  "metrics_rebuilt": read_meta(again)["metrics"]}
    return same, json.loads(json.dumps(report))
