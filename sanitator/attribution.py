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
def hard_trigger_success(encoder: Encoder, holdout: MiningData, token_seqs: torch.Tensor,
                         pv: torch.Tensor, config, threshold: float = 0.8,
                         batch_rows: int = 16) -> torch.Tensor:
    """Per hard trigger [K, l] of token ids: the fraction of held-out sentences whose output
    did not match the PV clean but matches it with the trigger inserted (monitor's rule)."""
    clean_match = sign_agreement(holdout.clean, pv[None])[:, 0] > threshold
    eligible = (~clean_match).nonzero().flatten().tolist()[:batch_rows]
    if not eligible:
        return torch.zeros(len(token_seqs))
    embeds = encoder.word_embeddings(token_seqs.to(encoder.device)).float()
    sub = holdout.subset(eligible)
    rows = list(range(len(sub)))
    short = replace(config, trigger_len=token_seqs.shape[1])
    hits = []
    for start in range(0, len(embeds), 16):
        out = _forward(encoder, sub, rows, embeds[start:start + 16], short)   # [k, B, H]
        agreement = sign_agreement(out.reshape(-1, out.shape[-1]).cpu(), pv[None])[:, 0]
        hits.append((agreement.reshape(out.shape[0], -1) > threshold).float().mean(dim=1))
    return torch.cat(hits)


def attribute_pv(encoder: Encoder, holdout: MiningData, pv: torch.Tensor, config, *,
                 sweep: torch.Tensor, sweep_ids: torch.Tensor, n_candidates: int = 64,
                 n_null: int = 16, seed: int = 0, threshold: float = 0.8
                 ) -> TokenAttribution:
    """Find the real tokens (one, else two) that best realise `pv` as a hard trigger."""
    tokenizer = encoder.tokenizer
    natural = float((sign_agreement(holdout.clean, pv[None])[:, 0] > threshold).float().mean())
    score = sign_agreement(sweep, pv[None])[:, 0] + 1e-3 * torch.nn.functional.cosine_similarity(
        sweep, pv[None], dim=1)
    top = sweep_ids[score.topk(min(n_candidates, len(score))).indices]
    single = hard_trigger_success(encoder, holdout, top[:, None], pv, config, threshold)
    order = single.argsort(descending=True)
    best_seq, best = top[order[:1]][:, None], float(single[order[0]])
    if best < 0.5:  # a multi-token trigger may need its pieces together: try pairs of the best
        heads = top[order[:6]]
        pairs = torch.cartesian_prod(heads, heads)
        pair_success = hard_trigger_success(encoder, holdout, pairs, pv, config, threshold)
        if float(pair_success.max()) > best:
            index = int(pair_success.argmax())
            best_seq, best = pairs[index:index + 1], float(pair_success[index])
    rng = random.Random(seed)
    null_ids = torch.tensor(rng.sample(sweep_ids.tolist(), min(n_null, len(sweep_ids))))
    null = hard_trigger_success(encoder, holdout, null_ids[:, None], pv, config, threshold)
    candidates = [(tokenizer.convert_ids_to_tokens(int(top[i])), round(float(single[i]), 4))
                  for i in order[:10]]
    return TokenAttribution(tokens=tokenizer.convert_ids_to_tokens(best_seq[0].tolist()),
                            success=best, null_success=float(null.max()),
                            natural_rate=natural, candidates=candidates)
