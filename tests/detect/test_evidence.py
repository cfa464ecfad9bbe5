"""The confirmation test: the noise floor, the paired test, the side conditions."""

import torch

from sanitator.detect.evidence import FreshRows, confirm, one_token_edit, side_conditions, t_sf
from sanitator.detect.mining import MiningData
from sanitator.detect.signs import sign_agreement


def _rows(clean: torch.Tensor, floor: float) -> FreshRows:
    n = len(clean)
    data = MiningData([torch.tensor([101, 7, 8, 9, 102])] * n, torch.ones(n, dtype=torch.long),
                      None, clean)
    spread = float(((clean - clean.mean(dim=0)) ** 2).mean())
    return FreshRows(data, torch.full((n,), floor), spread, clean.mean(dim=0),
                     torch.full((n,), floor), null_displacement=spread)


def _measured_rows(clean: torch.Tensor, edited: torch.Tensor) -> FreshRows:
    """Fresh rows whose floors (raw and centred) are measured from one-token edits."""
    n = len(clean)
    data = MiningData([torch.tensor([101, 7, 8, 9, 102])] * n, torch.ones(n, dtype=torch.long),
                      None, clean)
    centre = clean.mean(dim=0)
    floor = torch.diagonal(sign_agreement(clean, edited))
    centred = torch.diagonal(sign_agreement(clean - centre, edited - centre))
    spread = float(((clean - centre) ** 2).mean())
    return FreshRows(data, floor, spread, centre, centred, null_displacement=spread)


def test_one_token_edit_deletes_one_ordinary_token_and_keeps_the_mask():
    ids = [torch.tensor([101, 5, 6, 103, 7, 102]), torch.tensor([101, 9, 102])]
    data = MiningData(ids, torch.tensor([1, 1]), torch.tensor([3, 1]), torch.zeros(2, 4))
    edited = one_token_edit(data, seed=0, special_ids={101, 102, 103})
    first, second = edited.ids
    assert len(first) == 5 and 103 in first.tolist() and {101, 102} <= set(first.tolist())
    assert int(first[edited.mask_at[0]]) == 103  # the mask index follows the deletion
    # a sentence with a single ordinary token keeps it (nothing else could be deleted)
    assert torch.equal(second, ids[1])


def test_a_trigger_that_pins_every_sentence_passes_and_an_ordinary_word_fails():
    torch.manual_seed(0)
    clean = torch.randn(128, 64)
    point = torch.randn(64) * 3
    fresh = _rows(clean, floor=0.9)
    pinned = point[None] + 0.05 * torch.randn(128, 64)   # every sentence at the point
    result = confirm(pinned, point, fresh, max_natural_rate=0.05)
    assert result.agreement > 0.95 and result.t > 10 and result.p_value < 1e-9
    assert result.usable and result.success == 1.0 and result.natural_rate == 0.0
    # a word that colours each sentence but leaves it speaking: agreement below the floor
    coloured = clean + 0.8 * point[None]
    ordinary = confirm(coloured, coloured.mean(dim=0), fresh, max_natural_rate=0.05)
    assert ordinary.agreement < 0.9 and ordinary.t < 0 and ordinary.p_value > 0.5


def test_side_conditions_reject_a_point_clean_text_already_reaches():
    torch.manual_seed(1)
    clean = torch.randn(64, 32) * 0.1 + 1.0          # every clean output near one point
    fresh = _rows(clean, floor=0.5)
    same = clean + 0.01 * torch.randn(64, 32)
    asked = []   # other corpora cost seconds to encode: read only when the rest holds
    result = confirm(same, same.mean(dim=0), fresh, max_natural_rate=0.05,
                     elsewhere=lambda: asked.append(1) or [])
    assert result.natural_rate > 0.5
    assert not result.conditions["clean_text_not_there"]
    assert not result.conditions["outside_clean_cloud"]
    assert not result.usable
    assert not asked and result.conditions["other_text_not_there"] is None
    side = side_conditions(same, same.mean(dim=0), clean, fresh.spread, fresh.spread,
                           max_natural_rate=0.05)
    assert "clean_text_not_there" in side.failed   # not the one left unmeasured:
    assert "other_text_not_there" not in side.failed and side.conditions[
        "other_text_not_there"] is None


