"""A cause's patch becomes a valid config that round-trips through the config loader."""

import yaml

from audit.intent.config import AblationConfig
from audit.intent.fixes import apply_patch, config_yaml


def _cfg():
    return AblationConfig.from_dict({"components": ["attn_out", "experts_down"], "ablate": [{"layer": "1-2", "measurement": 2, "scale": 0.5}]})


def test_patch_adds_components_layers_and_sets_measurement():
    base = _cfg()
    new = apply_patch(base, {"add_components": ["shared_down"], "add_layers": [3], "measurement": 3, "scale": 1.0})
    assert new.components == ("attn_out", "experts_down", "shared_down")
    assert [e.layer for e in new.entries] == [1, 2, 3]
    assert {e.measurement for e in new.entries} == {3} and {e.scale for e in new.entries} == {1.0}
    assert base.components == ("attn_out", "experts_down") and len(base.entries) == 2  # untouched


def test_embed_brings_a_layer_zero_entry_and_yaml_round_trips():
    new = apply_patch(_cfg(), {"add_components": ["embed"]})
    assert 0 in [e.layer for e in new.entries]
    text = config_yaml(new)
    again = AblationConfig.from_dict(yaml.safe_load(text))
    assert again.to_dict() == new.to_dict()


def test_patches_on_a_config_with_expert_subsets_and_split_layers():
    """What reached the weights may be finer than a config people write: several entries per layer, some experts."""
    cfg = AblationConfig.from_dict({"components": ["attn_out", "experts_down"], "ablate": [
        {"layer": 1, "measurement": 2, "components": ["attn_out"]},
        {"layer": 1, "measurement": 2, "components": ["experts_down"], "experts": [3], "scale": 0.9},
        {"layer": 2, "measurement": 2}]})
    every = apply_patch(cfg, {"all_experts": [1]})
    e1 = [e for e in every.entries if e.layer == 1]
    assert len(e1) == 1 and set(e1[0].components or every.components) == {"attn_out", "experts_down"} and e1[0].experts is None
    more = apply_patch(cfg, {"add": [{"targets": ["shared_down", "attn_out"], "layers": [1, 3]}]})
    by = {(e.layer, tuple(e.components or more.components), e.experts) for e in more.entries}
    assert (1, ("attn_out", "shared_down"), None) in by and (3, ("shared_down", "attn_out"), None) in by
    assert (1, ("experts_down",), (3,)) in by  # the expert subset stays as it was
    dropped = apply_patch(cfg, {"drop": [{"targets": ["attn_out"], "layers": [1, 2]}]})
    assert all("attn_out" not in (e.components or dropped.components) for e in dropped.entries)
    again = AblationConfig.from_dict(yaml.safe_load(config_yaml(more)))
    assert again.to_dict() == more.to_dict()
