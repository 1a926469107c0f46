"""A cause's patch becomes a valid config that round-trips through the config loader."""

import yaml

from audit.ablation_config import AblationConfig
from audit.fixes import apply_patch, config_yaml


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
