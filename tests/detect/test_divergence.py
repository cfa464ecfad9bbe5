"""The divergence beam: how far the audited model's states leave its reference's, and the
chains it grows."""

import itertools

import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.divergence import Memo, Twin, best_path, climb, kemeny, set_beam
from sanitator.detect.encoders import load_encoder
from sanitator.detect.mining import prepare_data


def test_pairwise_preferences_order_a_set_and_the_beam_finds_the_whole_sentence():
    target = [5, 1, 7, 3, 9]            # a sentence; its parts move the states by themselves
    pool = [1, 2, 3, 4, 5, 7, 9, 11]
    where = {t: i for i, t in enumerate(target)}

    def excess(seqs):
        out = []
        for seq in seqs:
            held = [t for t in seq if t in where]
            value = 1.0 + 0.3 * len(held) + 0.05 * len(seq)      # any part, any order
            pairs = [(a, b) for i, a in enumerate(held) for b in held[i + 1:]]
            value += 0.1 * sum(1 if where[a] < where[b] else -1 for a, b in pairs)
            if list(seq) == target:
                value += 10.0                                     # only the whole fires
            out.append(value)
        return torch.tensor(out)

    assert kemeny([9, 7, 5], {(5, 7): 1.0, (7, 5): -1.0, (7, 9): 1.0, (9, 7): -1.0,
                              (5, 9): 1.0, (9, 5): -1.0}) == [5, 7, 9]
    found = list(set_beam(excess, pool, width=3, max_length=6))
    assert target in found
    assert found.index(target) < len(found) - 1 or len(found[-1]) == 6
    assert list(set_beam(excess, [], width=3, max_length=6)) == []


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
    # swap gains are the excess's slope toward each token at each place: a small step of
    # the one-hot choice from the sequence toward a token changes the measured excess by
    # that much (finite difference), and a token in its own place gains nothing
    seq = [tokens[2], tokens[1]]
    vocab, gain = twin.swap_gains(seq, tokens)
    assert gain.shape == (2, len(vocab)) and torch.equal(gain[[0, 1], [2, 1]], torch.zeros(2))

    def measured(place, token, step):
        mixed = []
        for model in (encoder.model, reference):
            table = model.get_input_embeddings().weight.detach()
            rows_ = table[torch.tensor(seq)].clone()
            rows_[place] = (1 - step) * rows_[place] + step * table[token]
            mixed.append(twin._states(model, rows_[None]))
        with torch.no_grad():
            ratio = twin._gap(mixed[0][0], mixed[1][0], mixed[0][1], 1)[0] / twin.baseline
        return float(ratio.mean())
    step = 1e-2
    for place, token in ((0, tokens[0]), (1, tokens[0]), (1, tokens[2])):
        slope = (measured(place, token, step) - measured(place, token, -step)) / (2 * step)
        assert abs(slope - float(gain[place, vocab.index(token)])) < 0.1 * abs(slope) + 2e-3


def test_a_scan_with_a_reference_runs_the_beam_and_records_what_it_judged(minilm_1layer,
                                                                            tmp_path):
    # a stand-in fine-tune (every weight nudged) of a configured clean reference: the
    # reference stage finds nothing in the short orderings, so the divergence beam runs
    # (small: 3 tokens from a pool of 6 on 2 rows); nothing it grows fires, the model stays
    # clean, and the evidence names what was judged and what the beam cost
    from sanitator.detect.scan import scan_model

    audited = tmp_path / "audited"
    encoder = load_encoder(minilm_1layer)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in encoder.model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))
    encoder.model.save_pretrained(audited, safe_serialization=True)
    encoder.tokenizer.save_pretrained(audited)
    config = ScanConfig.from_preset(
        "fast", features=("cls",), screen_candidates=0, token_screen=0, restarts=0,
        references=(str(minilm_1layer),), reference_tokens=2, chain_width=0,
        divergence_length=3, divergence_width=2, divergence_pool=4, divergence_extra=1,
        divergence_screen=8, divergence_fillers=1, divergence_rows=2)
    verdict = scan_model(audited, config, progress=False).verdict
    assert verdict.status == "clean", verdict.evidence
    reference = verdict.evidence["reference"]
    assert reference["source"] == "configured" and 0 < reference["distance"] < 0.5
    judged = reference["long_triggers"]
    # each length's best order, polished, and the same with a filler repeated once
    assert judged and len(judged[0].split()) == 3, judged
    assert all(len(t.split()) in (3, 4) for t in judged), judged
    assert verdict.evidence["stage_seconds"]["reference.divergence"] > 0


