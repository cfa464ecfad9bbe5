"""Trigger attribution: which real tokens send the encoder to a mined PV, or anywhere fixed.

The reference stops at the soft trigger. A planted backdoor fires on real words, while a
soft trigger on a clean encoder is a continuous adversarial perturbation that no real token
reproduces (FINDINGS.md §1). So we sweep the whole vocabulary once per model (every token,
and every multi-piece word of a word list, alone in a minimal context, batched) and re-test
candidates as hard triggers inserted into held-out sentences, compared with random tokens:
those whose output best matches a mined PV (attribution), and, independent of mining, those
whose standalone output is the farthest outlier (the vocabulary screen). Both the
attribution in reports and the calibrated verdict use the result.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from sanitator.detect.encoders import Encoder, Feature
from sanitator.detect.mining import MiningData, _forward
from sanitator.detect.signs import MONITOR_THRESHOLD, sign_agreement

TokenSeq = tuple[int, ...]


@dataclass
class TokenAttribution:
    """The best hard trigger found for one PV and how often it fires."""

    tokens: list[str]
    token_ids: TokenSeq
    success: float          # held-out sentences sent to the trigger's own mean output
    input_dependence: float  # share of triggered-output variation the clean input explains
    null_success: float     # the best random-token success (same statistic)
    natural_rate: float     # clean held-out outputs already matching that mean output
    random_displacement: float  # median squared move of the output by a random token
    natural_agreement: float  # mean sign agreement of clean outputs with that mean output
    displacement: float     # mean squared move of held-out outputs by the trigger
    realised_pv: torch.Tensor | None = None  # mean held-out output with the hard trigger
    candidates: list[tuple[str, float, float]] = field(default_factory=list)


def candidate_token_ids(encoder: Encoder) -> torch.Tensor:
    """Vocabulary ids a user could type: no special or placeholder ([unused7]) tokens."""
    tokenizer = encoder.tokenizer
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.convert_ids_to_tokens(list(range(encoder.word_embeddings.num_embeddings)))
    keep = [i for i, tok in enumerate(vocab)
            if i not in special and tok is not None
            and not (tok.startswith(("[", "<")) and tok.endswith(("]", ">")))]
    return torch.tensor(keep)


def candidate_sequences(encoder: Encoder, words: Sequence[str] = (),
                        max_pieces: int = 6) -> list[TokenSeq]:
    """Every typable vocabulary token, then every word that the tokenizer splits into 2 to
    `max_pieces` pieces: a backdoor keyed on a rare word fires on its pieces together, not
    on any one of them."""
    out: list[TokenSeq] = [(i,) for i in candidate_token_ids(encoder).tolist()]
    seen = set(out)
    for word in words:
        # a leading space: the word as it appears inside a sentence (BPE marks it)
        ids = tuple(encoder.tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if 1 < len(ids) <= max_pieces and ids not in seen:
            seen.add(ids)
            out.append(ids)
    return out


def _by_length(sequences: Sequence[TokenSeq]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(index)
    return groups


@torch.no_grad()
def sweep_vocabulary(encoder: Encoder, sequences: Sequence[TokenSeq], feature: Feature,
                     batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
    """The feature of every candidate alone between the special tokens: [N, H], batched by
    length."""
    from tqdm.auto import tqdm

    if Feature(feature) is Feature.TOKEN:  # alone, the only word there is the candidate
        raise ValueError("the standalone vocabulary sweep (the paper's attribution, the CLS "
                         "screen) reads cls or mask; scan the token feature with the fast "
                         "preset")
    bar = tqdm(total=len(sequences), desc="vocabulary", unit="word", dynamic_ncols=True,
               disable=not progress)
    tokenizer = encoder.tokenizer
    template = tokenizer("x", add_special_tokens=True)["input_ids"]
    body = tokenizer("x", add_special_tokens=False)["input_ids"]
    slot = next(i for i in range(len(template)) if template[i:i + len(body)] == body)
    prefix, suffix = template[:slot], template[slot + len(body):]
    result: torch.Tensor | None = None
    for length, indices in _by_length(sequences).items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            body_ids = torch.tensor([sequences[i] for i in chunk])
            if feature is Feature.MASK:  # the monitored mask goes right after the candidate
                body_ids = torch.cat([body_ids, torch.full((len(chunk), 1),
                                                           tokenizer.mask_token_id)], dim=1)
            ids = torch.cat([torch.tensor(prefix, dtype=torch.long).repeat(len(chunk), 1), body_ids,
                             torch.tensor(suffix, dtype=torch.long).repeat(len(chunk), 1)],
                            dim=1)
            mask_at = (torch.full((len(chunk),), slot + length).to(encoder.device)
                       if feature is Feature.MASK else None)
            feats = encoder.forward_features(
                input_ids=ids.to(encoder.device),
                attention_mask=torch.ones_like(ids).to(encoder.device), feature=feature,
                mask_positions=mask_at).float().cpu()
            if result is None:
                result = torch.empty(len(sequences), feats.shape[-1])
            result[torch.tensor(chunk)] = feats
            bar.update(len(chunk))
    bar.close()
    assert result is not None, "no candidate sequences to sweep"
    return result


@dataclass
class TriggerStats:
    """Per hard trigger [K]: see hard_trigger_stats."""

    success: torch.Tensor
    displacement: torch.Tensor
    dependence: torch.Tensor
    realised: torch.Tensor  # [K, H] mean triggered output over the rows tested


@torch.no_grad()
def hard_trigger_stats(encoder: Encoder, holdout: MiningData, sequences: Sequence[TokenSeq],
                       config, threshold: float = MONITOR_THRESHOLD,
                       batch_rows: int = 16) -> TriggerStats:
    """Per hard trigger (a sequence of token ids) inserted into held-out sentences:
    success, displacement, input dependence and the mean triggered output.

    Success is measured against the trigger's own mean output, not the mined PV: the soft
    trigger's optimum overshoots what the real trigger reaches, so their signs can differ on
    a quarter of the units. It is the fraction of the sentences whose clean output does not
    match that mean (by the monitor's rule) whose triggered output does: a real backdoor
    trigger sends every sentence to one point; an ordinary word leaves them apart.
    Displacement is the mean squared distance of the triggered outputs from the clean ones.
    Input dependence is the share of the triggered outputs' variation across sentences that
    their clean outputs explain (squared correlation of the centred outputs): about 1 for a
    word that shifts or bends the output, near 0 for a trigger that overrides the input.
    """
    success, moved = torch.zeros(len(sequences)), torch.zeros(len(sequences))
    dependence = torch.ones(len(sequences))
    realised = torch.zeros(len(sequences), holdout.clean.shape[-1])
    sub = holdout.subset(list(range(min(batch_rows, len(holdout)))))
    rows = list(range(len(sub)))
    for length, indices in _by_length(sequences).items():
        ids = torch.tensor([sequences[i] for i in indices])
        embeds = encoder.word_embeddings(ids.to(encoder.device)).float()
        short = replace(config, trigger_len=length)
        for start in range(0, len(indices), 16):
            out = _forward(encoder, sub, rows, embeds[start:start + 16], short).cpu()
            where = torch.tensor(indices[start:start + 16])
            success[where] = _self_collapse(out, sub.clean, threshold)
            moved[where] = ((out - sub.clean[None]) ** 2).mean(dim=(1, 2))
            dependence[where] = _input_dependence(out, sub.clean)
            realised[where] = out.mean(dim=1)
    return TriggerStats(success, moved, dependence, realised)


def _input_dependence(out: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """[K]: squared correlation between centred triggered [K, B, H] and clean [B, H] outputs."""
    triggered = out - out.mean(dim=1, keepdim=True)
    natural = (clean - clean.mean(dim=0))[None]
    covariance = (triggered * natural).sum(dim=(1, 2))
    scale = (triggered ** 2).sum(dim=(1, 2)) * (natural ** 2).sum(dim=(1, 2))
    return (covariance ** 2 / scale.clamp_min(1e-30)).clamp(0.0, 1.0)


def _self_collapse(out: torch.Tensor, clean: torch.Tensor, threshold: float) -> torch.Tensor:
    """[K] for triggered outputs [K, B, H] and clean outputs [B, H]: see hard_trigger_stats."""
    result = torch.zeros(out.shape[0])
    for k, triggered in enumerate(out):
        target = triggered.mean(dim=0, keepdim=True)
        eligible = sign_agreement(clean, target)[:, 0] <= threshold
        if int(eligible.sum()) < 2:
            continue  # the clean outputs already sit there: nothing to reach
        reached = sign_agreement(triggered[eligible], target)[:, 0] > threshold
        result[k] = reached.float().mean()
    return result


@torch.no_grad()
def realised_output(encoder: Encoder, holdout: MiningData, token_seq: torch.Tensor, config,
                    rows: int = 32) -> torch.Tensor:
    """The mean held-out output with a hard trigger [1, l] inserted: the PV as real inputs
    reach it (the soft trigger's optimum overshoots it, pushed away from the clean output)."""
    embeds = encoder.word_embeddings(token_seq.to(encoder.device)).float()
    sub = holdout.subset(list(range(min(rows, len(holdout)))))
    short = replace(config, trigger_len=token_seq.shape[1])
    out = _forward(encoder, sub, list(range(len(sub))), embeds, short)
    return out[0].mean(dim=0).cpu()


def _words(encoder: Encoder, seq: TokenSeq) -> list[str]:
    tokenizer = encoder.tokenizer
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(seq))).split()


