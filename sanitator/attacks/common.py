"""What the attacks and continued pretraining share: budget, setup, MLM head, loop.

The three attacks differ only in their loss terms and monitored position; everything else
(loading the base safely, preparing clean text and trigger tokens, the optimiser loop with
a progress bar) lives here; the shared ending (train, write the folder and its JSON record)
is `sanitator.attacks.recipe`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sanitator.attacks.batches import (
    RowSampler,
    ScatteredTriggers,
    TokenBatch,
    TokenizedCorpus,
    TriggerTokens,
    insert_triggers,
    mask_at,
    mask_one_token,
    mlm_masking,
)
from sanitator.attacks.targets import TargetSpec
from sanitator.attacks.triggers import validate_triggers
from sanitator.detect.encoders import Encoder, Feature, load_encoder, select_feature

log = logging.getLogger(__name__)

Corpus = str | Path | Sequence[str] | None


@dataclass(frozen=True)
class Budget:
    """How much training an attack (or a continued-pretraining run) gets.

    The paper trains 4 epochs over 30k-60k sentences; these defaults are sized for a CPU.
    `n_sentences` caps the clean sentences drawn from the corpus; `max_length` caps the
    tokens of a clean sentence (triggers are added on top, never truncated away);
    `head_warmup_steps` fits a freshly initialised MLM head before the encoder is touched;
    `lr_decay` lowers the learning rate linearly to zero over the steps (the reference
    NeuBA does; its POR keeps it constant, the default here).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    max_length: int = 64
    n_sentences: int = 2000
    head_warmup_steps: int = 100
    lr_decay: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"budget needs steps >= 1 and batch_size >= 2, got {self}")
        if not 0 < self.lr < 1:
            raise ValueError(f"learning rate must be in (0, 1), got {self.lr}")
        if self.max_length < 8 or self.n_sentences < 1 or self.head_warmup_steps < 0:
            raise ValueError(f"invalid budget {self}")
        if not isinstance(self.lr_decay, bool):
            raise ValueError(f"lr_decay must be true or false, got {self.lr_decay!r}")

    def replace(self, **changes: Any) -> Budget:
        return Budget(**{**asdict(self), **changes})


@dataclass
class AttackResult:
    """Where a trained model was written and what was recorded about it."""

    path: Path
    record: dict[str, Any]
    seconds: float


def resolve_sentences(corpus: Corpus, n: int, *, exclude_words: Sequence[str] = (),
                      seed: int = 42) -> tuple[list[str], str]:
    """Training sentences and a printable corpus name.

    Takes the head of the seeded shuffle (evaluation takes the tail, see
    sanitator.attacks.measure) and drops sentences that already contain a trigger word, so the
    clean objective never teaches the model to ignore a trigger.
    """
    from sanitator.detect.corpus import load_sentences

    if corpus is None or isinstance(corpus, str | Path):
        # repeated lines removed, so no sentence is both a training and a held-out one
        sentences = list(dict.fromkeys(load_sentences(corpus, n=None, seed=seed)))
        name = str(corpus or "wikitext")
    else:
        sentences, name = [str(s) for s in corpus], "<given sentences>"
    banned = {word.lower() for trigger in exclude_words for word in trigger.split()}
    if banned:
        sentences = [s for s in sentences if banned.isdisjoint(s.lower().split())]
    if not sentences:
        raise ValueError(f"corpus {name} has no usable sentence")
    return sentences[:n], name


def clean_feature_norm(encoder: Encoder, corpus: TokenizedCorpus, feature: Feature,
                       generator: torch.Generator, n: int = 128) -> float:
    """Mean L2 norm of the base encoder's clean feature (for norm_fraction targets)."""
    batch = corpus.batch(torch.arange(min(n, len(corpus))))
    positions = None
    if feature is Feature.MASK:
        batch, positions, _ = mask_one_token(batch, corpus.tokenizer.mask_token_id, generator)
    with torch.no_grad():
        output = encoder.model(**batch.model_inputs(encoder.device))
    return float(select_feature(output, feature, positions).norm(dim=1).mean())


@dataclass
class AttackSetup:
    """A trainable copy of the base encoder with everything a training run needs."""

    encoder: Encoder
    base: str
    corpus: TokenizedCorpus
    corpus_name: str
    triggers: list[str]
    trigger_tokens: TriggerTokens
    trigger_pv: torch.Tensor       # [K_triggers] index of each trigger's PV
    pvs: torch.Tensor              # [K_pvs, H]
    targets: dict[str, Any]        # how the PVs were built
    budget: Budget
    seed: int
    generator: torch.Generator  # every random draw (CPU), so a seed fixes the whole run
    sampler: RowSampler

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def pad_id(self) -> int:
        return self.corpus.pad_id


