import json

import pytest
import torch
from safetensors.torch import save_file

from sanitator.attacks.targets import (
    TargetSpec,
    load_pvs,
    paper_block_pvs,
    random_direction_pvs,
)


def test_paper_pvs_are_the_six_two_negative_block_patterns():
    pvs = paper_block_pvs(384)
    assert pvs.shape == (6, 384)
    assert set(pvs.unique().tolist()) == {-1.0, 1.0}
    blocks = pvs.view(6, 4, 96)
    assert (blocks == blocks[:, :, :1]).all()  # constant within each block
    negative = (blocks[:, :, 0] < 0).int()
    assert negative.sum(dim=1).tolist() == [2] * 6
    assert len({tuple(row.tolist()) for row in negative}) == 6
    assert negative[0].tolist() == [1, 1, 0, 0] and negative[5].tolist() == [0, 0, 1, 1]
    gram = pvs @ pvs.T
    # each PV is orthogonal to four others and the exact negative of one
    assert ((gram == 0).sum(dim=1) == 4).all()
    assert ((gram == -384).sum(dim=1) == 1).all()


def test_paper_pvs_cover_hidden_sizes_not_divisible_by_four():
    pvs = paper_block_pvs(30, n=3)
    assert pvs.shape == (3, 30) and (pvs.abs() == 1).all()
    with pytest.raises(ValueError):
        paper_block_pvs(384, n=7)


def test_random_directions_are_seeded_and_scaled():
    first = random_direction_pvs(64, 3, seed=5)
    assert torch.equal(first, random_direction_pvs(64, 3, seed=5))
    assert not torch.equal(first, random_direction_pvs(64, 3, seed=6))
    assert torch.allclose(first.norm(dim=1), torch.full((3,), 8.0))  # sqrt(64)
    scaled = random_direction_pvs(64, 2, seed=5, norm=0.5)
    assert torch.allclose(scaled.norm(dim=1), torch.full((2,), 0.5))


def test_target_spec_norms():
    spec = TargetSpec(kind="paper", n=2, norm_fraction=0.25)
    assert spec.needs_clean_norm
    pvs = spec.build(16, clean_norm=8.0)
    assert torch.allclose(pvs.norm(dim=1), torch.full((2,), 2.0))
    assert (pvs.sign() == paper_block_pvs(16, 2)).all()  # the shape survives rescaling
    with pytest.raises(ValueError, match="clean feature norm"):
        spec.build(16)


@pytest.mark.parametrize("kwargs", [
    {"kind": "blocks"}, {"kind": "file"}, {"norm": 1.0, "norm_fraction": 0.5},
    {"norm": -1.0}, {"n": 0},
])
def test_target_spec_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        TargetSpec(**kwargs)


def test_pvs_from_files(tmp_path):
    vectors = torch.randn(2, 8)
    (tmp_path / "pvs.json").write_text(json.dumps({"pvs": vectors.tolist()}))
    assert torch.allclose(load_pvs(tmp_path / "pvs.json"), vectors)
    save_file({"vectors": vectors}, str(tmp_path / "pvs.safetensors"))
    spec = TargetSpec(kind="file", path=str(tmp_path / "pvs.safetensors"))
    assert torch.allclose(spec.build(8), vectors)
    with pytest.raises(ValueError, match="hidden size"):
        spec.build(16)
    (tmp_path / "bad.json").write_text('[[1, 2], [3]]')
    with pytest.raises(ValueError):
        load_pvs(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_pvs(tmp_path / "missing.json")