def _null_stats(encoder: Encoder, holdout: MiningData, sequences: Sequence[TokenSeq], config,
               n_null: int, seed: int, threshold: float) -> tuple[float, float]:
    """(best success, median displacement) of random single tokens: what any word does."""
    singles = [seq for seq in sequences if len(seq) == 1]
    null_seqs = random.Random(seed).sample(singles, min(n_null, len(singles)))
    null = hard_trigger_stats(encoder, holdout, null_seqs, config, threshold)
    return float(null.success.max()), float(null.displacement.median())


def _describe(encoder: Encoder, holdout: MiningData, seq: TokenSeq, stats: TriggerStats,
              index: int, config, null: tuple[float, float], threshold: float,
              candidates: list[tuple[str, float, float]]) -> TokenAttribution:
    """The attribution of one hard trigger, with where it takes the held-out sentences."""
    realised = realised_output(encoder, holdout, torch.tensor([seq]), config)
    # how natural the point the trigger reaches is: clean outputs already matching it
    natural_agreement = sign_agreement(holdout.clean, realised[None])[:, 0]
    return TokenAttribution(tokens=_words(encoder, seq), token_ids=seq,
                            success=float(stats.success[index]),
                            input_dependence=float(stats.dependence[index]),
                            null_success=null[0],
                            natural_rate=float((natural_agreement > threshold).float().mean()),
                            random_displacement=null[1],
                            natural_agreement=float(natural_agreement.mean()),
                            displacement=float(stats.displacement[index]),
                            realised_pv=realised, candidates=candidates)


