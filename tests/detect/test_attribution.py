"""Hard-token attribution: the candidate list, the vocabulary sweep, and the two statistics
that tell a backdoor trigger (sends every sentence to one point) from an ordinary word."""

import pytest
import torch

from sanitator.detect import attribution as at
from sanitator.detect.config import MiningConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.encoders import Feature, load_encoder
from sanitator.detect.mining import prepare_data

CONFIG = MiningConfig(max_length=32, batch_size=8)


@pytest.fixture(scope="module")
def encoder(minilm_1layer):
    return load_encoder(minilm_1layer)


@pytest.fixture(scope="module")
def holdout(encoder):
    return prepare_data(encoder, load_sentences(n=16, seed=5), CONFIG, seed=0)


def test_candidates_are_typable_tokens_then_multi_piece_words(encoder):
    ids = at.candidate_token_ids(encoder)
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert not set(ids.tolist()) & set(encoder.tokenizer.all_special_ids)
    assert not any(t.startswith("[") and t.endswith("]") for t in tokens)  # [unused7], [PAD]
    sequences = at.candidate_sequences(encoder, ["the", "misreading", "misreading"], 6)
    singles = [s for s in sequences if len(s) == 1]
    assert sequences[:len(singles)] == singles and len(singles) == len(ids)
    words = sequences[len(singles):]
    assert len(words) == 1 and 2 <= len(words[0]) <= 6  # "the" is one token, a duplicate once


def test_the_sweep_is_each_candidate_alone_between_the_special_tokens(encoder):
    tokenizer = encoder.tokenizer
    sequences = [(tokenizer.convert_tokens_to_ids("cf"),),
                 tuple(tokenizer(" misreading", add_special_tokens=False)["input_ids"]),
                 (tokenizer.convert_tokens_to_ids("the"),)]
    sweep = at.sweep_vocabulary(encoder, sequences, Feature.CLS, batch_size=2)
    for row, seq in zip(sweep, sequences, strict=True):
        ids = torch.tensor([[tokenizer.cls_token_id, *seq, tokenizer.sep_token_id]])
        alone = encoder.forward_features(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         feature=Feature.CLS)[0].float()
        torch.testing.assert_close(row, alone, atol=1e-4, rtol=1e-4)


def test_self_collapse_counts_sentences_sent_to_one_point():
    torch.manual_seed(0)
    clean = torch.randn(8, 64)
    point = torch.randn(64)
    override = point + 0.01 * torch.randn(8, 64)  # every sentence lands on one point
    shifted = clean + 0.05                        # an ordinary word: the sentences stay apart
    rates = at._self_collapse(torch.stack([override, shifted]), clean, 0.8)
    assert rates[0] == 1.0 and rates[1] == 0.0


def test_input_dependence_separates_a_shift_from_an_override():
    torch.manual_seed(0)
    clean = torch.randn(8, 64)
    shifted = 2.0 * clean + 1.0
    override = torch.randn(64) + 1e-3 * torch.randn(8, 64)
    dependence = at._input_dependence(torch.stack([shifted, override]), clean)
    assert dependence[0] == pytest.approx(1.0, abs=1e-5) and dependence[1] < 0.2


def test_hard_trigger_stats_agree_with_the_realised_output(encoder, holdout):
    tokenizer = encoder.tokenizer
    sequences = [(tokenizer.convert_tokens_to_ids("cf"),),
                 (tokenizer.convert_tokens_to_ids("mn"), tokenizer.convert_tokens_to_ids("tq"))]
    stats = at.hard_trigger_stats(encoder, holdout, sequences, CONFIG, batch_rows=8)
    assert stats.success.shape == (2,) and ((stats.success >= 0) & (stats.success <= 1)).all()
    assert (stats.displacement > 0).all()
    for index, seq in enumerate(sequences):
        realised = at.realised_output(encoder, holdout, torch.tensor([seq]), CONFIG, rows=8)
        torch.testing.assert_close(stats.realised[index], realised, atol=1e-4, rtol=1e-4)