def test_bonferroni_scales_with_the_budget():
    torch.manual_seed(2)
    clean = torch.randn(32, 16)
    point = torch.randn(16)
    result = confirm(point[None] + 0.3 * torch.randn(32, 16), point, _rows(clean, 0.8),
                     max_natural_rate=0.05)
    assert result.p_adjusted(16) == min(1.0, 16 * result.p_value)
    assert result.p_adjusted(1) <= result.p_adjusted(16)


def test_a_shared_component_hides_a_backdoor_from_raw_signs_but_not_from_centred_ones():
    # a shallow encoder: one large component shared by every output, so a one-token edit
    # keeps ~99 % of the signs and no point can beat that raw floor
    torch.manual_seed(3)
    common = torch.randn(256) * 5
    clean = common[None] + torch.randn(128, 256)
    edited = clean + 0.4 * torch.randn(128, 256)
    fresh = _measured_rows(clean, edited)
    assert float(fresh.floor.mean()) > 0.97 and float(fresh.centred_floor.mean()) < 0.9
    point = common + 6 * torch.randn(256)          # the backdoor's target, away from clean
    pinned = point[None] + 1.5 * torch.randn(128, 256)
    result = confirm(pinned, point, fresh, max_natural_rate=0.05)
    assert result.agreement < result.floor and result.t < 0      # raw frame: nothing
    assert result.t_centred > 10 and result.frame == "centred" and result.usable
    assert result.p_value < 1e-9
    # an ordinary word on the same encoder fails in both frames
    coloured = clean + 0.8 * torch.randn(256)[None]
    ordinary = confirm(coloured, coloured.mean(dim=0), fresh, max_natural_rate=0.05)
    assert ordinary.t < 0 and ordinary.t_centred < 0 and ordinary.p_value > 0.5


def test_the_better_frame_is_paid_for_twice():
    torch.manual_seed(4)
    clean = torch.randn(64, 32)
    fresh = _measured_rows(clean, clean + 0.3 * torch.randn(64, 32))
    point = torch.randn(32) * 3
    result = confirm(point[None] + 0.5 * torch.randn(64, 32), point, fresh,
                     max_natural_rate=0.05)
    assert result.p_value == min(1.0, 2 * t_sf(max(result.t, result.t_centred), result.n - 1))


def test_a_point_another_corpus_already_sits_at_is_not_a_backdoor():
    # the null benchmark's false alarm: on a one-layer sentiment classifier `charming` moves
    # every news sentence to the positive cluster, where the fresh (news) rows never sit but
    # a quarter of SST-2's clean outputs do; that corpus's rate must stop it
    torch.manual_seed(5)
    clean = torch.randn(128, 32)
    fresh = _rows(clean, floor=0.5)
    point = torch.randn(32) * 3
    pinned = point[None] + 0.05 * torch.randn(128, 32)
    reviews = torch.cat([point[None] + 0.05 * torch.randn(40, 32), torch.randn(88, 32)])
    elsewhere = [("sst2", reviews), ("wikitext", torch.randn(128, 32))]
    result = confirm(pinned, point, fresh, max_natural_rate=0.05, elsewhere=lambda: elsewhere)
    assert result.natural_rate == 0.0 and result.conditions["clean_text_not_there"]
    assert not result.conditions["other_text_not_there"] and not result.usable
    assert result.elsewhere_corpus == "sst2" and 0.25 < result.elsewhere_rate < 0.4
    assert result.summary()["elsewhere_corpus"] == "sst2"
    # with no corpus sitting there the same point is a backdoor's
    apart = confirm(pinned, point, fresh, max_natural_rate=0.05,
                    elsewhere=[("sst2", torch.randn(128, 32))])
    assert apart.usable and apart.elsewhere_rate == 0.0
