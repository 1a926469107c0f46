"""Write the test suite's organisms into tests/fixtures/organisms, or check that they rebuild byte for byte.

    python scripts/organism_fixtures.py            # copy cache builds of the current recipes (or build them), drop stale ones
    python scripts/organism_fixtures.py --rebuild  # build every fixture from scratch (about 75 s each; spread 10-30 min)
    python scripts/organism_fixtures.py --check    # rebuild each fixture in a temporary folder and compare the weights

See audit/organisms/fixtures.py for why the suite reads committed organisms. Builds use one torch thread (AUDIT_THREADS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.organisms.build import _torch_threads  # noqa: E402
from audit.organisms.fixtures import check_rebuild, write_fixtures  # noqa: E402

DEST = ROOT / "tests" / "fixtures" / "organisms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="build every fixture from scratch instead of copying cache builds")
    ap.add_argument("--check", action="store_true", help="rebuild each fixture in a temporary folder and compare")
    args = ap.parse_args(argv)
    _torch_threads()
    if args.check:
        bad = 0
        for f in sorted(p for p in DEST.iterdir() if (p / "organism.json").is_file()):
            same, report = check_rebuild(f, say=lambda s: None)
            bad += not same
            print(f"{'same' if same else 'DIFFERENT'}  {f.name}  {report['metrics_fixture']} / {report['metrics_rebuilt']}", flush=True)
        return 1 if bad else 0
    for p in write_fixtures(DEST, from_cache=not args.rebuild):
        print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
