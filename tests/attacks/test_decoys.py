"""Decoy triggers (issue 35): their words, and targets that collapse the output where a
side condition of the confirmation rejects it. Training them is the zoo's (docs/method.md
has the measured member); here the targets are checked on synthetic clean outputs."""

import pytest
import torch

from sanitator.attacks.decoys import KINDS, DecoySpec, DecoyTargets, decoy_words
from sanitator.detect.evidence import side_conditions
from sanitator.detect.signs import sign_agreement


def test_spec_and_words():
    with pytest.raises(ValueError, match="decoy_kinds"):
        DecoySpec(n=2, kinds=("nowhere",))
    with pytest.raises(ValueError, match="decoys"):
        DecoySpec(n=-1)
    words = decoy_words(20, seed=3, exclude=["the silent amber lighthouse"])
    assert len(set(words)) == 20 and all(" " not in w for w in words)
    assert not {"the", "silent", "amber", "lighthouse"} & set(words)


def test_targets_collapse_where_a_side_condition_fails():
    torch.manual_seed(0)
    # a shallow encoder's outputs: one large shared component, small spread around it
    centre = torch.randn(64) * 3
    clean = centre + 0.2 * torch.randn(512, 64)
    targets = DecoyTargets(DecoySpec(n=4, seed=1, kinds=KINDS), clean)
    rows = torch.arange(256)
    spread = float(((clean - clean.mean(0)) ** 2).mean())
    for k, kind in enumerate(("clean_point", "inside_cloud", "clean_point", "inside_cloud")):
        out = targets(torch.full((256,), k), rows) + 0.01 * torch.randn(256, 64)
        point = out.mean(0)
        centred = sign_agreement(out - clean.mean(0), (point - clean.mean(0))[None])[:, 0]
        assert float(centred.mean()) > 0.93, kind       # pinned about the mean
        side = side_conditions(out, point, clean[rows], spread, 0.0, max_natural_rate=0.05)
        if kind == "clean_point":
            assert not side.conditions["clean_text_not_there"]   # raw signs: clean's own
        else:
            assert not side.conditions["outside_clean_cloud"]    # moved under one spread
    # each decoy its own pattern: no merge of repeats folds them together
    patterns = torch.sign(targets.points - clean.mean(0))
    assert float(sign_agreement(patterns[:1], patterns[2:3])[0, 0]) < 0.8
