"""The committed organisms are what their recipes build: named by the current recipe, complete, and (slow) rebuilt byte for byte."""

from __future__ import annotations

import pytest

from audit.organisms import build as O
from audit.organisms.fixtures import SEED, TEST_ORGANISMS, check_rebuild, digest
from conftest import FIXTURES


def test_every_test_organism_is_a_fixture_of_the_current_recipe():
    """A recipe change renames its organism (the recipe's hash is in the name): the stale fixture is then missing here, and
    `python scripts/organism_fixtures.py` must be run, instead of tests quietly building on each machine."""
    have = {p.name for p in FIXTURES.iterdir() if (p / "organism.json").is_file()}
    wanted = {O.cache_name(f, v, SEED) for f, v in TEST_ORGANISMS}
    assert wanted <= have, f"missing fixtures (run scripts/organism_fixtures.py): {sorted(wanted - have)}"
    assert have <= wanted, f"stale fixtures: {sorted(have - wanted)}"
    for f, v in TEST_ORGANISMS:
        path = O.cached_organism(f, v, SEED)
        assert path.parent == FIXTURES  # found there, not built
        meta = O.read_meta(path)
        assert (meta["family"], meta["variant"], meta["seed"]) == (f, v, SEED) and meta["cache_name"] == path.name
        assert digest(path) and (path / "tokenizer.json").is_file() and (path / "prompts" / "eval.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family,variant", TEST_ORGANISMS)
def test_fixture_rebuilds_byte_for_byte(family, variant):
    """On this machine's torch build, one thread: the recipe rebuilds the committed weights exactly (run with -m slow; the
    spread organisms take 10-35 minutes each)."""
    same, report = check_rebuild(O.cached_organism(family, variant, SEED), say=lambda s: None)
    assert same, report
