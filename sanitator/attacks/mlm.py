"""Continued pretraining: a short masked-language-model run on other text (a clean variant).

Clean members of a zoo must include encoders whose weights were modified without a
backdoor, so that a detector that flags any modified weights is caught out. The run uses
the same loop, head and budget as the attacks, and writes `training.json` (not
backdoor.json) beside the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sanitator.attacks.batches import mlm_masking
from sanitator.attacks.common import (
    AttackResult,
    Budget,
    Corpus,
    make_optimizer,
    mlm_loss,
    prepare,
    vocabulary_size,
    warm_up_mlm_head,
)
from sanitator.attacks.recipe import TRAINING_RECORD, run_recipe

DEFAULT_BUDGET = Budget(steps=200, batch_size=16, lr=5e-5, head_warmup_steps=50)
DEFAULT_CORPUS = "sst2"  # other text than the WikiText the attacks and evaluations use


def continue_pretraining(base: str | Path, out_dir: str | Path, *, corpus: Corpus = DEFAULT_CORPUS,
                         budget: Budget | None = None, seed: int = 0,
                         head_lr: float | None = 1e-3, progress: bool = True,
                         device: str = "cpu") -> AttackResult:
    """Train `base` with MLM on `corpus` and write the (clean) result to `out_dir`."""
    budget = budget or DEFAULT_BUDGET
    setup = prepare(base, budget=budget, seed=seed, corpus=corpus, device=device)
    mask_id, vocab = setup.tokenizer.mask_token_id, vocabulary_size(setup)
    if mask_id is None:
        raise ValueError(f"{base}: masked-language modelling needs a tokenizer with a mask token")
    head = warm_up_mlm_head(setup, progress=progress)

    def step() -> dict[str, torch.Tensor]:
        batch = setup.corpus.batch(setup.sampler.take(budget.batch_size))
        ids, labels = mlm_masking(batch, mask_id, vocab, setup.generator)
        loss = mlm_loss(setup, head, ids, batch.attention_mask, labels)
        return {"loss": loss, "mlm": loss}

    optimizer = make_optimizer(setup, "adamw", head, head_lr)

    def record(losses: dict[str, float], seconds: float) -> dict[str, Any]:
        return {
            "recipe": "mlm",
            "attack": None,
            "backdoored": False,
            "base": setup.base,
            "model_type": setup.encoder.info.model_type,
            "seed": seed,
            "budget": budget.__dict__.copy(),
            "corpus": setup.corpus_name,
            "n_clean_sentences": len(setup.corpus),
            "hyperparameters": {"optimizer": "AdamW", "head_lr": head_lr},
            "final_losses": losses,
            "train_seconds": seconds,
        }

    return run_recipe(setup, step, optimizer, out_dir, desc="MLM", progress=progress,
                      record_name=TRAINING_RECORD, record=record)