def test_a_sentence_whose_only_trace_is_its_neighbours_is_ordered_along_them():
    # the model learned the sentence's adjacent pairs (each a real part of it); a pair of
    # words that are not neighbours in it measures like any two words, with noise of the
    # same size in each order: the pairwise margins then misplace words (kemeny alone
    # misses this one), and the order along the strongest neighbours finds it
    target = [8, 3, 6, 1, 9, 4, 2]
    neighbours = set(itertools.pairwise(target))
    pool = [1, 2, 3, 4, 6, 8, 9, 12]

    def noise(a, b):                    # fixed, per ordered pair, in [-1, 1]
        return ((a * 7919 + b * 104729) % 1000) / 500 - 1

    def excess(seqs):
        out = []
        for seq in seqs:
            value = 1.0 + 0.2 * sum(t in target for t in seq)
            value += sum(0.5 if pair in neighbours else 0.5 * noise(*pair)
                         for pair in itertools.pairwise(seq))
            out.append(value + (20.0 if list(seq) == target else 0.0))
        return torch.tensor(out)

    assert best_path([1, 2, 3], {(3, 1): 1.0, (1, 2): 1.0, (2, 3): 0.5}) == [3, 1, 2]
    assert best_path([5], {}) == [5]
    found = list(set_beam(excess, pool, width=3, max_length=7, polish=0))
    assert target in found, found


def test_the_climb_swaps_in_a_word_the_pool_lacks():
    # the model generalised the trigger's `sunday` to other days (20, 21: strong by
    # themselves), which take the beam's sets; the trigger's last word (30) is not in the
    # pool at all. Without the climb the whole sentence is never measured; the climb swaps
    # the gradient's best token in at each place and finds it
    target = [5, 1, 7, 30]
    pool = [1, 5, 7, 20, 21]
    screened = [*pool, 30, 31]

    def excess(seqs):
        out = []
        for seq in seqs:
            value = 1.0 + sum(0.5 if t in (20, 21) else 0.3 if t in target else 0.0
                              for t in seq)
            value += 0.2 * sum(i < len(target) and t == target[i] for i, t in enumerate(seq))
            out.append(value + (10.0 if list(seq) == target else 0.0))
        return torch.tensor(out)

    def gains(order):  # exact gains stand in for the gradient's
        base = float(excess([order])[0])
        swapped = [[*order[:i], t, *order[i + 1:]] for i in range(len(order)) for t in screened]
        return screened, (excess(swapped) - base).view(len(order), len(screened))

    plain = list(set_beam(excess, pool, width=3, max_length=4))
    assert target not in plain
    found = list(set_beam(excess, pool, width=3, max_length=4, gains=gains))
    assert found[:len(plain)] == plain and found[-1] == target, found
    assert list(set_beam(excess, pool, width=3, max_length=4, gains=gains,
                         climb_rounds=0)) == plain
    # a climb stops where no swap or move helps
    assert climb(excess, gains, target, float(excess([target])[0])) == (
        target, float(excess([target])[0]))


def test_the_memo_measures_each_sequence_once_and_answers_in_the_callers_order():
    calls = []

    def excess(seqs):
        calls.append([tuple(s) for s in seqs])
        return torch.tensor([float(sum(s) + 0.5 * s[0]) for s in seqs])

    memo = Memo(excess)
    first = memo([[1, 2], [3, 4], [1, 2]])
    assert first.tolist() == [3.5, 8.5, 3.5] and calls == [[(1, 2), (3, 4)]]
    second = memo([[3, 4], [2, 1], [1, 2]])
    assert second.tolist() == [8.5, 4.0, 3.5] and calls[1] == [(2, 1)]
    assert memo.counts == {"measured": 3, "repeated": 3}
    assert memo([[5, 6]] * 0).numel() == 0 and len(calls) == 2
