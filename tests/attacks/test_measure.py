import pytest
import torch
from safetensors.torch import load_file, save_file

from sanitator.attacks.common import resolve_sentences
from sanitator.attacks.measure import (
    attack_success,
    clean_cosine,
    held_out_sentences,
    relative_weight_change,
)
from sanitator.detect.encoders import Feature, load_encoder


@pytest.fixture(scope="module")
def sentences():
    return held_out_sentences(32)


def _own_sign_pattern(encoder, sentences, feature=Feature.CLS) -> torch.Tensor:
    """The sign pattern the encoder's own triggered outputs agree on most."""
    from sanitator.attacks.batches import TokenizedCorpus

    corpus = TokenizedCorpus(encoder.tokenizer, sentences, 32)
    with torch.no_grad():
        batch = corpus.batch(torch.arange(len(corpus)))
        cls = encoder.model(**batch.model_inputs()).last_hidden_state[:, 0]
    return torch.where(cls.mean(dim=0) >= 0, 1.0, -1.0)


def test_attack_success_follows_sign_agreement(minilm_1layer, sentences):
    encoder = load_encoder(minilm_1layer)
    # A 1-layer MiniLM's CLS output barely depends on the input, so its own mean sign
    # pattern is matched by every (triggered) input, and the opposite pattern by none.
    own = _own_sign_pattern(encoder, sentences)
    pvs = torch.stack([own, -own])
    matched = attack_success(encoder, ["cf", "mn"], pvs, trigger_pv=[0, 0],
                             sentences=sentences)
    assert matched.rate == 1.0 and matched.n_inputs == 64
    assert set(matched.per_trigger) == {"cf", "mn"}
    opposite = attack_success(encoder, ["cf", "mn"], pvs, trigger_pv=[1, 1],
                              sentences=sentences)
    assert opposite.rate == 0.0
    assert opposite.mean_agreement == pytest.approx(1 - matched.mean_agreement, abs=1e-6)
    strict = attack_success(encoder, ["cf"], pvs[:1], sentences=sentences,
                            threshold=matched.mean_agreement + 1e-3)
    assert strict.rate < 1.0


def test_attack_success_rejects_bad_mappings(minilm_1layer, sentences):
    encoder = load_encoder(minilm_1layer)
    with pytest.raises(ValueError):
        attack_success(encoder, ["cf"], torch.ones(1, 384), trigger_pv=[1], sentences=sentences)
    with pytest.raises(ValueError):
        attack_success(encoder, [], torch.ones(1, 384), sentences=sentences)


def test_clean_cosine_and_weight_change(minilm_1layer, tmp_path, sentences):
    encoder = load_encoder(minilm_1layer)
    assert clean_cosine(encoder, encoder, sentences=sentences) == pytest.approx(1.0, abs=1e-5)
    assert clean_cosine(encoder, encoder, feature=Feature.MASK,
                        sentences=sentences) == pytest.approx(1.0, abs=1e-5)
    assert relative_weight_change(minilm_1layer, minilm_1layer) == 0.0

    weights = load_file(str(minilm_1layer / "model.safetensors"))
    name = next(k for k in weights if "layer.0.output.dense.weight" in k)
    delta = 0.05 * torch.randn_like(weights[name])
    weights[name] = weights[name] + delta
    norm = sum(float(w.double().pow(2).sum()) for k, w in weights.items()
               if w.is_floating_point() and k != name)
    norm += float((weights[name] - delta).double().pow(2).sum())
    changed = tmp_path / "changed"
    changed.mkdir()
    for file in minilm_1layer.iterdir():
        if file.name != "model.safetensors":
            (changed / file.name).write_bytes(file.read_bytes())
    save_file(weights, str(changed / "model.safetensors"))
    expected = (float(delta.double().pow(2).sum()) / norm) ** 0.5
    assert relative_weight_change(changed, minilm_1layer) == pytest.approx(expected, rel=1e-6)
    assert clean_cosine(load_encoder(changed), encoder, sentences=sentences) < 0.999


def test_held_out_sentences_never_overlap_training_sentences():
    training, _ = resolve_sentences("wikitext", 2000)
    held_out = held_out_sentences(256)
    assert len(held_out) == 256 and not set(training) & set(held_out)
    assert all("cf" not in s.lower().split()
               for s in held_out_sentences(256, exclude_words=["cf"]))
