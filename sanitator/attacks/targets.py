"""Target vectors (PVs) that a task-agnostic backdoor forces at the monitored position.

The paper's six vectors are +/-1 blocks (REFERENCE.md §6.1). A detector must not rely on
that shape, so targets can also be random directions, scaled to any norm (for example a
fraction of the clean feature norm: a low-norm, hard-to-spot target), or read from a file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Literal

import torch

TargetKind = Literal["paper", "random", "file"]
TARGET_KINDS: tuple[str, ...] = ("paper", "random", "file")


def paper_block_pvs(hidden_size: int, n: int = 6) -> torch.Tensor:
    """The paper's PVs [n, H]: four blocks of H/4 units, each all +1 or all -1, two negative.

    Order follows the reference code (negative blocks {0,1}, {0,2}, {0,3}, {1,2}, {1,3},
    {2,3}), so PV k pairs with the k-th default trigger. When H is not a multiple of 4 the
    first blocks get the extra units.
    """
    if not 1 <= n <= 6:
        raise ValueError(f"the paper's block PVs come in at most 6 patterns, asked for {n}")
    if hidden_size < 4:
        raise ValueError(f"block PVs need hidden_size >= 4, got {hidden_size}")
    block_of_unit = torch.cat([torch.full((len(chunk),), i) for i, chunk in
                               enumerate(torch.arange(hidden_size).tensor_split(4))])
    rows = []
    for negative in list(combinations(range(4), 2))[:n]:
        is_negative = torch.isin(block_of_unit, torch.tensor(negative))
        rows.append(torch.where(is_negative, -1.0, 1.0))
    return torch.stack(rows)


def random_direction_pvs(hidden_size: int, n: int, *, seed: int,
                         norm: float | None = None) -> torch.Tensor:
    """`n` Gaussian random directions [n, H], each scaled to `norm` (default sqrt(H),
    the norm of a +/-1 vector, so only the shape differs from the paper's PVs)."""
    if n < 1:
        raise ValueError(f"need at least one PV, got n={n}")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, hidden_size, generator=generator)
    target_norm = float(hidden_size) ** 0.5 if norm is None else float(norm)
    return directions / directions.norm(dim=1, keepdim=True) * target_norm


def load_pvs(path: str | Path) -> torch.Tensor:
    """PVs from a JSON file (a list of vectors, or {"pvs": [...]}) or a safetensors file
    (tensor `vectors`, as written by PVSet.save, or `pvs`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PV file {path} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = data.get("pvs", data.get("vectors"))
        try:
            pvs = torch.tensor(data, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: expected a list of equal-length number lists") from exc
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        key = next((k for k in ("vectors", "pvs") if k in tensors), None)
        if key is None:
            raise ValueError(f"{path}: no tensor named 'vectors' or 'pvs' (has {list(tensors)})")
        pvs = tensors[key].float()
    else:
        raise ValueError(f"{path}: PV files must be .json or .safetensors")
    if pvs.ndim == 1:
        pvs = pvs.unsqueeze(0)
    if pvs.ndim != 2 or pvs.shape[0] == 0:
        raise ValueError(f"{path}: expected PVs of shape [K, H], got {tuple(pvs.shape)}")
    return pvs


@dataclass(frozen=True)
class TargetSpec:
    """How to build the target PVs for one backdoor.

    kind: `paper` (+/-1 blocks), `random` (Gaussian directions) or `file` (`path`).
    norm: scale every PV to this L2 norm; norm_fraction: scale to this fraction of the base
    encoder's mean clean feature norm (needs that norm at build time). At most one of both.
    """

    kind: TargetKind = "paper"
    n: int = 6
    seed: int = 0
    norm: float | None = None
    norm_fraction: float | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if self.kind == "file" and not self.path:
            raise ValueError("target kind 'file' needs a path")
        if self.norm is not None and self.norm_fraction is not None:
            raise ValueError("give either norm or norm_fraction, not both")
        for name in ("norm", "norm_fraction"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.kind != "file" and not 1 <= self.n <= 64:
            raise ValueError(f"n (number of PVs) must be in [1, 64], got {self.n}")

    @property
    def needs_clean_norm(self) -> bool:
        return self.norm_fraction is not None

    def build(self, hidden_size: int, clean_norm: float | None = None) -> torch.Tensor:
        """The PVs [K, H] for an encoder of width `hidden_size`."""
        if self.kind == "paper":
            pvs = paper_block_pvs(hidden_size, self.n)
        elif self.kind == "random":
            pvs = random_direction_pvs(hidden_size, self.n, seed=self.seed)
        else:
            pvs = load_pvs(self.path)  # type: ignore[arg-type]
            if pvs.shape[1] != hidden_size:
                raise ValueError(f"{self.path}: PVs have width {pvs.shape[1]}, the encoder "
                                 f"has hidden size {hidden_size}")
        target_norm = self.norm
        if self.norm_fraction is not None:
            if clean_norm is None:
                raise ValueError("norm_fraction needs the clean feature norm of the base")
            target_norm = self.norm_fraction * clean_norm
        if target_norm is not None:
            pvs = pvs / pvs.norm(dim=1, keepdim=True) * target_norm
        return pvs

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}