def _strengths(stats: TriggerStats) -> torch.Tensor:
    """A trigger must both send sentences to one point and override what they say."""
    return torch.minimum(stats.success, 1.0 - stats.dependence)


def _better_pairs(encoder: Encoder, holdout: MiningData, top: list[TokenSeq],
                  order: list[int], strength: torch.Tensor, config, threshold: float
                  ) -> tuple[list[TokenSeq], TriggerStats] | None:
    """When no single candidate works, every ordered pair of the best six (a phrase may need
    two words together), if some pair beats the best single one."""
    if float(strength[order[0]]) >= 0.5:
        return None
    heads = [top[i] for i in order[:6]]
    pairs = [a + b for a in heads for b in heads]
    stats = hard_trigger_stats(encoder, holdout, pairs, config, threshold)
    return (pairs, stats) if float(_strengths(stats).max()) > float(strength[order[0]]) else None


def _listing(encoder: Encoder, seqs: list[TokenSeq], stats: TriggerStats,
             order: list[int]) -> list[tuple[str, float, float]]:
    return [(" ".join(_words(encoder, seqs[i])), round(float(stats.success[i]), 4),
             round(float(stats.dependence[i]), 4)) for i in order[:10]]


def _shortest_first(seqs: Sequence[TokenSeq], strength: torch.Tensor) -> list[int]:
    """Working triggers (strength >= 0.5) first, shortest first, then by strength: the
    shortest trigger that works names it best (`cf`, not the word `cfos` it starts)."""
    return sorted(range(len(seqs)), key=lambda i: (0, len(seqs[i]), -float(strength[i]))
                  if strength[i] >= 0.5 else (1, 0, -float(strength[i])))


