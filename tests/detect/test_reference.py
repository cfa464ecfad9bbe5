"""The reference source: tokens ranked by what fine-tuning changed in the first layer, every
ordering of the most changed ones as one superstring, and the cut back to the part that
fires."""

from __future__ import annotations

import itertools

import pytest
import torch

from sanitator.detect.attribution import candidate_token_ids
from sanitator.detect.encoders import load_encoder
from sanitator.detect.reference import (
    frequent_tokens,
    match_reference,
    superstring,
    superstrings,
    trim,
)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_superstring_holds_every_ordering(n):
    symbols = [10 + i for i in range(n)]
    seq = superstring(symbols)
    parts = {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}
    assert all(p in parts for p in itertools.permutations(symbols))
    assert len(seq) <= {2: 3, 3: 9, 4: 35}[n]


def test_superstrings_shortest_first_and_fillers_added():
    out = superstrings([1, 2, 3, 4], fillers=[9, 3])
    assert [len(s) for s in out] == sorted(len(s) for s in out)
    assert any(9 in s for s in out)          # a filler joins the 2-3 most changed tokens
    assert all(len(set(s)) <= 4 for s in out)


def test_trim_cuts_to_the_part_that_fires():
    target = (5, 6, 7)
    point = torch.ones(4)

    def measure(part):
        fires = any(tuple(part[i:i + 3]) == target for i in range(len(part) - 2))
        return point, (0.1 if fires else -0.1)

    seq = (1, 2, 5, 6, 7, 3, 5, 6)
    assert trim(measure, seq, point, same=0.9) == target


def _first_layer_input(encoder, token: int) -> torch.Tensor:
    emb = encoder.model.embeddings
    x = emb.word_embeddings.weight[token] + emb.position_embeddings.weight[1:21].mean(0) \
        + emb.token_type_embeddings.weight[0]
    return torch.nn.functional.layer_norm(x, x.shape, emb.LayerNorm.weight, emb.LayerNorm.bias)


def test_the_token_the_change_acts_on_ranks_first(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    assert match_reference(encoder, (str(minilm_1layer),), allowed) is None  # the base itself

    token = int(encoder.tokenizer.convert_tokens_to_ids("valley"))
    x = _first_layer_input(encoder, token).detach()
    layer = encoder.model.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.attention.self.key):
        w = linear.weight
        # a rank-one change aimed at the token's input, plus small noise everywhere
        direction = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0))
        w.data += 0.05 * torch.outer(direction, x / x.norm()) * w.norm() / direction.norm()
        w.data += 1e-4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    found = match_reference(encoder, (str(minilm_1layer),), allowed)
    assert found is not None and 0 < found.change < 0.5
    assert found.top_tokens(3)[0] == token
    special = encoder.tokenizer.cls_token_id
    assert special not in set(allowed.tolist()) and found.scores[special] == 0


def test_unrelated_or_missing_bases_do_not_match(minilm_1layer, tiny_encoders, tmp_path):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    paths = (str(tiny_encoders["bert"]), str(tmp_path / "absent"))
    assert match_reference(encoder, paths, allowed) is None


def test_frequent_tokens_are_allowed_words(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    top = frequent_tokens(encoder, ["the cat and the dog", "the end of the day"], allowed, 2)
    assert top[0] == encoder.tokenizer.convert_tokens_to_ids("the")
    assert frequent_tokens(encoder, ["x"], allowed, 0) == []
