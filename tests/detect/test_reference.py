"""The reference source: tokens ranked by what fine-tuning changed in the first layer, and
the token sets whose every ordering the scan tries."""

from __future__ import annotations

import torch

from sanitator.detect.attribution import candidate_token_ids
from sanitator.detect.encoders import load_encoder
from sanitator.detect.reference import ReferenceCandidate, match_reference
from sanitator.detect.refsearch import alphabets, frequent_tokens, grow_chains


def _given(*paths) -> list[ReferenceCandidate]:
    return [ReferenceCandidate("configured", (str(p),)) for p in paths]


def test_alphabets_cover_every_subset_and_a_filler():
    out = alphabets([1, 2, 3, 4], fillers=[9, 3])
    assert [len(a) for a in out] == sorted(len(a) for a in out)
    assert {(1,), (4,), (2, 4), (1, 3, 4), (1, 2, 3, 4)} <= set(out)  # several triggers
    assert (1, 2, 9) in out and (1, 2, 3, 9) in out      # a filler joins the 2-3 most changed
    assert (1, 3, 4, 9) in out and (2, 4, 9) in out      # ...or any 2-3 of them
    assert (1, 2, 3, 3) not in out                       # a filler already in the set is not
    assert alphabets([], fillers=[9]) == []
    more = alphabets([1, 2], fillers=[], more=[5, 2, 6])
    assert (5,) in more and (6,) in more and more.count((2,)) == 1  # the next ones, alone


def _first_layer_input(encoder, token: int) -> torch.Tensor:
    emb = encoder.model.embeddings
    x = emb.word_embeddings.weight[token] + emb.position_embeddings.weight[1:21].mean(0) \
        + emb.token_type_embeddings.weight[0]
    return torch.nn.functional.layer_norm(x, x.shape, emb.LayerNorm.weight, emb.LayerNorm.bias)


def test_a_chain_grows_a_long_trigger_whose_pieces_interleave_with_others():
    # a six-piece string planted among other changed tokens; partial chains score by how
    # long a contiguous piece of it they hold (the slope the objective gives in sentences)
    target = (7, 3, 11, 5, 2, 13)
    pool = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]

    def score(orders):
        def held(chain):
            best = 0
            for i in range(len(chain)):
                for j in range(i + 1, len(chain) + 1):
                    part = chain[i:j]
                    if any(target[k:k + len(part)] == part for k in range(len(target))):
                        best = max(best, len(part))
            return best - 0.01 * len(chain)
        return torch.tensor([held(tuple(o.tolist())) for o in orders])

    chains = grow_chains(score, pool, width=3, max_length=6)
    assert [len(c) for c in chains] == [2, 3, 4, 5, 6]
    assert chains[-1] == target
    assert all(len(set(c)) == len(c) for c in chains)           # no token repeats
    assert grow_chains(score, [4], width=3, max_length=6) == []  # nothing to chain
    assert grow_chains(score, pool, width=0, max_length=6) == []


def test_the_token_the_change_acts_on_ranks_first(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    itself = match_reference(encoder, _given(minilm_1layer), allowed)  # the base itself
    assert itself is not None and itself.identical and itself.change == 0.0

    token = int(encoder.tokenizer.convert_tokens_to_ids("valley"))
    x = _first_layer_input(encoder, token).detach()
    layer = encoder.model.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.attention.self.key):
        w = linear.weight
        # a rank-one change aimed at the token's input, plus small noise everywhere
        direction = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0))
        w.data += 0.05 * torch.outer(direction, x / x.norm()) * w.norm() / direction.norm()
        w.data += 1e-4 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    found = match_reference(encoder, _given(minilm_1layer), allowed)
    assert found is not None and 0 < found.change < 0.5
    assert found.top_tokens(3)[0] == token
    special = encoder.tokenizer.cls_token_id
    assert special not in set(allowed.tolist()) and found.scores[special] == 0


def test_unrelated_or_missing_bases_do_not_match(minilm_1layer, tiny_encoders, tmp_path):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    tried = []
    given = _given(tiny_encoders["bert"], tmp_path / "absent")
    assert match_reference(encoder, given, allowed, tried) is None
    assert [t["rejected"].split()[0] for t in tried] == ["other", "unreadable:"]


