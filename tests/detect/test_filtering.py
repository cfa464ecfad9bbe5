import pytest
import torch

from sanitator.detect.config import FilterConfig
from sanitator.detect.filtering import (
    embedding_bounds,
    is_collapsed,
    is_legitimate,
    is_unique_mse,
    is_unique_sign,
    natural_match_rate,
)


def test_out_of_range_trigger_is_not_legitimate():
    weight = torch.tensor([[-1.0, 0.5], [0.2, 1.0]])
    bounds = embedding_bounds(weight, FilterConfig())
    assert is_legitimate(torch.tensor([[0.9, -1.1]]), bounds)
    assert not is_legitimate(torch.tensor([[0.0, 1.3]]), bounds)


def test_per_dimension_bounds_never_shrink_below_the_column_range():
    weight = torch.tensor([[0.5, -2.0], [1.0, -1.0]])  # column 0 all positive
    low, high = embedding_bounds(weight, FilterConfig(per_dimension_range=True))
    assert bool((low <= weight.min(dim=0).values).all())
    assert bool((high >= weight.max(dim=0).values).all())


def test_duplicate_pv_is_rejected_by_both_uniqueness_rules():
    pv = torch.randn(64)
    kept = [pv + 0.01 * torch.randn(64)]
    assert not is_unique_mse(pv, kept, threshold=0.1)
    assert not is_unique_sign(pv, kept, max_agreement=0.9)
    other = -pv
    assert is_unique_mse(other, kept, threshold=0.1)
    assert is_unique_sign(other, kept, max_agreement=0.9)


def test_collapse_is_relative_to_the_maximum_entropy():
    assert is_collapsed(0.999, FilterConfig())
    assert not is_collapsed(0.95, FilterConfig())


def test_natural_match_rate_counts_clean_outputs_matching_the_pv():
    clean = torch.ones(10, 8)
    clean[:3] = -1
    assert natural_match_rate(torch.ones(8), clean) == pytest.approx(0.7)
