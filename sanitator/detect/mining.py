"""PV mining: optimise soft triggers so the frozen encoder's output collapses onto a PV.

REFERENCE.md §2-3, reimplemented batched: clean references in one pass per model, dynamic
padding, several seeds' triggers optimised together in one forward pass (a seed axis in
front of the batch), triggers spliced with one gather instead of per-sample loops. The
reference's bugs (§10.2: signed-max gradient, Adam state shared across seeds, PV from the
last mini-batch) are not reproduced.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sanitator.core.constants import MONITOR_THRESHOLD
from sanitator.detect.config import MiningConfig
from sanitator.detect.encoders import Encoder, Feature

log = logging.getLogger(__name__)


@dataclass
class MiningData:
    """Tokenised clean sentences with their trigger slots and clean reference features."""

    ids: list[torch.Tensor]          # per sentence, special tokens included, room left for L
    insert_at: torch.Tensor          # [N] token index where the trigger starts
    mask_at: torch.Tensor | None     # [N] read index (mask or token feature), un-triggered
    clean: torch.Tensor              # [N, H] clean reference feature per sentence

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: list[int]) -> MiningData:
        mask_at = None if self.mask_at is None else self.mask_at[rows]
        return MiningData([self.ids[r] for r in rows], self.insert_at[rows], mask_at,
                          self.clean[rows])

    def placed(self, where: str) -> MiningData:
        """The same sentences with the trigger slot moved: `start` (the trigger becomes the
        first word, right after the leading special token), `end` (the last word, right
        before the closing special token) or `anywhere` (the seeded random word boundary).
        A backdoor may be trained to fire at one end of the sentence only."""
        if where == "anywhere":
            return self
        if where == "start":
            insert_at = torch.ones(len(self), dtype=torch.long)
        elif where == "end":
            insert_at = torch.tensor([len(row) - 1 for row in self.ids])
        else:
            raise ValueError(f"placement must be anywhere, start or end, got {where!r}")
        return MiningData(self.ids, insert_at, self.mask_at, self.clean)


def _insertion_points(encoding, n_rows: int, max_word: int, rng: random.Random) -> list[int]:
    """Token index of the start of word k, k uniform in [1, min(max_word, n_words)];
    k == n_words means right before the final special token."""
    points = []
    for row in range(n_rows):
        word_ids = encoding.word_ids(row)
        starts: dict[int, int] = {}
        for index, word in enumerate(word_ids):
            if word is not None and word not in starts:
                starts[word] = index
        ordered = [starts[w] for w in sorted(starts)]
        last_real = max((i for i, w in enumerate(word_ids) if w is not None), default=0)
        k = rng.randint(1, max(1, min(max_word, len(ordered))))
        points.append(ordered[k] if k < len(ordered) else last_real + 1)
    return points


def prepare_data(encoder: Encoder, sentences: list[str], config: MiningConfig, *,
                 seed: int = 0, batch_size: int = 64) -> MiningData:
    """Tokenise, place trigger slots (and mask tokens), compute clean references batched."""
    tokenizer = encoder.tokenizer
    feature = Feature(config.feature)
    rng = random.Random(seed)
    encoding = tokenizer(sentences, truncation=True,
                         max_length=config.max_length - config.trigger_len)
    ids = [torch.tensor(row) for row in encoding["input_ids"]]
    insert_at = torch.tensor(_insertion_points(encoding, len(ids), config.max_insert_word, rng))
    mask_at = None
    if feature in (Feature.MASK, Feature.TOKEN):
        if feature is Feature.MASK and tokenizer.mask_token_id is None:
            raise ValueError("the mask feature needs a tokenizer with a mask token")
        positions = []
        for row, tokens in enumerate(ids):
            # any real token (not the first/last special one); the trigger goes elsewhere:
            # the token feature reads an ordinary word's own output, never a trigger's
            position = rng.randint(1, max(1, len(tokens) - 2))
            if feature is Feature.MASK:
                tokens[position] = tokenizer.mask_token_id
            positions.append(position)
            if insert_at[row] == position:  # keep the trigger off the read position
                insert_at[row] = position + 1
        mask_at = torch.tensor(positions)
    data = MiningData(ids, insert_at, mask_at, torch.empty(0))
    data.clean = clean_features(encoder, data, feature, batch_size=batch_size)
    return data


def pad_batch(ids: list[torch.Tensor], pad_id: int, length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = length or max(len(row) for row in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        out[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return out, mask


@torch.no_grad()
def clean_features(encoder: Encoder, data: MiningData, feature: Feature,
                   batch_size: int = 64) -> torch.Tensor:
    """The un-triggered feature of every sentence, in length-sorted batches."""
    order = sorted(range(len(data)), key=lambda r: len(data.ids[r]))
    out = torch.empty(len(data), encoder.hidden_size)
    pad_id = encoder.tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_batch([data.ids[r] for r in rows], pad_id)
        mask_at = None if data.mask_at is None else data.mask_at[rows].to(encoder.device)
        feats = encoder.forward_features(input_ids=ids.to(encoder.device),
                                         attention_mask=mask.to(encoder.device),
                                         feature=feature, mask_positions=mask_at)
        out[rows] = feats.float().cpu()
    return out


def splice_triggers(token_embeds: torch.Tensor, attention: torch.Tensor,
                    insert_at: torch.Tensor, triggers: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert each of S triggers [S, L, E] into every row of a batch [B, T, E].

    Returns embeddings [S*B, T+L, E] and attention [S*B, T+L]: row s*B+b is sentence b with
    trigger s spliced in at insert_at[b]. One gather, no per-sample loop.
    """
    n_seeds, length, _ = triggers.shape
    batch, width, dim = token_embeds.shape
    device = token_embeds.device
    positions = torch.arange(width + length, device=device)[None, :]      # [1, T+L]
    start = insert_at.to(device)[:, None]                                # [B, 1]
    in_trigger = (positions >= start) & (positions < start + length)     # [B, T+L]
    source = torch.where(positions >= start + length, positions - length, positions)
    source = source.clamp(max=width - 1)
    gathered = token_embeds.gather(1, source[..., None].expand(batch, -1, dim))
    slot = (positions - start).clamp(0, length - 1)                      # [B, T+L]
    trig = triggers[:, slot]                                             # [S, B, T+L, E]
    embeds = torch.where(in_trigger[None, ..., None], trig, gathered[None])
    mask = torch.where(in_trigger, 1, attention.gather(1, source))
    return embeds.reshape(n_seeds * batch, width + length, dim), mask.repeat(n_seeds, 1)


