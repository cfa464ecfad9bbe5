"""Audit results as plain data: a Verdict and a PVSet, serialisable without pickle."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sanitator.core.status import Status


@dataclass
class Verdict:
    """The outcome of one model audit.

    `score` is the probability that the model is backdoored (None when no verdict was
    reached); `evidence` records the signals and what each threshold was derived from.
    """

    status: Status
    score: float | None = None
    reason: str | None = None
    seeds_tried: int = 0
    steps: int = 0
    seconds: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(**data)


@dataclass
class PVSet:
    """Accepted predefined attack vectors (PVs) and how each was found.

    vectors [K, H]; triggers [K, L, E] (the optimised soft triggers; for a PV found by the
    vocabulary screen, seed -1, its real trigger's token embeddings, zero-padded); per-PV
    metadata in `seeds`, `losses` (final loss terms) and `trigger_tokens` (hard-token
    attribution).
    """

    vectors: torch.Tensor
    triggers: torch.Tensor
    seeds: list[int] = field(default_factory=list)
    losses: list[dict[str, Any]] = field(default_factory=list)
    trigger_tokens: list[list[str]] = field(default_factory=list)
    feature: str = "cls"
    # per PV: where the monitor must read it (cls, mask, pooler); empty means `feature`
    features: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.features:
            self.features = [self.feature] * len(self)
        if len(self.features) != len(self):
            raise ValueError(f"{len(self)} PVs but {len(self.features)} features")

    @classmethod
    def empty(cls, hidden_size: int, trigger_len: int = 0, embedding_size: int = 0,
              feature: str = "cls", features: list[str] | None = None) -> PVSet:
        return cls(torch.zeros(0, hidden_size), torch.zeros(0, trigger_len, embedding_size),
                   feature=feature)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def select(self, feature: str) -> PVSet:
        """The PVs the monitor reads at one feature (a P-tuning v1 model: `mask`)."""
        keep = [i for i, f in enumerate(self.features) if f == feature]
        return PVSet(self.vectors[keep], self.triggers[keep],
                     seeds=[self.seeds[i] for i in keep if i < len(self.seeds)],
                     losses=[self.losses[i] for i in keep if i < len(self.losses)],
                     trigger_tokens=[self.trigger_tokens[i] for i in keep
                                     if i < len(self.trigger_tokens)],
                     feature=feature, features=[feature] * len(keep))

    @property
    def signs(self) -> torch.Tensor:
        """Sign patterns [K, H] as bools (True = non-negative), the monitor's view of a PV."""
        return self.vectors >= 0

    def metadata(self) -> dict[str, str]:
        return {"seeds": json.dumps(self.seeds), "losses": json.dumps(self.losses),
                "trigger_tokens": json.dumps(self.trigger_tokens), "feature": self.feature,
                "features": json.dumps(self.features)}

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
        """Write a safetensors file (tensors + JSON metadata); never pickle."""
        tensors = {"vectors": self.vectors.contiguous().float(),
                   "triggers": self.triggers.contiguous().float()}
        save_file(tensors, str(path), metadata={**self.metadata(), **(extra_metadata or {})})

    @classmethod
    def load(cls, path: str | Path) -> PVSet:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        return cls(tensors["vectors"], tensors["triggers"],
                   seeds=json.loads(meta.get("seeds", "[]")),
                   losses=json.loads(meta.get("losses", "[]")),
                   trigger_tokens=json.loads(meta.get("trigger_tokens", "[]")),
                   feature=meta.get("feature", "cls"),
                   features=json.loads(meta.get("features", "[]")))