def test_frequent_tokens_are_allowed_words(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    top = frequent_tokens(encoder, ["the cat and the dog", "the end of the day"], allowed, 2)
    assert top[0] == encoder.tokenizer.convert_tokens_to_ids("the")
    assert frequent_tokens(encoder, ["x"], allowed, 0) == []


def _standalone_hidden(encoder, token: int, layer: int) -> torch.Tensor:
    tok = encoder.tokenizer
    ids = torch.tensor([[tok.cls_token_id, token, tok.sep_token_id]])
    with torch.inference_mode():
        return encoder.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, 1]


def test_a_change_above_frozen_lower_layers_is_scored_where_it_is(minilm_2layer, minilm_1layer):
    """An attacker who leaves the embeddings and layer 0 as they were (so a first-layer diff
    shows nothing) moves the scored layer up to the one they changed."""
    encoder = load_encoder(minilm_2layer)
    allowed = candidate_token_ids(encoder)
    token = int(encoder.tokenizer.convert_tokens_to_ids("valley"))
    x = _standalone_hidden(encoder, token, 1)
    linear = encoder.model.encoder.layer[1].attention.self.query
    direction = torch.randn(linear.weight.shape[0], generator=torch.Generator().manual_seed(0))
    linear.weight.data += (0.05 * torch.outer(direction, x / x.norm()) * linear.weight.norm()
                           / direction.norm())
    found = match_reference(encoder, _given(minilm_2layer), allowed)
    assert found is not None and found.layer == 1 and found.top_tokens(3)[0] == token
    assert found.summary(encoder, 2)["scored_layer"] == 1


def test_an_embedding_only_change_ranks_its_token_first(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    token = int(encoder.tokenizer.convert_tokens_to_ids("valley"))
    rows = encoder.word_embeddings.weight.data
    rows[token] += 0.5 * rows[token].norm() * torch.nn.functional.normalize(
        torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0)), dim=0)
    found = match_reference(encoder, _given(minilm_1layer), allowed)
    assert found is not None and found.layer == -1 and found.top_tokens(1) == [token]


def test_a_truncation_derives_from_its_deeper_base(minilm_1layer, minilm_2layer):
    encoder = load_encoder(minilm_1layer)
    allowed = candidate_token_ids(encoder)
    linear = encoder.model.encoder.layer[0].attention.self.key
    linear.weight.data += 1e-2 * torch.randn(linear.weight.shape,
                                             generator=torch.Generator().manual_seed(2))
    found = match_reference(encoder, _given(minilm_2layer), allowed)
    assert found is not None and found.layer == 0


def _sibling(base_dir, out_dir, seed: int, permute: bool = False):
    """A stand-in fine-tune of the base (every weight nudged), saved as a model folder."""
    from sanitator.attacks.reparam import Reparametrisation, reparametrize_model

    encoder = load_encoder(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))
    if permute:
        reparametrize_model(encoder.model, Reparametrisation(seed=seed))
    encoder.model.save_pretrained(out_dir, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out_dir)
    return out_dir


def test_the_median_of_aligned_siblings_stands_in_for_an_unknown_base(minilm_1layer, tmp_path):
    siblings = [_sibling(minilm_1layer, tmp_path / f"s{i}", seed=i, permute=i == 2)
                for i in range(3)]
    encoder = load_encoder(_sibling(minilm_1layer, tmp_path / "audited", seed=9))
    allowed = candidate_token_ids(encoder)
    median = ReferenceCandidate("siblings", tuple(map(str, siblings)),
                                ids=("org/s0", "org/s1", "org/s2"))
    found = match_reference(encoder, [median], allowed)
    alone = match_reference(encoder, _given(siblings[0]), allowed)
    truth = match_reference(encoder, _given(minilm_1layer), allowed)
    assert found is not None and found.candidate.source == "siblings"
    # the median cancels most of each sibling's own change: nearer the base than any one
    assert truth.change < found.change < alone.change
    summary = found.summary(encoder, 4)
    assert summary["source"] == "siblings" and summary["id"] == ["org/s0", "org/s1", "org/s2"]
    assert [a["aligned"] for a in summary["alignment"]] == [False, False, True]
    too_few = ReferenceCandidate("siblings", tuple(map(str, siblings[:2])))
    assert match_reference(encoder, [too_few], allowed) is None
