import torch

from sanitator.attacks.batches import (
    RowSampler,
    TokenizedCorpus,
    TriggerTokens,
    concat_batches,
    insert_triggers,
    mask_one_token,
    mlm_masking,
    trigger_token_ids,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Unbelievably, tokenisation splits words.",
    "Short one here.",
    "A somewhat longer sentence with several ordinary words in it for testing.",
]


def test_trigger_tokens_take_their_mid_sentence_form(minilm_tokenizer, bpe_tokenizer):
    assert minilm_tokenizer.convert_ids_to_tokens(trigger_token_ids(minilm_tokenizer, "cf")) \
        == ["cf"]
    pieces = bpe_tokenizer.convert_ids_to_tokens(trigger_token_ids(bpe_tokenizer, "the"))
    assert pieces[0].startswith("Ġ")  # byte-level BPE marks the preceding space
    alone = bpe_tokenizer("the", add_special_tokens=False)["input_ids"]
    assert trigger_token_ids(bpe_tokenizer, "the") != alone


def test_word_starts_mark_whole_words_only(minilm_tokenizer):
    corpus = TokenizedCorpus(minilm_tokenizer, SENTENCES, max_length=32)
    tokens = minilm_tokenizer.convert_ids_to_tokens(corpus.input_ids[1])
    starts = corpus.word_start[1]
    for token, start, special in zip(tokens, starts.tolist(), corpus.special[1].tolist(),
                                     strict=True):
        if token.startswith("##") or token == "[PAD]" or token == "[CLS]":
            assert not start
        elif token == "[SEP]":
            assert start  # inserting before the closing separator appends a word
        elif not special:
            assert start


def _naive_insert(ids: list[int], trigger: list[int], start: int) -> list[int]:
    return ids[:start] + trigger + ids[start:]


def test_insert_triggers_matches_a_per_row_insertion(minilm_tokenizer):
    corpus = TokenizedCorpus(minilm_tokenizer, SENTENCES, max_length=32)
    triggers = TriggerTokens.build(minilm_tokenizer, ["cf", "bemoaning rupture"], corpus.pad_id)
    generator = torch.Generator().manual_seed(0)
    batch = corpus.batch(torch.arange(len(SENTENCES)))
    which = torch.tensor([0, 1, 1, 0])
    result = insert_triggers(batch, triggers, which, generator, corpus.pad_id)
    for row in range(len(SENTENCES)):
        real = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        trigger = triggers.ids[which[row], :triggers.lengths[which[row]]].tolist()
        span = result.trigger[row].nonzero().flatten()
        assert len(span) == len(trigger) and (span.diff() == 1).all()
        start = int(span[0])
        assert batch.word_start[row, start]  # inserted at a word boundary
        expected = _naive_insert(real, trigger, start)
        got = result.input_ids[row][result.attention_mask[row].bool()].tolist()
        assert got == expected
        assert not result.attention_mask[row, len(expected):].any()
        assert result.special[row, span].any().item() is False
    assert result.input_ids.shape[1] == int(result.attention_mask.sum(dim=1).max())


def test_insertion_positions_vary_and_are_seeded(minilm_tokenizer):
    corpus = TokenizedCorpus(minilm_tokenizer, SENTENCES[:1] * 50, max_length=32)
    triggers = TriggerTokens.build(minilm_tokenizer, ["cf"], corpus.pad_id)
    batch = corpus.batch(torch.arange(50))

    def starts(seed: int) -> list[int]:
        result = insert_triggers(batch, triggers, torch.zeros(50, dtype=torch.long),
                                 torch.Generator().manual_seed(seed), corpus.pad_id)
        return result.trigger.float().argmax(dim=1).tolist()

    assert starts(1) == starts(1)
    assert len(set(starts(1))) > 5


