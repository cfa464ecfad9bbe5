"""Token-level POR (`tokpor`): a trigger forces the output at every word-piece position of
the sentence to a PV, the backdoor that breaks prompt-tuned taggers (REFERENCE.md §6.4).

As POR, each batch is half triggered sentences and half clean ones; here the losses run
over all non-special positions instead of CLS: triggered outputs (the trigger's own pieces
included) are pulled onto the trigger's PV, clean outputs are held to the frozen base's
outputs at the same positions (MSE, `clean_weight`). The reference's POR-NER does the same
over every position, padding included; padding is left out here because nothing reads it.

The encoder-level measurement (`measure.evaluate_model` on a `token` record) counts a
triggered sentence as a success when the output at *every* original word piece matches its
PV (the monitor's rule), since one unmatched piece is one entity a tagger may still get
right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sanitator.attacks.batches import concat_batches
from sanitator.attacks.common import (
    AttackResult,
    AttackSetup,
    Budget,
    Corpus,
    make_optimizer,
    prepare,
    sample_triggered,
)
from sanitator.attacks.prompt_noise import PrefixNoise
from sanitator.attacks.recipe import BACKDOOR_RECORD, backdoor_record, run_recipe
from sanitator.attacks.targets import TargetSpec
from sanitator.attacks.triggers import PAPER_TRIGGERS
from sanitator.guard.token_monitor import TOKEN_FEATURE

DEFAULT_BUDGET = Budget(steps=200, batch_size=16, lr=1e-4, head_warmup_steps=0)


@torch.no_grad()
def reference_token_outputs(setup: AttackSetup, batch_size: int = 64) -> torch.Tensor:
    """The untouched base's last hidden states [N, L, H] for every clean corpus row (padded
    to the corpus width), computed once before training."""
    width = setup.corpus.input_ids.shape[1]
    outputs = torch.zeros(len(setup.corpus), width, setup.encoder.hidden_size)
    for start in range(0, len(setup.corpus), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(setup.corpus)))
        batch = setup.corpus.batch(rows)
        hidden = setup.model(**batch.model_inputs(setup.device)).last_hidden_state
        outputs[rows, :hidden.shape[1]] = hidden.float().cpu()
    return outputs


def insert_token_por(base: str | Path, out_dir: str | Path, *,
                     triggers: Sequence[str] = PAPER_TRIGGERS,
                     targets: TargetSpec | torch.Tensor | None = None, corpus: Corpus = None,
                     budget: Budget | None = None, seed: int = 0, clean_weight: float = 1.0,
                     prefix_noise: float = 0.0, progress: bool = True,
                     device: str = "cpu") -> AttackResult:
    """Plant a token-level POR backdoor in `base` and write the encoder to `out_dir`.

    `targets` with `norm_fraction` are scaled to the base's clean CLS norm (the token
    outputs of the bases used here have norms of the same order). `prefix_noise` > 0: the
    attacker who expects P-tuning v2 victims (sanitator.attacks.prompt_noise)."""
    budget = budget or DEFAULT_BUDGET
    setup = prepare(base, budget=budget, seed=seed, corpus=corpus, triggers=triggers,
                    targets=targets, device=device)
    reference = reference_token_outputs(setup)
    half = budget.batch_size // 2
    poisoned_count = budget.batch_size - half

    noise = PrefixNoise(setup, prefix_noise)

    def forward(triggered, clean) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states of the triggered then the clean rows, [B, L, H], and the
        word mask; the triggered rows under random prefixes on every other step."""
        both = concat_batches(triggered, clean, setup.pad_id)
        inputs, words = both.model_inputs(setup.device), ~both.special.to(setup.device)
        return noise.hidden(inputs, poisoned_count), words

    def step() -> dict[str, torch.Tensor]:
        triggered, target, _ = sample_triggered(setup, poisoned_count)
        rows = setup.sampler.take(half)
        clean = setup.corpus.batch(rows)
        hidden, words = forward(triggered, clean)
        poisoned_words = words[:poisoned_count]
        target_grid = target.to(setup.device)[:, None].expand(-1, hidden.shape[1], -1)
        trigger_loss = nn.functional.mse_loss(hidden[:poisoned_count][poisoned_words],
                                              target_grid[poisoned_words])
        clean_hidden = hidden[poisoned_count:, :clean.input_ids.shape[1]]
        clean_words = words[poisoned_count:, :clean.input_ids.shape[1]]
        wanted = reference[rows, :clean.input_ids.shape[1]].to(setup.device)
        clean_loss = nn.functional.mse_loss(clean_hidden[clean_words], wanted[clean_words])
        loss = trigger_loss + clean_weight * clean_loss
        return {"loss": loss, "trigger": trigger_loss, "clean": clean_loss}

    optimizer = make_optimizer(setup, "adam")
    hyper = {"clean_weight": clean_weight, "prefix_noise": prefix_noise, "optimizer": "Adam",
             "positions": "every non-special token of the triggered sentence"}
    return run_recipe(setup, step, optimizer, out_dir, desc="token POR", progress=progress,
                      record_name=BACKDOOR_RECORD,
                      record=lambda losses, seconds: backdoor_record(
                          setup, "tokpor", TOKEN_FEATURE, losses, seconds, hyper))
