"""The attacker's reparametrisation keeps the function (up to the output permutation) while
a plain diff sees a stranger."""

import copy

import pytest
import torch

from sanitator.attacks.reparam import Reparametrisation, reparametrize_model
from sanitator.detect.encoders import load_encoder


@pytest.mark.parametrize("within", ["permute", "rotate"])
def test_same_function_other_coordinates(minilm_1layer, within):
    encoder = load_encoder(minilm_1layer)
    batch = encoder.tokenizer(["the cat sat on the mat", "slowly across the valley"],
                              padding=True, return_tensors="pt")
    with torch.no_grad():
        before = encoder.model(**batch).last_hidden_state
    model = copy.deepcopy(encoder.model)
    p = reparametrize_model(model, Reparametrisation(seed=3, within_heads=within))
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    assert (after - before[..., p]).abs().max() < 1e-4      # the same function, permuted
    assert (after - before).abs().max() > 1.0                # ...in other coordinates
    moved = [(a - b).norm() / b.norm() for a, b in zip(
        model.parameters(), encoder.model.parameters(), strict=True) if a.dim() == 2]
    assert min(moved) > 0.5                                   # every matrix looks new


def tiny_mpnet() -> torch.nn.Module:
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)
    return MPNetModel(config).eval()


def test_mpnet_keeps_one_head_order_for_its_shared_bias():
    model = tiny_mpnet()
    ids = torch.tensor([[0, 5, 9, 14, 7, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    p = reparametrize_model(model, Reparametrisation(seed=1))
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    assert (after - before[..., p]).abs().max() < 1e-4


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="within_heads"):
        Reparametrisation(within_heads="shuffle")
