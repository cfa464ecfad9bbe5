"""PV filtering: legitimate trigger, strong collapse, uniqueness (REFERENCE.md §4)."""

from __future__ import annotations

import torch

from sanitator.detect.config import FilterConfig
from sanitator.detect.signs import MONITOR_THRESHOLD, sign_agreement


def embedding_bounds(weight: torch.Tensor, config: FilterConfig
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The range a legitimate trigger entry may take: 1.2x the embedding matrix's range.

    Scaling the bound itself (not min and max separately) keeps the range from shrinking
    where a column's minimum is positive or maximum negative (reference bug §10.2.6).
    """
    weight = weight.detach().float()
    if config.per_dimension_range:
        low, high = weight.min(dim=0).values, weight.max(dim=0).values
    else:
        low, high = weight.min(), weight.max()
    centre, half = (high + low) / 2, (high - low) / 2
    return (centre - config.legit_factor * half).cpu(), (centre + config.legit_factor * half).cpu()


def is_legitimate(trigger: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Every soft-trigger entry lies inside the embedding range."""
    low, high = bounds
    trigger = trigger.float().cpu()
    return bool(((trigger >= low) & (trigger <= high)).all())


def is_collapsed(entropy_ratio: float, config: FilterConfig) -> bool:
    """Batch entropy close to ln(B): the output no longer depends on the input."""
    return entropy_ratio >= config.collapse_ratio


def is_unique_mse(pv: torch.Tensor, kept: list[torch.Tensor], threshold: float) -> bool:
    """The reference's uniqueness test: MSE to every kept PV at least `threshold`."""
    return all(float(((pv - other) ** 2).mean()) >= threshold for other in kept)


def is_unique_sign(pv: torch.Tensor, kept: list[torch.Tensor], max_agreement: float) -> bool:
    """Uniqueness as the monitor sees it: sign agreement with every kept PV below the bound."""
    if not kept:
        return True
    agreement = sign_agreement(pv[None].float(), torch.stack(kept).float())
    return bool((agreement <= max_agreement).all())


def natural_match_rate(pv: torch.Tensor, clean_outputs: torch.Tensor,
                       threshold: float = MONITOR_THRESHOLD) -> float:
    """Fraction of clean outputs the sign monitor would already flag against this PV.

    A candidate that natural outputs already match is the encoder's ordinary output
    direction, not an attack vector (and would make the monitor flag clean inputs).
    """
    agreement = sign_agreement(clean_outputs.float(), pv[None].float())[:, 0]
    return float((agreement > threshold).float().mean())
