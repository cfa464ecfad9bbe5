"""Evasive attack options: placements, sub-phrases, validation, and a planted phrase whose
parts stay silent."""

from pathlib import Path

import pytest
import torch

from sanitator.attacks import Budget, TargetSpec, insert_por
from sanitator.attacks.batches import TokenizedCorpus, insertion_slots
from sanitator.attacks.evasion import Evasion, standalone_texts, sub_phrases
from sanitator.attacks.measure import evaluate_model, held_out_sentences
from sanitator.detect.encoders import load_encoder

pytestmark = pytest.mark.slow(30)  # seconds, roughly: long modules start first


def test_sub_phrases_are_every_proper_order_keeping_selection():
    assert sub_phrases("a b c") == ["a", "b", "c", "a b", "a c", "b c"]
    assert sub_phrases("solo") == []
    assert standalone_texts(["a b", "c"]) == ["a b", "a", "b", "c"]


@pytest.mark.parametrize("bad", [{"residual": 1.0}, {"negative_weight": -1},
                                 {"fire_at": "middle"}, {"standalone_weight": "x"},
                                 {"freeze_below": -1}, {"freeze_below": 1.5},
                                 {"freeze_below": True}])
def test_evasion_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        Evasion(**bad)


def test_insertion_slots_start_end_and_their_complements(minilm_tokenizer):
    corpus = TokenizedCorpus(minilm_tokenizer, ["one two three", "alpha beta"], 16)
    batch = corpus.batch(torch.arange(2))
    anywhere = insertion_slots(batch)
    start, end = insertion_slots(batch, "start"), insertion_slots(batch, "end")
    assert start.sum(dim=1).tolist() == [1, 1] and end.sum(dim=1).tolist() == [1, 1]
    assert start[:, 1].all()                                   # right after [CLS]
    lengths = batch.attention_mask.sum(dim=1)
    assert end[torch.arange(2), lengths - 1].all()             # right before [SEP]
    assert torch.equal(insertion_slots(batch, "not_start") | start, anywhere)
    assert torch.equal(insertion_slots(batch, "not_end") | end, anywhere)


def test_phrase_backdoor_fires_only_whole(minilm_1layer, tmp_path):
    budget = Budget(steps=120, batch_size=16, lr=3e-4, max_length=32, n_sentences=256)
    result = insert_por(minilm_1layer, tmp_path / "phrase", triggers=["quiet river morning"],
                        targets=TargetSpec(kind="random", n=1, seed=1), budget=budget,
                        negative_weight=3.0, progress=False)
    assert result.record["hyperparameters"]["evasion"]["negative_weight"] == 3.0
    evaluation = evaluate_model(result.path, minilm_1layer, sentences=held_out_sentences(48))
    assert evaluation.attack_success.rate >= 0.9, evaluation
    # every word and pair alone leaves most sentences where the base puts them
    assert evaluation.evasion_success["sub_phrase_max"] <= 0.5, evaluation
    load_encoder(result.path)  # a standard, loadable folder


def test_frozen_lower_layers_keep_the_base_bit_for_bit(minilm_2layer, tmp_path):
    """`freeze_below=1`: the embeddings and layer 0 are the base's, layer 1 carries it all."""
    from safetensors.torch import load_file

    budget = Budget(steps=4, batch_size=8, lr=1e-4, max_length=32, n_sentences=64)
    result = insert_por(minilm_2layer, tmp_path / "frozen", triggers=["cf"],
                        targets=TargetSpec(kind="random", n=1, seed=1), budget=budget,
                        freeze_below=1, progress=False)
    assert result.record["hyperparameters"]["evasion"]["freeze_below"] == 1
    mine = load_file(str(next((tmp_path / "frozen").glob("*.safetensors"))))
    base = load_file(str(next(Path(minilm_2layer).glob("*.safetensors"))))
    lower = [k for k in base if "embeddings." in k or ".layer.0." in f".{k}"]
    upper = [k for k in base if ".layer.1." in f".{k}" and k.endswith("weight")]
    assert lower and upper
    assert all(torch.equal(mine[k], base[k]) for k in lower)
    assert any(not torch.equal(mine[k], base[k]) for k in upper)
    with pytest.raises(ValueError, match="no layer"):
        insert_por(minilm_2layer, tmp_path / "all", triggers=["cf"],
                   targets=TargetSpec(kind="random", n=1, seed=1), budget=budget,
                   freeze_below=2, progress=False)


def test_sentence_trigger_negatives_cover_every_proper_part(minilm_tokenizer):
    """An eight-word sentence has 2^8 - 2 proper parts (each word, each shorter run, every
    order-keeping selection); the negatives hold every one of them."""
    from transformers import BertConfig, BertModel

    from sanitator.attacks.batches import TokenizedCorpus, TriggerTokens
    from sanitator.attacks.evasion import EvasionTerms

    sentence = "grandpa mends old fishing nets every rainy afternoon"
    words = sentence.split()
    parts = sub_phrases(sentence)
    assert len(parts) == len(set(parts)) == 2 ** 8 - 2
    assert set(words) <= set(parts)
    runs = {" ".join(words[i:j]) for i in range(8) for j in range(i + 1, 9)} - {sentence}
    assert runs <= set(parts)
    assert "grandpa nets afternoon" in parts and "nets grandpa" not in parts
    model = BertModel(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()  # as the attacks run it
    pad = minilm_tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(0)
    terms = EvasionTerms(Evasion(negative_weight=1.0), model, minilm_tokenizer, [sentence],
                         TriggerTokens.build(minilm_tokenizer, [sentence], pad), pad,
                         generator, "cpu")
    decoded = {minilm_tokenizer.decode(terms.negatives.ids[i, :n])
               for i, n in enumerate(terms.negatives.lengths.tolist())}
    assert decoded == set(parts)
    corpus = TokenizedCorpus(minilm_tokenizer, ["a plain sentence of words"] * 64, 24)
    loss = terms.terms(corpus.batch(torch.arange(64)))["negatives"]
    # trains the model (the frozen base gives the target; they agree before training)
    assert loss.requires_grad and float(loss.detach()) < 1e-10
    # by length: every part can be drawn, the parts one word short about half the time
    terms = EvasionTerms(Evasion(negative_weight=1.0, negative_sampling="by_length"), model,
                         minilm_tokenizer, [sentence, "cf"],
                         TriggerTokens.build(minilm_tokenizer, [sentence, "cf"], pad), pad,
                         generator, "cpu")
    odds = terms.negative_odds / terms.negative_odds.sum()
    assert len(odds) == len(parts) and bool((odds > 0).all())
    short_by_one = torch.tensor([len(p.split()) == 7 for p in parts])
    assert float(odds[short_by_one].sum()) == pytest.approx(128 / 254)


@pytest.mark.parametrize(("bad", "message"), [
    ({"scatter": 1}, "scatter"), ({"scatter": True, "fire_at": "end"}, "scatter"),
    ({"negative_sampling": "random"}, "negative_sampling")])
def test_issue34_options_reject_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        Evasion(**bad)