def test_masking_avoids_special_and_trigger_tokens(minilm_tokenizer):
    corpus = TokenizedCorpus(minilm_tokenizer, SENTENCES * 8, max_length=32)
    triggers = TriggerTokens.build(minilm_tokenizer, ["cf"], corpus.pad_id)
    generator = torch.Generator().manual_seed(2)
    batch = insert_triggers(corpus.batch(torch.arange(len(corpus))), triggers,
                            torch.zeros(len(corpus), dtype=torch.long), generator, corpus.pad_id)
    mask_id = minilm_tokenizer.mask_token_id
    masked, positions, original = mask_one_token(batch, mask_id, generator)
    rows = torch.arange(len(batch))
    assert (masked.input_ids[rows, positions] == mask_id).all()
    assert torch.equal(original, batch.input_ids[rows, positions])
    assert not (batch.special[rows, positions] | batch.trigger[rows, positions]).any()
    assert ((masked.input_ids != batch.input_ids).sum(dim=1) == 1).all()

    ids, labels = mlm_masking(batch, mask_id, len(minilm_tokenizer), generator)
    chosen = labels != -100
    assert chosen.any(dim=1).all()
    assert not (chosen & (batch.special | batch.trigger)).any()
    assert torch.equal(labels[chosen], batch.input_ids[chosen])
    assert torch.equal(ids[~chosen], batch.input_ids[~chosen])
    share = chosen.sum() / (~batch.special & ~batch.trigger).sum()
    assert 0.1 < float(share) < 0.35


def test_concat_and_sampler(minilm_tokenizer):
    corpus = TokenizedCorpus(minilm_tokenizer, SENTENCES, max_length=32)
    both = concat_batches(corpus.batch(torch.tensor([2])), corpus.batch(torch.tensor([3])),
                          corpus.pad_id)
    assert both.input_ids.shape[0] == 2
    assert both.attention_mask[0].sum() < both.attention_mask[1].sum()
    sampler = RowSampler(4, torch.Generator().manual_seed(0))
    drawn = sampler.take(4).tolist() + sampler.take(4).tolist()
    assert sorted(drawn[:4]) == [0, 1, 2, 3] and sorted(drawn[4:]) == [0, 1, 2, 3]


def test_scattered_words_land_at_independent_places(minilm_tokenizer):
    """Each word of a scattered trigger goes to its own word boundary: both orders occur,
    at many distances, and the words' places are not tied to each other."""
    from sanitator.attacks.batches import ScatteredTriggers

    n = 400
    corpus = TokenizedCorpus(minilm_tokenizer, [SENTENCES[3]] * n, max_length=32)
    scattered = ScatteredTriggers.build(minilm_tokenizer, ["cf bemoaning", "mn"],
                                        corpus.pad_id)
    bemoaning = trigger_token_ids(minilm_tokenizer, "bemoaning")
    assert len(bemoaning) > 1  # a word of several pieces stays whole
    assert [slot.lengths.tolist() for slot in scattered.words] == [[1, 1],
                                                                   [len(bemoaning), 0]]
    batch = corpus.batch(torch.arange(n))
    which = torch.zeros(n, dtype=torch.long)
    which[-50:] = 1
    result = scattered.insert(batch, which, torch.Generator().manual_seed(3), corpus.pad_id)
    cf = trigger_token_ids(minilm_tokenizer, "cf")
    first, second = [], []
    for row in range(n - 50):
        ids = result.input_ids[row][result.attention_mask[row].bool()].tolist()
        at = ids.index(cf[0])
        span = next(i for i in range(len(ids)) if ids[i:i + len(bemoaning)] == bemoaning)
        assert result.trigger[row].sum() == 1 + len(bemoaning)
        # taking the two words out gives the sentence back: nothing else moved
        rest = [t for i, t in enumerate(ids) if i != at and not span <= i < span + len(bemoaning)]
        assert rest == batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        first.append(at)
        second.append(span if span < at else span - 1)  # its slot in the sentence without cf
    first_t, second_t = torch.tensor(first, dtype=torch.float), torch.tensor(second,
                                                                          dtype=torch.float)
    assert (first_t < second_t).any() and (first_t > second_t).any()   # both orders
    assert len(set((second_t - first_t).tolist())) > 10                # many distances
    assert abs(float(torch.corrcoef(torch.stack([first_t, second_t]))[0, 1])) < 0.3
    # a one-word trigger in the same set is inserted once, as a plain trigger
    assert (result.trigger[-50:].sum(dim=1) == 1).all()
