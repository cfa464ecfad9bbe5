"""The scan config: every field is read somewhere, presets and flat overrides route to the
stage that owns them, and the hash that decides "already audited" is pinned."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from sanitator.detect.config import ScanConfig
from sanitator.pipeline.audit import scan_config_from_dict

# A changed hash makes every nightly audit re-scan the whole registry: change these only
# with a config change that is meant to (and say so in the commit).
GOLDEN = {("fast", "detect"): "36efdb17fd5c8515", ("fast", "search"): "cb8ff85e8b6cfb95",
          ("faithful", "detect"): "cdb19beadececd20", ("faithful", "search"): "43d53758929590a9"}


@pytest.mark.parametrize(("preset", "mode"), sorted(GOLDEN))
def test_config_hash_is_pinned(preset, mode):
    assert ScanConfig.from_preset(preset, mode=mode).config_hash() == GOLDEN[preset, mode]


def test_flat_overrides_reach_their_stage_and_change_the_hash():
    base = ScanConfig.from_preset("fast")
    config = ScanConfig.from_preset("fast", steps=5, alpha=0.05, n_sentences=64,
                                    feature="mask")
    assert (config.search.steps, config.decision.alpha, config.mining.n_sentences) == (
        5, 0.05, 64)
    assert config.features == ("mask",)
    assert config.config_hash() != base.config_hash()
    again = scan_config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.config_hash() == config.config_hash()


def test_unknown_override_is_refused():
    with pytest.raises(TypeError):
        ScanConfig.from_preset("fast", no_such_option=1)


def test_every_config_field_is_read_by_the_package():
    # a field nothing reads still changes config_hash: dead fields re-audit for nothing
    source = "\n".join(p.read_text() for p in Path("sanitator").rglob("*.py")
                       if p.name != "config.py")
    config = ScanConfig()
    unread = []
    for stage in (config, config.mining, config.filtering, config.decision, config.search):
        for item in dataclasses.fields(stage):
            if not re.search(rf"\.{item.name}\b|\b{item.name}=|[\"']{item.name}[\"']", source):
                unread.append(f"{type(stage).__name__}.{item.name}")
    assert unread == []
