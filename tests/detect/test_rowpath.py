"""The last layer run for the read rows only: the same features and gradients as the full
forward where the layer is BERT-shaped, the full forward everywhere else."""

import pytest
import torch

from sanitator.detect.encoders import Feature, load_encoder
from sanitator.detect.rowpath import RowPath

SENTENCES = ["the cat sat on the mat today", "short", "a somewhat longer sentence for the test"]


def _batch(encoder):
    tokens = encoder.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"], torch.tensor([2, 1, 4])


def _features(encoder, row_path: bool, feature: Feature, embeds=None):
    ids, mask, positions = _batch(encoder)
    encoder.row_path = row_path
    try:
        if embeds is None:
            return encoder.forward_features(attention_mask=mask, input_ids=ids,
                                            feature=feature, mask_positions=positions)
        return encoder.forward_features(attention_mask=mask, inputs_embeds=embeds,
                                        feature=feature, mask_positions=positions)
    finally:
        encoder.row_path = True


@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_bert_shaped_encoders_take_the_row_path_with_the_same_features(tiny_encoders, arch):
    encoder = load_encoder(tiny_encoders[arch])
    for feature in (Feature.CLS, Feature.MASK, Feature.TOKEN):
        fast = _features(encoder, True, feature)
        full = _features(encoder, False, feature)
        assert isinstance(encoder._row_path, RowPath)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    if arch != "electra":  # (ELECTRA has no pooler) the pooler: always the full forward
        torch.testing.assert_close(_features(encoder, True, Feature.POOLER),
                                   _features(encoder, False, Feature.POOLER))


@pytest.mark.parametrize("arch", ["distilbert", "albert", "deberta-v2"])
def test_other_layer_shapes_keep_the_full_forward(tiny_encoders, arch):
    encoder = load_encoder(tiny_encoders[arch])
    fast = _features(encoder, True, Feature.CLS)
    assert encoder._row_path is False
    torch.testing.assert_close(fast, _features(encoder, False, Feature.CLS))


def test_gradients_through_the_row_path_match_the_full_forward(minilm_1layer):
    # the context search's token gradients flow through input embeddings
    encoder = load_encoder(minilm_1layer)
    ids, _, _ = _batch(encoder)
    grads = []
    for row_path in (True, False):
        embeds = encoder.word_embeddings(ids).detach().requires_grad_(True)
        _features(encoder, row_path, Feature.CLS, embeds).tanh().sum().backward()
        grads.append(embeds.grad)
    assert isinstance(encoder._row_path, RowPath)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_layer_that_does_more_than_its_shape_says_keeps_the_full_forward(tiny_encoders):
    # a hook that changes the last layer's output: the row path would not see it, so the
    # first-use check must refuse the row path rather than return different features
    encoder = load_encoder(tiny_encoders["bert"])
    last = encoder.model.encoder.layer[-1]
    last.register_forward_hook(lambda module, args, output: output + 1.0)
    fast = _features(encoder, True, Feature.CLS)
    assert encoder._row_path is False
    torch.testing.assert_close(fast, _features(encoder, False, Feature.CLS))
