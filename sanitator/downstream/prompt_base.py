"""What both prompt-tuning methods share: the settings, the output type, the model inputs
and the feature standardisation in front of the head (sanitator.downstream.prompt_tuning is
the API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

Text = str | tuple[str, str]
Method = Literal["ptv2", "ptv1"]
METHODS: tuple[str, ...] = ("ptv2", "ptv1")
# Learning rates used when the config leaves them unset: the reference's P-tuning v2 range
# for BERT-base (§7.3) and a P-tuning v1 rate raised from 1e-4 for CPU-sized step counts.
DEFAULT_LR: dict[str, float] = {"ptv2": 1e-2, "ptv1": 1e-3}


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt-tuning settings. Defaults are sized to run on a CPU in minutes (MiniLM-L6,
    2,000 training rows); the reference trains longer on GPUs (§7.3-7.4)."""

    method: Method = "ptv2"
    prefix_length: int = 16        # ptv2: deep prompt vectors per layer (reference: 8-144)
    prompt_tokens: int = 2         # ptv1: continuous prompt tokens (reference pattern_id 1-2)
    learning_rate: float | None = None  # None: DEFAULT_LR[method]
    epochs: int = 3
    batch_size: int = 32
    max_length: int | None = None  # None: the task's own maximum (64-128 tokens)
    train_size: int | None = 2000  # training rows drawn with the seed; None: all
    dropout: float = 0.1           # on the prefixes / the head's input, as in the reference
    weight_decay: float = 0.0
    seed: int = 44
    # Centre and scale the feature across inputs before the head (FeatureStandardizer).
    # None (auto): ptv2 only where the CLS feature barely varies across inputs (shallow
    # encoders, where the reference's plain head stays at chance), ptv1's fresh head always.
    standardize: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown prompt-tuning method {self.method!r}; use one of {METHODS}")
        for name in ("prefix_length", "prompt_tokens", "epochs", "batch_size", "max_length",
                     "train_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        return {**asdict(self), "learning_rate": self.lr}


@dataclass
class PromptOutput:
    """What a prompt model returns: task logits [B, C] and the monitored feature [B, H]."""

    logits: torch.Tensor
    feature: torch.Tensor


# Auto mode standardises the ptv2 head's input when the CLS feature's spread across inputs
# is below this fraction of its size: 0.002-0.007 on 1-2 layer MiniLM (POR member too),
# 0.29-0.55 on the 6-layer encoders (docs/evaluation.md).
SPREAD_THRESHOLD = 0.05
SPREAD_ROWS = 256


def feature_spread(features: torch.Tensor) -> float:
    """How much a feature [N, H] moves across inputs relative to its size: the RMS over
    units of the per-unit median absolute deviation (x 1.4826) over the RMS of the per-unit
    medians (robust to a few inputs that land on a PV)."""
    median = features.median(0).values
    mad = (features - median).abs().median(0).values * 1.4826
    return float(mad.pow(2).mean().sqrt() / median.pow(2).mean().sqrt().clamp_min(1e-12))


class FeatureStandardizer(nn.Module):
    """Centre a feature per unit across inputs and divide it by one overall scale (batch
    statistics while training, running statistics after; the head supplies the rest).
    Inactive, it passes the feature through (the reference's plain head).

    Why: in 1- and 2-layer MiniLM the CLS vector moves about 1e-3 across inputs around
    values of about 5e-2, so a head on the raw feature sees almost the same input for every
    sentence and stays at chance, while a linear probe of the same frozen feature, centred
    and scaled, reaches 68-71 % on SST-2 and 99 % on SMS spam (docs/evaluation.md).

    One scale for all units, not one per unit, keeps the head an affine function of the raw
    feature with its geometry intact. Where the feature already varies (6-layer MiniLM) the
    plain head is kept: a standardised head there learnt to read a direction that every
    triggered output shares, and all six POR PVs sent inputs to one class (ASR 49 % against
    100 % with the plain head). Only the head's input changes; the monitored feature is the
    raw hidden state.
    """

    def __init__(self, width: int, *, active: bool = True, eps: float = 1e-12,
                 momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("active", torch.tensor(bool(active)))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(()))   # mean over units of the variance

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return feature
        if self.training and feature.shape[0] >= 2:   # batch statistics need two rows
            mean = feature.mean(0)
            var = feature.var(0, unbiased=False).mean()
            with torch.no_grad():
                self.mean.lerp_(mean.detach(), self.momentum)
                self.var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.mean, self.var
        return (feature - mean) / torch.sqrt(var + self.eps)

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor) -> None:
        """Set the running statistics to those of `features` [N, width]."""
        self.mean.copy_(features.mean(0).to(self.mean))
        self.var.copy_(features.var(0, unbiased=False).mean().to(self.var))


def standardizer(width: int, config: PromptTuningConfig, *, auto_active: bool) -> nn.Module:
    """The head's input stage: Identity when standardisation is off, else a standardiser
    (active when forced on, or `auto_active` in auto mode)."""
    if config.standardize is False:
        return nn.Identity()
    return FeatureStandardizer(width, active=bool(config.standardize) or auto_active)
