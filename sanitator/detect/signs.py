"""Sign agreement: the one rule the scan, the attack measurement and the monitor share.

It lives in detect (not in guard) so the method's core can use it without importing the
deployment side: guard builds on detect, never the other way round.
"""

from __future__ import annotations

import torch

from sanitator.core.constants import MONITOR_THRESHOLD

__all__ = ["MONITOR_THRESHOLD", "sign_agreement", "signs"]


def signs(values: torch.Tensor) -> torch.Tensor:
    """+1/-1 signs with zero counted as positive, as floats (for matrix products)."""
    return torch.where(values >= 0, 1.0, -1.0).to(torch.float32)


def sign_agreement(outputs: torch.Tensor, pvs: torch.Tensor) -> torch.Tensor:
    """[B, K] fraction of hidden units whose signs agree, in one matrix product.

    agreement = (H + s(O) @ s(V)^T) / (2H), since each agreeing unit adds +1 and each
    disagreeing unit -1 to the dot product of sign vectors.
    """
    hidden = outputs.shape[-1]
    dots = signs(outputs) @ signs(pvs.to(outputs.device)).T
    return (hidden + dots) / (2 * hidden)