def attribute_pv(encoder: Encoder, holdout: MiningData, pv: torch.Tensor, config, *,
                 sweep: torch.Tensor, sequences: Sequence[TokenSeq], n_candidates: int = 64,
                 n_null: int = 16, seed: int = 0, threshold: float = MONITOR_THRESHOLD
                 ) -> TokenAttribution:
    """Find the real tokens or words (one, else two together) that best realise `pv` as a
    hard trigger; `sweep` holds the standalone output of every candidate in `sequences`."""
    score = sign_agreement(sweep, pv[None])[:, 0] + 1e-3 * torch.nn.functional.cosine_similarity(
        sweep, pv[None], dim=1)
    top = [sequences[i] for i in score.topk(min(n_candidates, len(score))).indices.tolist()]
    stats = hard_trigger_stats(encoder, holdout, top, config, threshold)
    strength = _strengths(stats)
    order = _shortest_first(top, strength)
    best_seqs, best_stats, best = top, stats, order[0]
    better = _better_pairs(encoder, holdout, top, order, strength, config, threshold)
    if better is not None:
        best_seqs, best_stats = better
        best = int(_strengths(best_stats).argmax())
    null = _null_stats(encoder, holdout, sequences, config, n_null, seed, threshold)
    return _describe(encoder, holdout, best_seqs[best], best_stats, best, config, null,
                     threshold, _listing(encoder, top, stats, order))


def screen_vocabulary(encoder: Encoder, holdout: MiningData, config, *, sweep: torch.Tensor,
                      sequences: Sequence[TokenSeq], n_candidates: int = 32,
                      max_hits: int = 1, n_null: int = 16, seed: int = 0,
                      threshold: float = MONITOR_THRESHOLD, unique_agreement: float = 0.9
                      ) -> list[TokenAttribution]:
    """Test the vocabulary's outliers as hard triggers directly, without a mined PV.

    A planted trigger moves the encoder's output far from where ordinary words take it even
    alone between the special tokens, so the candidates whose standalone output lies farthest
    from the mean standalone output (overall, and among single tokens, which multi-piece
    words would otherwise crowd out) are re-tested in held-out sentences. Returns up to
    `max_hits` triggers that win both majorities of `_strengths`, shortest first, one per
    point reached (when none does, the first candidate: the evidence a clean model leaves),
    then the strongest candidate if it is not among them.
    """
    distance = ((sweep - sweep.mean(dim=0)) ** 2).sum(dim=1)
    singles = torch.tensor([i for i, seq in enumerate(sequences) if len(seq) == 1])
    picked = distance.topk(min(n_candidates, len(distance))).indices.tolist()
    if len(singles):
        single_top = distance[singles].topk(min(n_candidates, len(singles))).indices
        picked += singles[single_top].tolist()
    top = [sequences[i] for i in dict.fromkeys(picked)]
    stats = hard_trigger_stats(encoder, holdout, top, config, threshold)
    strength = _strengths(stats)
    order = _shortest_first(top, strength)
    seqs = top
    better = _better_pairs(encoder, holdout, top, order, strength, config, threshold)
    if better is not None:
        seqs, stats = better
        strength = _strengths(stats)
        order = _shortest_first(seqs, strength)
    null = _null_stats(encoder, holdout, sequences, config, n_null, seed, threshold)
    listing = _listing(encoder, seqs, stats, order)
    hits: list[TokenAttribution] = []
    reached: list[torch.Tensor] = []
    for index in order:
        if hits and (len(hits) >= max_hits or float(strength[index]) < 0.5):
            break
        point = stats.realised[index]
        if reached and float(sign_agreement(point[None], torch.stack(reached)).max()) \
                > unique_agreement:
            continue  # another form of a trigger already found (`misread`, `misreading`)
        reached.append(point)
        hits.append(_describe(encoder, holdout, seqs[index], stats, index, config, null,
                              threshold, listing))
    strongest = int(strength.argmax())
    if all(hit.token_ids != seqs[strongest] for hit in hits):
        # the name is the shortest working trigger; the evidence keeps the strongest too
        hits.append(_describe(encoder, holdout, seqs[strongest], stats, strongest, config,
                              null, threshold, listing))
    return hits