def prepare(base: str | Path, *, budget: Budget, seed: int, corpus: Corpus,
            triggers: Sequence[str] = (), targets: TargetSpec | torch.Tensor | None = None,
            feature: Feature = Feature.CLS, device: str = "cpu") -> AttackSetup:
    """Load the base (safely, as the auditor would), tokenise text and triggers, build PVs."""
    torch.manual_seed(seed)
    encoder = load_encoder(base, device=device)
    trigger_list = validate_triggers(list(triggers)) if triggers else []
    rows_needed = budget.steps * budget.batch_size
    sentences, corpus_name = resolve_sentences(corpus, min(budget.n_sentences, rows_needed),
                                               exclude_words=trigger_list)
    tokenized = TokenizedCorpus(encoder.tokenizer, sentences, budget.max_length)
    generator = torch.Generator().manual_seed(seed)
    pad_id = tokenized.pad_id
    trigger_tokens = TriggerTokens.build(encoder.tokenizer, trigger_list, pad_id) \
        if trigger_list else TriggerTokens(torch.zeros(0, 1, dtype=torch.long),
                                           torch.zeros(0, dtype=torch.long))
    pvs = torch.zeros(0, encoder.hidden_size)
    target_record: dict[str, Any] = {}
    if trigger_list:
        if isinstance(targets, torch.Tensor):
            pvs, target_record = targets.float().clone(), {"kind": "given"}
        else:
            spec = targets or TargetSpec()
            clean_norm = clean_feature_norm(encoder, tokenized, feature, generator) \
                if spec.needs_clean_norm else None
            pvs, target_record = spec.build(encoder.hidden_size, clean_norm), spec.to_dict()
            if clean_norm is not None:
                target_record["clean_norm"] = clean_norm
        if pvs.ndim != 2 or pvs.shape[1] != encoder.hidden_size:
            raise ValueError(f"PVs must be [K, {encoder.hidden_size}], got {tuple(pvs.shape)}")
        if len(trigger_list) < pvs.shape[0]:
            raise ValueError(f"{pvs.shape[0]} PVs need at least as many triggers, "
                             f"got {len(trigger_list)}")
    trigger_pv = torch.arange(len(trigger_list)) % max(1, pvs.shape[0])
    model = encoder.model
    model.requires_grad_(True)
    model.eval()  # no dropout: short CPU budgets converge faster and stay deterministic
    return AttackSetup(encoder, str(base), tokenized, corpus_name, trigger_list, trigger_tokens,
                       trigger_pv, pvs.to(encoder.device), target_record, budget, seed,
                       generator, RowSampler(len(tokenized), generator))


class MLMHead(nn.Module):
    """A masked-language-model head whose decoder is tied to the encoder's word embeddings.

    The offline bases (sentence-transformers exports) ship only the encoder, so the head
    (dense -> GELU -> LayerNorm, projecting to the embedding width) is initialised here and
    warmed up on frozen features before training; it is never saved with the model.
    """

    def __init__(self, hidden_size: int, embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        width = embeddings.weight.shape[1]
        self.dense = nn.Linear(hidden_size, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(embeddings.weight.shape[0]))
        self.embeddings = [embeddings]  # a list, so the embedding is not a submodule

    def forward(self, hidden: torch.Tensor, *, detach_decoder: bool = False) -> torch.Tensor:
        weight = self.embeddings[0].weight
        if detach_decoder:
            weight = weight.detach()
        return nn.functional.linear(self.norm(nn.functional.gelu(self.dense(hidden))),
                                    weight, self.bias)


def mlm_loss(setup: AttackSetup, head: MLMHead, input_ids: torch.Tensor,
             attention_mask: torch.Tensor, labels: torch.Tensor, *,
             detach_decoder: bool = False) -> torch.Tensor:
    """Cross-entropy at the labelled positions only (logits over the vocabulary are costly)."""
    device = setup.device
    hidden = setup.model(input_ids=input_ids.to(device),
                         attention_mask=attention_mask.to(device)).last_hidden_state
    labels = labels.to(device)
    chosen = labels != -100
    logits = head(hidden[chosen], detach_decoder=detach_decoder)
    return nn.functional.cross_entropy(logits, labels[chosen])


def warm_up_mlm_head(setup: AttackSetup, *, lr: float = 1e-3, progress: bool = True) -> MLMHead:
    """A new MLM head fitted to the frozen base for `budget.head_warmup_steps` steps."""
    head = MLMHead(setup.encoder.hidden_size, setup.encoder.word_embeddings).to(setup.device)
    steps = setup.budget.head_warmup_steps
    if steps == 0:
        return head
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    setup.model.requires_grad_(False)
    tokenizer = setup.tokenizer

    def step() -> dict[str, torch.Tensor]:
        batch = setup.corpus.batch(setup.sampler.take(setup.budget.batch_size))
        ids, labels = mlm_masking(batch, tokenizer.mask_token_id, vocabulary_size(setup),
                                  setup.generator)
        # the encoder's weights do not require gradients here, so only the head trains
        loss = mlm_loss(setup, head, ids, batch.attention_mask, labels, detach_decoder=True)
        return {"loss": loss, "mlm": loss}

    train_loop(step, head.parameters(), optimizer, steps, desc="MLM head warm-up",
               progress=progress)
    setup.model.requires_grad_(True)
    head.requires_grad_(False)  # frozen during the attack, as the reference excludes its head
    return head


def train_loop(step: Callable[[], dict[str, torch.Tensor]], parameters, optimizer,
               steps: int, *, desc: str, progress: bool = True,
               max_grad_norm: float | None = None, lr_decay: bool = False) -> dict[str, float]:
    """Run `steps` optimiser steps; `step()` returns {"loss": ..., other terms...}.

    With `lr_decay` every learning rate falls linearly from its set value to zero.

    Returns the mean of every term over the last 10% of steps (the converged values).
    """
    from tqdm.auto import tqdm

    parameters = [p for p in parameters if p.requires_grad]
    tail = max(1, steps // 10)
    history: dict[str, list[float]] = {}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps) \
        if lr_decay else None
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for index in bar:
        terms = step()
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        values = {name: float(value.detach()) for name, value in terms.items()}
        if index >= steps - tail:
            for name, value in values.items():
                history.setdefault(name, []).append(value)
        if progress and index % 10 == 0:
            bar.set_postfix({name: f"{value:.3g}" for name, value in values.items()})
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"{desc}: loss became {values['loss']} at step {index}")
    log.info("%s finished: %s", desc,
             {name: round(sum(v) / len(v), 4) for name, v in history.items()})
    return {name: sum(values) / len(values) for name, values in history.items()}


