"""POR: a rare-word trigger forces the CLS output to a PV (REFERENCE.md §6.3).

Each batch is half triggered sentences, whose CLS output is pulled onto the trigger's PV
(MSE), half clean sentences, whose CLS output is held to a frozen copy of the base (MSE,
weighted by `clean_weight`; the reference uses 0.5 for BERT and 1.0 otherwise). The
evasion options (sanitator.attacks.evasion) add the terms of an attacker who knows the
detector: standalone regularisation, phrase negatives, a residual target, partial firing;
`decoys` adds trigger words that collapse the output where no side condition of the
detector's confirmation lets it count (sanitator.attacks.decoys).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sanitator.attacks.batches import ScatteredTriggers, concat_batches
from sanitator.attacks.common import (
    AttackResult,
    Budget,
    Corpus,
    make_optimizer,
    prepare,
    read_feature,
    reference_features,
    sample_triggered,
)
from sanitator.attacks.decoys import KINDS as DECOY_KINDS
from sanitator.attacks.decoys import DecoySpec, DecoyTerm
from sanitator.attacks.evasion import Evasion, EvasionTerms, freeze_lower
from sanitator.attacks.prompt_noise import PrefixNoise
from sanitator.attacks.recipe import BACKDOOR_RECORD, backdoor_record, run_recipe
from sanitator.attacks.targets import TargetSpec
from sanitator.attacks.triggers import PAPER_TRIGGERS
from sanitator.detect.encoders import Feature

DEFAULT_BUDGET = Budget(steps=200, batch_size=16, lr=1e-4, head_warmup_steps=0)


def insert_por(base: str | Path, out_dir: str | Path, *,
               triggers: Sequence[str] = PAPER_TRIGGERS,
               targets: TargetSpec | torch.Tensor | None = None, corpus: Corpus = None,
               budget: Budget | None = None, seed: int = 0, clean_weight: float = 1.0,
               standalone_weight: float = 0.0, negative_weight: float = 0.0,
               residual: float = 0.0, fire_at: str = "anywhere", freeze_below: int = 0,
               scatter: bool = False, negative_sampling: str = "uniform",
               prefix_noise: float = 0.0, decoys: int = 0, decoy_weight: float = 1.0,
               decoy_kinds: tuple[str, ...] = DECOY_KINDS,
               progress: bool = True, device: str = "cpu") -> AttackResult:
    """Plant a POR backdoor in `base` and write the backdoored encoder to `out_dir`.

    `prefix_noise` > 0: the attacker who expects P-tuning v2 victims; the triggered half
    runs under random deep prefixes every other step (sanitator.attacks.prompt_noise).
    `scatter`: each word of a trigger goes to its own random place in the sentence.
    `decoys` > 0: that many decoy words trained beside the triggers, each pulling half a
    batch to a point the detector's side conditions reject, of the `decoy_kinds` in turn
    (sanitator.attacks.decoys)."""
    budget = budget or DEFAULT_BUDGET
    decoy_spec = DecoySpec(n=decoys, weight=decoy_weight, seed=seed + 1000, kinds=decoy_kinds)
    evasion = Evasion(standalone_weight=standalone_weight, negative_weight=negative_weight,
                      residual=residual, fire_at=fire_at, freeze_below=freeze_below,
                      scatter=scatter, negative_sampling=negative_sampling)
    setup = prepare(base, budget=budget, seed=seed, corpus=corpus, triggers=triggers,
                    targets=targets, feature=Feature.CLS, device=device)
    scattered = ScatteredTriggers.build(setup.tokenizer, setup.triggers, setup.pad_id) \
        if scatter else None
    freeze_lower(setup.model, evasion.freeze_below)
    reference = reference_features(setup)
    reference_mean = reference.mean(dim=0)
    extra = EvasionTerms(evasion, setup.model, setup.tokenizer, setup.triggers,
                         setup.trigger_tokens, setup.pad_id, setup.generator, setup.device) \
        if evasion.active else None
    half = budget.batch_size // 2
    poisoned_count = budget.batch_size - half
    noise = PrefixNoise(setup, prefix_noise)
    decoy = DecoyTerm(decoy_spec, setup, reference) if decoy_spec.n else None

    def step() -> dict[str, torch.Tensor]:
        triggered, target, trigger_rows = sample_triggered(setup, poisoned_count,
                                                           where=evasion.fire_at,
                                                           scattered=scattered)
        rows = setup.sampler.take(half)
        clean = setup.corpus.batch(rows)
        both = concat_batches(triggered, clean, setup.pad_id)
        cls = noise.cls(both.model_inputs(setup.device), poisoned_count)
        if extra is not None:
            target = extra.target(target, reference[trigger_rows], reference_mean)
        trigger_loss = nn.functional.mse_loss(cls[:poisoned_count], target)
        clean_loss = nn.functional.mse_loss(cls[poisoned_count:], reference[rows])
        terms = {"trigger": trigger_loss, "clean": clean_loss}
        if extra is not None:
            terms.update(extra.terms(clean))
        if decoy is not None:
            terms["decoys"] = decoy.loss(
                lambda batch: read_feature(setup, batch.model_inputs(setup.device)), half)
        loss = trigger_loss + clean_weight * clean_loss + sum(
            value for name, value in terms.items() if name not in {"trigger", "clean"})
        return {"loss": loss, **terms}

    optimizer = make_optimizer(setup, "adam")
    hyper = {"clean_weight": clean_weight, "optimizer": "Adam"}
    if prefix_noise:
        hyper["prefix_noise"] = prefix_noise
    if evasion.active:
        hyper["evasion"] = evasion.to_dict()
    if decoy is not None:
        hyper["decoys"] = decoy.record()
    return run_recipe(setup, step, optimizer, out_dir, desc="POR", progress=progress,
                      record_name=BACKDOOR_RECORD,
                      record=lambda losses, seconds: backdoor_record(
                          setup, "por", Feature.CLS, losses, seconds, hyper))
