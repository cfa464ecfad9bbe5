"""Trigger attribution: which real tokens send the encoder to a mined PV.

The reference stops at the soft trigger. A planted backdoor fires on real words, while a
soft trigger on a clean encoder is a continuous adversarial perturbation that no real token
reproduces (FINDINGS.md §1). So for each PV we sweep the whole vocabulary once (every token
alone in a minimal context, one batched pass), re-test the tokens whose output best matches
the PV as hard triggers inserted into held-out sentences, and compare the best with random
tokens. Both the attribution in reports and the calibrated verdict use the result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from sanitator.encoders import Encoder, Feature
from sanitator.mining import MiningData, _forward
from sanitator.monitor import sign_agreement


@dataclass
class TokenAttribution:
    """The best hard trigger found for one PV and how often it fires."""

    tokens: list[str]
    success: float          # held-out sentences sent to the PV (not matching it before)
    null_success: float     # the best random-token success (same statistic)
    natural_rate: float     # clean held-out outputs already matching the PV
    random_displacement: float  # median squared move of the output by a random token
    natural_agreement: float  # mean sign agreement of clean outputs with the PV
    realised_pv: torch.Tensor | None = None  # mean held-out output with the hard trigger
    candidates: list[tuple[str, float]] = field(default_factory=list)


def candidate_token_ids(encoder: Encoder) -> torch.Tensor:
    """Vocabulary ids a user could type: no special or placeholder ([unused7]) tokens."""
    tokenizer = encoder.tokenizer
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.convert_ids_to_tokens(list(range(encoder.word_embeddings.num_embeddings)))
    keep = [i for i, tok in enumerate(vocab)
            if i not in special and tok is not None
            and not (tok.startswith(("[", "<")) and tok.endswith(("]", ">")))]
    return torch.tensor(keep)


@torch.no_grad()
def sweep_vocabulary(encoder: Encoder, token_ids: torch.Tensor, feature: Feature,
                     batch_size: int = 1024) -> torch.Tensor:
    """The feature of every token alone between the special tokens: [V', H], one pass."""
    tokenizer = encoder.tokenizer
    template = tokenizer("x", add_special_tokens=True)["input_ids"]
    body = tokenizer("x", add_special_tokens=False)["input_ids"]
    slot = next(i for i in range(len(template)) if template[i:i + len(body)] == body)
    outputs = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start:start + batch_size]
        ids = torch.tensor([*template[:slot], 0, *template[slot + len(body):]]).repeat(
            len(chunk), 1)
        ids[:, slot] = chunk
        if feature is Feature.MASK:  # the monitored mask goes right after the token
            ids = torch.cat([ids[:, :slot + 1],
                             torch.full((len(chunk), 1), tokenizer.mask_token_id),
                             ids[:, slot + 1:]], dim=1)
        mask_at = torch.full((len(chunk),), slot + 1) if feature is Feature.MASK else None
        feats = encoder.forward_features(
            input_ids=ids.to(encoder.device), attention_mask=torch.ones_like(ids).to(
                encoder.device), feature=feature,
            mask_positions=None if mask_at is None else mask_at.to(encoder.device))
        outputs.append(feats.float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def hard_trigger_stats(encoder: Encoder, holdout: MiningData, token_seqs: torch.Tensor,
                       pv: torch.Tensor, config, threshold: float = 0.8,
                       batch_rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hard trigger [K, l] of token ids, on held-out sentences whose clean output does not
    match the PV: (success, displacement). Success is the fraction whose triggered output
    matches the PV by the monitor's rule; displacement is the mean squared distance of the
    triggered outputs from the same sentences' clean outputs."""
    clean_match = sign_agreement(holdout.clean, pv[None])[:, 0] > threshold
    eligible = (~clean_match).nonzero().flatten().tolist()[:batch_rows]
    if len(eligible) < 2:
        return torch.zeros(len(token_seqs)), torch.zeros(len(token_seqs))
    embeds = encoder.word_embeddings(token_seqs.to(encoder.device)).float()
    sub = holdout.subset(eligible)
    rows = list(range(len(sub)))
    short = replace(config, trigger_len=token_seqs.shape[1])
    hits, moved = [], []
    for start in range(0, len(embeds), 16):
        out = _forward(encoder, sub, rows, embeds[start:start + 16], short).cpu()  # [k, B, H]
        agreement = sign_agreement(out.reshape(-1, out.shape[-1]), pv[None])[:, 0]
        hits.append((agreement.reshape(out.shape[0], -1) > threshold).float().mean(dim=1))
        moved.append(((out - sub.clean[None]) ** 2).mean(dim=(1, 2)))
    return torch.cat(hits), torch.cat(moved)


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


def attribute_pv(encoder: Encoder, holdout: MiningData, pv: torch.Tensor, config, *,
                 sweep: torch.Tensor, sweep_ids: torch.Tensor, n_candidates: int = 64,
                 n_null: int = 16, seed: int = 0, threshold: float = 0.8
                 ) -> TokenAttribution:
    """Find the real tokens (one, else two) that best realise `pv` as a hard trigger."""
    tokenizer = encoder.tokenizer
    natural_agreement = sign_agreement(holdout.clean, pv[None])[:, 0]
    natural = float((natural_agreement > threshold).float().mean())
    score = sign_agreement(sweep, pv[None])[:, 0] + 1e-3 * torch.nn.functional.cosine_similarity(
        sweep, pv[None], dim=1)
    top = sweep_ids[score.topk(min(n_candidates, len(score))).indices]
    success, _ = hard_trigger_stats(encoder, holdout, top[:, None], pv, config, threshold)
    order = success.argsort(descending=True, stable=True).tolist()
    best_seq = top[order[0]].reshape(1, 1)
    best = float(success[order[0]])
    if best < 0.5:  # a multi-token trigger may need its pieces together: try pairs of the best
        heads = top[torch.tensor(order[:6])]
        pairs = torch.cartesian_prod(heads, heads)
        pair_success, _ = hard_trigger_stats(encoder, holdout, pairs, pv, config, threshold)
        index = int(pair_success.argmax())
        if float(pair_success[index]) > best:
            best_seq, best = pairs[index:index + 1], float(pair_success[index])
    realised = realised_output(encoder, holdout, best_seq, config)
    rng = random.Random(seed)
    null_ids = torch.tensor(rng.sample(sweep_ids.tolist(), min(n_null, len(sweep_ids))))
    null, null_moved = hard_trigger_stats(encoder, holdout, null_ids[:, None], pv, config,
                                          threshold)
    candidates = [(tokenizer.convert_ids_to_tokens(int(top[i])), round(float(success[i]), 4))
                  for i in order[:10]]
    return TokenAttribution(tokens=tokenizer.convert_ids_to_tokens(best_seq[0].tolist()),
                            success=best, null_success=float(null.max()),
                            natural_rate=natural,
                            random_displacement=float(null_moved.median()),
                            natural_agreement=float(natural_agreement.mean()),
                            realised_pv=realised,
                            candidates=candidates)