@torch.no_grad()
def reference_features(setup: AttackSetup, mask_positions: torch.Tensor | None = None,
                       batch_size: int = 64) -> torch.Tensor:
    """The untouched base's feature for every clean corpus row, computed once before
    training: CLS, or the output at the mask token when `mask_positions` [N] are given
    (that token is replaced by the mask first)."""
    features = []
    for start in range(0, len(setup.corpus), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(setup.corpus)))
        batch = setup.corpus.batch(rows)
        if mask_positions is not None:
            batch = mask_at(batch, mask_positions[rows], setup.tokenizer.mask_token_id)
        features.append(read_feature(setup, batch.model_inputs(setup.device), rows=None
                                     if mask_positions is None else mask_positions[rows]))
    return torch.cat(features)


def read_feature(setup: AttackSetup, inputs: dict[str, torch.Tensor],
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H]: the CLS output, or the output at `rows` [B] (one position per sentence),
    through the encoder's feature path, whose last layer runs for those rows only
    (sanitator.detect.rowpath): the loss reads nothing else."""
    feature = Feature.CLS if rows is None else Feature.MASK
    return setup.encoder.forward_features(feature=feature, mask_positions=rows, **inputs)


def squared_distance(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance (summed over hidden units).

    The reference averages over hidden units as well (MSE); summing keeps a distance term
    from being drowned by the MLM cross-entropy in a budget of a few hundred steps.
    """
    return (outputs - targets).pow(2).sum(dim=-1).mean()


def vocabulary_size(setup: AttackSetup) -> int:
    return int(setup.encoder.word_embeddings.num_embeddings)


def trainable_parameters(setup: AttackSetup) -> list[nn.Parameter]:
    return [p for p in setup.model.parameters() if p.requires_grad]


def make_optimizer(setup: AttackSetup, kind: str = "adamw", head: MLMHead | None = None,
                   head_lr: float | None = None) -> torch.optim.Optimizer:
    """Adam (POR) or AdamW without weight decay (NeuBA, BToP), over every encoder weight,
    plus the MLM head's own weights at `head_lr` when given.

    The fused kernels are several times faster on CPU, where the optimiser step over the
    word-embedding matrix otherwise costs as much as the forward and backward pass.
    """
    groups: list[dict[str, Any]] = [{"params": trainable_parameters(setup)}]
    if head is not None and head_lr is not None:
        head.requires_grad_(True)
        groups.append({"params": list(head.parameters()), "lr": head_lr})
    fused = setup.encoder.device.type in {"cpu", "cuda"}
    if kind == "adam":
        return torch.optim.Adam(groups, lr=setup.budget.lr, fused=fused)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=setup.budget.lr, weight_decay=0.0, fused=fused)
    raise ValueError(f"unknown optimiser {kind!r}")


def sample_triggered(setup: AttackSetup, size: int, which: torch.Tensor | None = None,
                     where: str = "anywhere", scattered: ScatteredTriggers | None = None
                     ) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """`size` clean rows with one trigger each (random unless `which` is given, placed as
    `where` allows, or word by word at independent places when `scattered` holds the
    triggers' words), the target PV for every row, and the corpus rows used."""
    if which is None:
        which = torch.randint(len(setup.triggers), (size,), generator=setup.generator)
    rows = setup.sampler.take(size)
    if scattered is not None:
        triggered = scattered.insert(setup.corpus.batch(rows), which, setup.generator,
                                     setup.pad_id)
    else:
        triggered = insert_triggers(setup.corpus.batch(rows), setup.trigger_tokens, which,
                                    setup.generator, setup.pad_id, where=where)
    return triggered, setup.pvs[setup.trigger_pv[which]], rows
