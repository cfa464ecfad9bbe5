import math

import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.encoders import load_encoder
from sanitator.detect.mining import (
    batch_entropy,
    initial_triggers,
    mine_seeds,
    prepare_data,
    splice_triggers,
)


def test_splice_puts_each_trigger_at_each_rows_slot():
    batch, width, dim, length = 2, 5, 3, 2
    tokens = torch.arange(batch * width * dim, dtype=torch.float).reshape(batch, width, dim)
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    triggers = -torch.ones(2, length, dim)
    triggers[1] *= 2
    embeds, mask = splice_triggers(tokens, attention, torch.tensor([1, 3]), triggers)
    assert embeds.shape == (4, width + length, dim)
    # seed 0, row 0: token 0, trigger, then tokens 1..4
    assert torch.equal(embeds[0, 0], tokens[0, 0])
    assert torch.equal(embeds[0, 1:3], triggers[0])
    assert torch.equal(embeds[0, 3:], tokens[0, 1:])
    # seed 1, row 1: trigger at 3, padding keeps its zero mask after the trigger
    assert torch.equal(embeds[3, 3:5], triggers[1])
    assert torch.equal(embeds[3, :3], tokens[1, :3])
    assert mask[3].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert mask[0].tolist() == [1] * 7


def test_batch_entropy_is_maximal_for_identical_rows():
    identical = torch.ones(1, 8, 4) * torch.randn(1, 1, 4)
    varied = torch.randn(1, 8, 4) * 5
    assert math.isclose(float(batch_entropy(identical)[0]), math.log(8), rel_tol=1e-5)
    assert float(batch_entropy(varied)[0]) < math.log(8) - 0.1


def test_initial_triggers_follow_the_reference_rows(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    triggers = initial_triggers(encoder, [1, 2], 7)
    weight = encoder.word_embeddings.weight
    assert torch.equal(triggers[0, 0], weight[70])
    assert torch.equal(triggers[1, 6], weight[200])


def test_mining_is_deterministic_under_a_seed(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    mining = ScanConfig.from_preset("fast", steps_per_seed=4, n_sentences=32,
                                    n_holdout=16, batch_size=8).mining
    sentences = load_sentences(n=48)
    train = prepare_data(encoder, sentences[:32], mining, seed=1)
    holdout = prepare_data(encoder, sentences[32:], mining, seed=2)
    first = mine_seeds(encoder, train, holdout, [1, 2], mining)
    second = mine_seeds(encoder, train, holdout, [1, 2], mining)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.trigger, b.trigger)
        assert a.steps == 4
    assert not torch.equal(first[0].trigger, first[1].trigger)


def test_each_supported_architecture_mines_end_to_end(tiny_encoders):
    mining = ScanConfig.from_preset("fast", steps_per_seed=2, n_sentences=16, n_holdout=8,
                                    batch_size=8, parallel_seeds=2).mining
    sentences = load_sentences(n=24)
    for arch, path in tiny_encoders.items():
        if arch == "gpt2":
            continue
        encoder = load_encoder(path)
        train = prepare_data(encoder, sentences[:16], mining, seed=1)
        holdout = prepare_data(encoder, sentences[16:], mining, seed=2)
        outcomes = mine_seeds(encoder, train, holdout, [1, 2], mining)
        assert len(outcomes) == 2, arch
        assert outcomes[0].pv.shape == (encoder.hidden_size,), arch
        assert outcomes[0].trigger.shape == (7, encoder.embedding_size), arch
        assert math.isfinite(outcomes[0].distance), arch


def test_mask_feature_reads_the_mask_token(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    mining = ScanConfig.from_preset("fast", feature="mask", steps_per_seed=2, n_sentences=16,
                                    n_holdout=8, batch_size=8).mining
    sentences = load_sentences(n=24)
    train = prepare_data(encoder, sentences[:16], mining, seed=1)
    mask_id = encoder.tokenizer.mask_token_id
    for ids, position in zip(train.ids, train.mask_at.tolist(), strict=True):
        assert int(ids[position]) == mask_id
    holdout = prepare_data(encoder, sentences[16:], mining, seed=2)
    outcome = mine_seeds(encoder, train, holdout, [1], mining)[0]
    assert outcome.pv.shape == (encoder.hidden_size,)


def test_token_feature_reads_an_ordinary_word_never_the_trigger(minilm_1layer):
    from dataclasses import replace

    from sanitator.detect.mining import _forward

    encoder = load_encoder(minilm_1layer)
    mining = replace(ScanConfig.from_preset("fast", feature="token").mining, trigger_len=2)
    sentences = load_sentences(n=12)
    data = prepare_data(encoder, sentences, mining, seed=1)
    plain = encoder.tokenizer(sentences, truncation=True,
                              max_length=mining.max_length - mining.trigger_len)["input_ids"]
    for ids, want, read, slot in zip(data.ids, plain, data.mask_at.tolist(),
                                     data.insert_at.tolist(), strict=True):
        assert ids.tolist() == want                  # nothing replaced, unlike the mask
        assert 1 <= read <= len(want) - 2 and read != slot
    trigger = encoder.word_embeddings(torch.tensor([[2000, 2001]])).float()
    rows = list(range(len(data)))
    for placement in ("anywhere", "start", "end"):
        placed = data.placed(placement)
        out = _forward(encoder, placed, rows, trigger, mining)[0]
        # the word read keeps its own identity: its output stays nearer its clean output
        # than the trigger token's own output would be
        assert out.shape == data.clean.shape
        assert torch.nn.functional.cosine_similarity(out, data.clean).mean() > 0.5