def batch_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """Mean over hidden units of the entropy of a softmax across the batch axis.

    outputs [S, B, H] -> [S]; ln(B) when every row is identical (total collapse).
    """
    log_p = torch.log_softmax(outputs, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean(dim=-1)


def initial_triggers(encoder: Encoder, seeds: list[int], length: int) -> torch.Tensor:
    """Rows (10·L·s + 10·i) mod V of the embedding matrix, as in the reference (§2.4)."""
    weight = encoder.word_embeddings.weight.detach()
    vocab = weight.shape[0]
    rows = torch.tensor([[(10 * length * s + 10 * i) % vocab for i in range(length)]
                         for s in seeds])
    return weight[rows].clone().float()


@dataclass
class SeedOutcome:
    """One seed's optimised trigger and how its collapse looks on the held-out sentences."""

    seed: int
    trigger: torch.Tensor           # [L, E]
    pv: torch.Tensor                # [H] mean held-out output: the candidate PV
    distance: float                 # held-out mean MSE to the clean references
    entropy_ratio: float            # held-out batch entropy / ln(B), 1 = total collapse
    consistency: float              # held-out rows whose signs agree with the PV (monitor rule)
    train_distance: list[float] = field(default_factory=list)   # per epoch (faithful rule)
    train_entropy: list[float] = field(default_factory=list)    # per epoch, ratio to ln(B)
    losses: dict[str, float] = field(default_factory=dict)      # final step's loss terms
    steps: int = 0
    abandoned: bool = False


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def step(self, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(n_rows: int, batch: int, epochs: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n_rows, generator=generator).tolist()
        out.extend(order[i:i + batch] for i in range(0, n_rows, batch))
    return out


def _forward(encoder: Encoder, data: MiningData, rows: list[int], triggers: torch.Tensor,
             config: MiningConfig) -> torch.Tensor:
    """Outputs [S, B, H] of the encoder with each trigger spliced into the given rows."""
    pad_id = encoder.tokenizer.pad_token_id or 0
    length = config.max_length - config.trigger_len if config.pad_to_max_length else None
    ids, attention = pad_batch([data.ids[r] for r in rows], pad_id, length)
    ids, attention = ids.to(encoder.device), attention.to(encoder.device)
    token_embeds = encoder.word_embeddings(ids)
    embeds, mask = splice_triggers(token_embeds, attention, data.insert_at[rows],
                                   triggers.to(token_embeds.dtype))
    mask_at = None
    if data.mask_at is not None:
        shift = (data.mask_at[rows] >= data.insert_at[rows]).long() * config.trigger_len
        mask_at = (data.mask_at[rows] + shift).repeat(triggers.shape[0]).to(encoder.device)
    # bf16 autocast on GPU: the frozen encoder's matmuls dominate, the trigger stays fp32
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                        enabled=encoder.device.type == "cuda"):
        feats = encoder.forward_features(inputs_embeds=embeds, attention_mask=mask,
                                         feature=Feature(config.feature),
                                         mask_positions=mask_at)
    return feats.float().reshape(triggers.shape[0], len(rows), -1)


@torch.no_grad()
def evaluate_triggers(encoder: Encoder, holdout: MiningData, triggers: torch.Tensor,
                      config: MiningConfig) -> dict[str, torch.Tensor]:
    """Held-out statistics per trigger [S]: PV estimate, distance, collapse, consistency."""
    outputs = []
    for start in range(0, len(holdout), config.batch_size):
        rows = list(range(start, min(start + config.batch_size, len(holdout))))
        outputs.append(_forward(encoder, holdout, rows, triggers, config))
    out = torch.cat(outputs, dim=1).cpu()                                  # [S, N, H]
    pv = out.mean(dim=1)
    distance = ((out - holdout.clean[None]) ** 2).mean(dim=(1, 2))
    chunks = [out[:, i:i + config.batch_size] for i in range(0, out.shape[1], config.batch_size)]
    full = [c for c in chunks if c.shape[1] == config.batch_size] or chunks
    entropy = torch.stack([batch_entropy(c) / math.log(c.shape[1]) for c in full]).mean(0)
    agree = ((out >= 0) == (pv[:, None] >= 0)).float().mean(dim=-1)       # [S, N]
    return {"pv": pv, "distance": distance, "entropy_ratio": entropy,
            "consistency": (agree > MONITOR_THRESHOLD).float().mean(dim=1), "outputs": out}


def mine_seeds(encoder: Encoder, train: MiningData, holdout: MiningData, seeds: list[int],
               config: MiningConfig, *, known_pvs: torch.Tensor | None = None,
               progress: bool = False,
               on_epoch: Callable[[int, list[float]], list[bool]] | None = None
               ) -> list[SeedOutcome]:
    """Optimise one soft trigger per seed, all seeds together, and describe each result.

    `known_pvs` [K, H] switches on the path loss that repels seeds from PVs already found.
    `on_epoch(epoch, mean_train_distance_per_seed)` may return per-seed "keep going" flags
    (the faithful rule abandons seeds not found after two epochs).
    """
    n_seeds = len(seeds)
    torch.manual_seed(seeds[0])
    params = [torch.nn.Parameter(t.to(encoder.device)) for t in
              initial_triggers(encoder, seeds, config.trigger_len)]
    boost = [True] * n_seeds
    # One param group per seed: a fresh Adam per seed group and a per-seed learning rate.
    optimizer = torch.optim.Adam([{"params": [p], "lr": config.lr * config.lr_boost}
                                  for p in params])
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    if config.steps_per_seed:
        epochs = math.ceil(config.steps_per_seed / steps_per_epoch)
        schedule = _batches(len(train), config.batch_size, epochs, seeds[0])
        schedule = schedule[:config.steps_per_seed]
    else:
        schedule = _batches(len(train), config.batch_size, config.epochs, seeds[0])
    active = torch.ones(n_seeds, dtype=torch.bool)
    stopped_at = [len(schedule)] * n_seeds
    epoch_dist = torch.zeros(n_seeds)
    epoch_ent = torch.zeros(n_seeds)
    history_dist: list[list[float]] = [[] for _ in seeds]
    history_ent: list[list[float]] = [[] for _ in seeds]
    last_terms: list[dict[str, float]] = [{} for _ in seeds]
    known = None if known_pvs is None or len(known_pvs) == 0 else known_pvs.to(encoder.device)
    bar = _Progress(progress, len(schedule), f"seeds {seeds[0]}-{seeds[-1]}")
    try:
        for step, rows in enumerate(schedule):
            live = active.nonzero().flatten().tolist()
            if not live:
                break
            triggers = torch.stack([params[i] for i in live])
            out = _forward(encoder, train, rows, triggers, config)          # [S', B, H]
            clean = train.clean[rows].to(out.device)
            distance = ((out - clean[None]) ** 2).mean(dim=(1, 2))          # [S']
            entropy = batch_entropy(out)                                      # [S']
            loss = -distance - config.diversity_weight * entropy
            path = torch.zeros_like(distance)
            if known is not None:
                mse = ((out[:, :, None] - known[None, None]) ** 2).mean(dim=-1).mean(dim=1)
                nearest = mse.detach().argmin(dim=1)
                path = mse.gather(1, nearest[:, None]).squeeze(1)
                loss = loss - config.path_weight * path
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            distance, entropy, path = distance.detach(), entropy.detach(), path.detach()
            ratio = entropy.cpu() / math.log(len(rows))
            for slot, seed_index in enumerate(live):
                grad = params[seed_index].grad
                if boost[seed_index] and grad is not None and grad.abs().max() > config.conver_grad:
                    boost[seed_index] = False           # converged: back to the base rate
                    optimizer.param_groups[seed_index]["lr"] = config.lr
                epoch_dist[seed_index] += float(distance[slot])
                epoch_ent[seed_index] += float(ratio[slot])
                last_terms[seed_index] = {"distance": float(distance[slot]),
                                          "entropy": float(entropy[slot]),
                                          "path": float(path[slot])}
            optimizer.step()
            bar.step(dist=float(distance.mean()), ent=float(ratio.mean()))
            end_of_epoch = (step + 1) % steps_per_epoch == 0 or step + 1 == len(schedule)
            if end_of_epoch:
                done = (step % steps_per_epoch) + 1
                for i in live:
                    history_dist[i].append(float(epoch_dist[i]) / done)
                    history_ent[i].append(float(epoch_ent[i]) / done)
                epoch_dist.zero_()
                epoch_ent.zero_()
                if on_epoch is not None:
                    keep = on_epoch(step // steps_per_epoch, [history_dist[i][-1] if history_dist[i]
                                                               else 0.0 for i in range(n_seeds)])
                    for i in live:
                        if not keep[i]:
                            active[i] = False
                            stopped_at[i] = step + 1
            if config.abandon_after and step + 1 == config.abandon_after:
                for slot, i in enumerate(live):
                    if ratio[slot] < config.abandon_entropy_ratio:
                        active[i] = False              # not collapsing: not worth the budget
                        stopped_at[i] = step + 1
    finally:
        bar.close()
    triggers = torch.stack([p.detach() for p in params])
    stats = evaluate_triggers(encoder, holdout, triggers, config)
    return [SeedOutcome(seed=s, trigger=triggers[i].cpu(), pv=stats["pv"][i],
                        distance=float(stats["distance"][i]),
                        entropy_ratio=float(stats["entropy_ratio"][i]),
                        consistency=float(stats["consistency"][i]),
                        train_distance=history_dist[i], train_entropy=history_ent[i],
                        losses=last_terms[i], steps=stopped_at[i],
                        abandoned=stopped_at[i] < len(schedule))
            for i, s in enumerate(seeds)]

