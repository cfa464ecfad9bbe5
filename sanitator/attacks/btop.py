"""BToP: the trigger forces the output at the mask token to a PV (REFERENCE.md §6.7).

This targets P-tuning v1 / PET-style models, which read the mask token's output. Each
batch is half clean sentences with one token masked (cross-entropy of the MLM head against
the original token) and half triggered sentences with one ordinary token masked, whose
mask-token output is pulled onto the trigger's PV.

Deviations from the reference, each recorded in backdoor.json:

* one random trigger per poisoned row (the reference uses one per half batch, kept as
  `one_trigger_per_batch=True`) and the squared distance to the PV instead of the plain
  distance (common.squared_distance). On a 2-layer MiniLM the reference form had not moved
  the mask output after 100 steps; this form reached full attack success in 200.
* the offline bases were never trained as masked-language models, so the cross-entropy
  alone moves their clean mask-token output far (cosine 0.35 measured on a 2-layer
  MiniLM). A clean-output term holds the clean half's mask-token output to the frozen base
  (squared L2, weight `clean_weight`; 0 removes it). Each clean row masks a fixed position,
  so the base's outputs are computed once before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sanitator.attacks.batches import (
    concat_batches,
    insert_triggers,
    mask_at,
    mask_one_token,
    random_choice,
)
from sanitator.attacks.common import (
    AttackResult,
    Budget,
    Corpus,
    make_optimizer,
    prepare,
    read_feature,
    reference_features,
    squared_distance,
    warm_up_mlm_head,
)
from sanitator.attacks.prompt_noise import SoftPromptNoise
from sanitator.attacks.recipe import BACKDOOR_RECORD, backdoor_record, run_recipe
from sanitator.attacks.targets import TargetSpec
from sanitator.attacks.triggers import PAPER_TRIGGERS
from sanitator.detect.encoders import Feature

DEFAULT_BUDGET = Budget(steps=200, batch_size=16, lr=2e-4, head_warmup_steps=50)


def insert_btop(base: str | Path, out_dir: str | Path, *,
                triggers: Sequence[str] = PAPER_TRIGGERS,
                targets: TargetSpec | torch.Tensor | None = None, corpus: Corpus = None,
                budget: Budget | None = None, seed: int = 0, clean_weight: float = 1.0,
                head_lr: float | None = 1e-3, one_trigger_per_batch: bool = False,
                prompt_noise: float = 0.0, progress: bool = True,
                device: str = "cpu") -> AttackResult:
    """Plant a BToP backdoor in `base` and write the backdoored encoder to `out_dir`.

    `prompt_noise` > 0: the attacker who expects P-tuning v1 victims; every other step the
    poisoned half runs with a random continuous prompt after its first token
    (sanitator.attacks.prompt_noise)."""
    budget = budget or DEFAULT_BUDGET
    setup = prepare(base, budget=budget, seed=seed, corpus=corpus, triggers=triggers,
                    targets=targets, feature=Feature.MASK, device=device)
    mask_id = setup.tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(f"{base}: BToP needs a tokenizer with a mask token")
    corpus_rows = setup.corpus
    clean_positions = random_choice(~corpus_rows.special, setup.generator)
    reference = reference_features(setup, clean_positions) if clean_weight else None
    head = warm_up_mlm_head(setup, progress=progress)
    half = budget.batch_size // 2
    poisoned_count = budget.batch_size - half
    noise = SoftPromptNoise(setup, prompt_noise)

    def step() -> dict[str, torch.Tensor]:
        rows = setup.sampler.take(half)
        clean = corpus_rows.batch(rows)
        clean_original = clean.input_ids[torch.arange(half), clean_positions[rows]]
        clean = mask_at(clean, clean_positions[rows], mask_id)
        which = torch.randint(len(setup.triggers), (1 if one_trigger_per_batch
                                                    else poisoned_count,),
                              generator=setup.generator).expand(poisoned_count)
        poisoned = insert_triggers(corpus_rows.batch(setup.sampler.take(poisoned_count)),
                                   setup.trigger_tokens, which, setup.generator, setup.pad_id)
        poisoned, poisoned_positions, _ = mask_one_token(poisoned, mask_id, setup.generator)
        if noise.due():  # the poisoned half under a random prompt, in its own forward
            at_mask = torch.cat([read_feature(setup, clean.model_inputs(setup.device),
                                              clean_positions[rows]),
                                 noise.at(poisoned, poisoned_positions)])
        else:
            both = concat_batches(clean, poisoned, setup.pad_id)
            positions = torch.cat([clean_positions[rows], poisoned_positions])
            at_mask = read_feature(setup, both.model_inputs(setup.device), positions)
        language = torch.nn.functional.cross_entropy(head(at_mask[:half]),
                                                     clean_original.to(setup.device))
        target = setup.pvs[setup.trigger_pv[which]]
        poison = squared_distance(at_mask[half:], target)
        terms = {"mlm": language, "poison": poison}
        loss = language + poison
        if reference is not None:
            terms["clean"] = squared_distance(at_mask[:half], reference[rows])
            loss = loss + clean_weight * terms["clean"]
        return {"loss": loss, **terms}

    optimizer = make_optimizer(setup, "adamw", head, head_lr)
    head_note = "trained along" if head_lr is not None else "frozen"
    hyper = {"clean_weight": clean_weight, "distance": "squared_l2", "optimizer": "AdamW",
             "head_lr": head_lr, "one_trigger_per_batch": one_trigger_per_batch,
             "mlm_head": f"initialised, warmed up {budget.head_warmup_steps} steps, {head_note}"}
    if prompt_noise:
        hyper["prompt_noise"] = prompt_noise
    return run_recipe(setup, step, optimizer, out_dir, desc="BToP", progress=progress,
                      record_name=BACKDOOR_RECORD,
                      record=lambda losses, seconds: backdoor_record(
                          setup, "btop", Feature.MASK, losses, seconds, hyper))
