"""The shared training loop and budget of the attacks."""

import pytest
import torch

from sanitator.attacks import Budget
from sanitator.attacks.common import train_loop


def _rates(lr_decay: bool) -> list[float]:
    weight = torch.nn.Parameter(torch.tensor([4.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    rates: list[float] = []

    def step() -> dict[str, torch.Tensor]:
        rates.append(optimizer.param_groups[0]["lr"])
        return {"loss": (weight ** 2).sum()}

    train_loop(step, [weight], optimizer, 10, desc="test", progress=False, lr_decay=lr_decay)
    return rates


def test_lr_decay_falls_linearly_to_zero():
    rates = _rates(lr_decay=True)
    assert rates == pytest.approx([0.1 * (1 - i / 10) for i in range(10)])
    constant = _rates(lr_decay=False)
    assert constant == pytest.approx([0.1] * 10)


def test_budget_rejects_a_non_boolean_decay():
    assert Budget(lr_decay=True).lr_decay is True
    with pytest.raises(ValueError, match="lr_decay"):
        Budget(lr_decay="yes")
