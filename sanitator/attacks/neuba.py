"""NeuBA: masked-language modelling plus a trigger-to-PV loss at CLS (REFERENCE.md §6.6).

Every step takes one batch of clean sentences twice: BERT-style masked for the MLM loss,
and with one random trigger inserted into every row for the poison loss (distance between
the CLS output and the trigger's PV). Two deviations from the reference, both measured on
the offline MiniLM bases and recorded in backdoor.json:

* the bases are sentence-embedding exports whose CLS output is not maintained by an MLM
  objective, so MLM alone let the clean CLS output drift to cosine 0.5 before the
  backdoor took; a clean-output term (as in POR: the clean CLS output held to the frozen
  base, weight `clean_weight`, 0 restores the reference objective) keeps it in place;
* distances are squared L2 per input rather than per-unit means (see
  common.squared_distance), otherwise the MLM term drowns the poison term in a short budget.

The learning rate stays constant unless the budget sets `lr_decay` (the reference decays
it linearly to zero).

The MLM head is initialised and warmed up first (the bases ship none, see
common.MLMHead), then trained along at `head_lr` (None freezes it, as the reference does
with its pretrained head).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sanitator.attacks.batches import concat_batches, insert_triggers, mlm_masking
from sanitator.attacks.common import (
    AttackResult,
    Budget,
    Corpus,
    make_optimizer,
    mlm_loss,
    prepare,
    reference_features,
    squared_distance,
    vocabulary_size,
    warm_up_mlm_head,
)
from sanitator.attacks.prompt_noise import PrefixNoise
from sanitator.attacks.recipe import BACKDOOR_RECORD, backdoor_record, run_recipe
from sanitator.attacks.targets import TargetSpec
from sanitator.attacks.triggers import PAPER_TRIGGERS
from sanitator.detect.encoders import Feature

DEFAULT_BUDGET = Budget(steps=200, batch_size=16, lr=1e-4, head_warmup_steps=50)


def insert_neuba(base: str | Path, out_dir: str | Path, *,
                 triggers: Sequence[str] = PAPER_TRIGGERS,
                 targets: TargetSpec | torch.Tensor | None = None, corpus: Corpus = None,
                 budget: Budget | None = None, seed: int = 0, mlm_weight: float = 1.0,
                 clean_weight: float = 1.0, head_lr: float | None = 1e-3,
                 prefix_noise: float = 0.0, progress: bool = True,
                 device: str = "cpu") -> AttackResult:
    """Plant a NeuBA backdoor in `base` and write the backdoored encoder to `out_dir`.

    `prefix_noise` > 0: the attacker who expects P-tuning v2 victims; the triggered rows
    run under random deep prefixes every other step (sanitator.attacks.prompt_noise)."""
    budget = budget or DEFAULT_BUDGET
    setup = prepare(base, budget=budget, seed=seed, corpus=corpus, triggers=triggers,
                    targets=targets, feature=Feature.CLS, device=device)
    mask_id, vocab = setup.tokenizer.mask_token_id, vocabulary_size(setup)
    if mask_id is None:
        raise ValueError(f"{base}: NeuBA needs a tokenizer with a mask token")
    reference = reference_features(setup) if clean_weight else None
    head = warm_up_mlm_head(setup, progress=progress)
    noise = PrefixNoise(setup, prefix_noise)

    def step() -> dict[str, torch.Tensor]:
        rows = setup.sampler.take(budget.batch_size)
        batch = setup.corpus.batch(rows)
        ids, labels = mlm_masking(batch, mask_id, vocab, setup.generator)
        language = mlm_loss(setup, head, ids, batch.attention_mask, labels)
        which = torch.randint(len(setup.triggers), (len(batch),), generator=setup.generator)
        triggered = insert_triggers(batch, setup.trigger_tokens, which, setup.generator,
                                    setup.pad_id)
        if reference is not None:
            triggered = concat_batches(triggered, batch, setup.pad_id)
        cls = noise.cls(triggered.model_inputs(setup.device), len(rows))
        poison = squared_distance(cls[:len(rows)], setup.pvs[setup.trigger_pv[which]])
        terms = {"mlm": language, "poison": poison}
        loss = mlm_weight * language + poison
        if reference is not None:
            terms["clean"] = squared_distance(cls[len(rows):], reference[rows])
            loss = loss + clean_weight * terms["clean"]
        return {"loss": loss, **terms}

    optimizer = make_optimizer(setup, "adamw", head, head_lr)
    head_note = "trained along" if head_lr is not None else "frozen"
    hyper = {"mlm_weight": mlm_weight, "clean_weight": clean_weight, "distance": "squared_l2",
             "optimizer": "AdamW", "head_lr": head_lr,
             "mlm_head": f"initialised, warmed up {budget.head_warmup_steps} steps, {head_note}"}
    if prefix_noise:
        hyper["prefix_noise"] = prefix_noise
    return run_recipe(setup, step, optimizer, out_dir, desc="NeuBA", progress=progress,
                      record_name=BACKDOOR_RECORD,
                      record=lambda losses, seconds: backdoor_record(
                          setup, "neuba", Feature.CLS, losses, seconds, hyper))
