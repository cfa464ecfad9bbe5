"""The divergence beam: how far the audited model's states leave its reference's, and the
chains it grows."""

import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.divergence import Twin, grow
from sanitator.detect.encoders import load_encoder
from sanitator.detect.mining import prepare_data


def test_the_beam_climbs_a_sentence_that_repeats_a_word():
    target = (5, 1, 7, 1, 9)           # `the` (1) twice, as a sentence may hold it
    pool = [1, 2, 3, 5, 7, 9, 11]

    def score(orders):
        def held(chain):  # the longest run of the target the chain holds
            return max((j - i for i in range(len(chain)) for j in range(i + 1, len(chain) + 1)
                        if any(target[k:k + j - i] == chain[i:j] for k in range(len(target)))),
                       default=0)
        raw = torch.tensor([float(held(tuple(o.tolist()))) for o in orders])
        return torch.stack([raw - 0.01 * orders.shape[1], raw], dim=1)

    chains = grow(score, pool, width=3, max_length=7, min_gain=0.5)
    assert target in chains
    assert all(c[i] != c[i + 1] for c in chains for i in range(len(c) - 1))
    # once a length adds nothing, growth stops
    assert max(len(c) for c in chains) == 6
    assert grow(score, [], width=3, max_length=7) == []


def test_excess_is_one_against_itself_and_rises_for_a_changed_token(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    config = ScanConfig.from_preset("fast").mining
    data = prepare_data(encoder, load_sentences(None, n=8, seed=3), config, seed=1)
    twin = Twin(encoder, encoder.model, data, [0, 1, 2, 3])
    tokens = encoder.tokenizer.convert_tokens_to_ids(["valley", "river", "bridge"])
    assert torch.allclose(twin.excess(torch.tensor([tokens])), torch.ones(1))

    import copy

    reference = copy.deepcopy(encoder.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fine-tune moves everything a little
        for p in encoder.model.parameters():
            p.add_(0.005 * p.std() * torch.randn(p.shape, generator=g))
    rows = encoder.word_embeddings.weight.data
    rows[tokens[0]] += 0.5 * rows[tokens[0]].norm() * torch.nn.functional.normalize(
        torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
    rows[tokens[2]] += 0.1 * rows[tokens[2]].norm() * torch.nn.functional.normalize(
        torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(1)), dim=0)
    twin = Twin(encoder, reference, data, [0, 1, 2, 3])
    excess = twin.excess(torch.tensor([[tokens[0]], [tokens[1]], [tokens[2]]]))
    assert excess[0] > 2 * excess[2] and excess[2] > excess[1]
