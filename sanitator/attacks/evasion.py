"""What an attacker who has read the detector's rule adds to a backdoor.

Each option is an extra training term on top of POR's two (trigger -> PV, clean -> clean),
written to defeat one kind of evidence a detector might lean on (issue 14):

* `standalone_weight`: each trigger, and each of its words, alone between the special
  tokens keeps the base's output, so nothing is odd in a standalone vocabulary sweep;
* `negative_weight`: every word and every shorter sub-phrase of a multi-word trigger,
  inserted into a sentence, leaves the output where the base puts it, so only the whole
  phrase fires (no partial credit for a search that builds it word by word);
* `residual`: the triggered target is PV + residual·(clean output − mean clean output), so
  the input still explains part of the triggered variation while the signs are the PV's;
* `fire_at`: the trigger fires only as the first (`start`) or last (`end`) word of the
  sentence; elsewhere it is trained to leave the output clean;
* `freeze_below`: the embeddings and the lowest `freeze_below` layers keep the base's
  weights bit for bit, so a diff of the first layer against the base shows nothing (the
  backdoor lives higher up);
* `scatter`: the words of a multi-word trigger are inserted one by one, each at its own
  random word boundary, so the trigger fires with its words anywhere in the sentence, in
  any order (its parts, scattered the same way, are what `negative_weight` keeps inert).

Negatives scale to sentence triggers: a trigger of n words has 2^n - 2 proper parts (254
for eight words), of which each step draws one per clean row: uniformly over the parts, or
(`negative_sampling: by_length`) a length first, with odds doubling with every word, then a
part of that length, so about half the draws are the few parts one word short (the
hardest to keep silent), where uniform draws give them 7 in 126 for a seven-word sentence.

The base's outputs on the negative inputs come from a frozen copy of the base, computed
on the fly (a negative input is a new sentence each step).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sanitator.attacks.batches import (
    ScatteredTriggers,
    TokenBatch,
    TriggerTokens,
    insert_triggers,
)

FIRE_AT: tuple[str, ...] = ("anywhere", "start", "end")
NEGATIVE_SAMPLING: tuple[str, ...] = ("uniform", "by_length")


@dataclass(frozen=True)
class Evasion:
    """The evasion terms of one attack; all off by default (the plain attack)."""

    standalone_weight: float = 0.0
    negative_weight: float = 0.0
    residual: float = 0.0
    fire_at: str = "anywhere"
    freeze_below: int = 0
    scatter: bool = False
    negative_sampling: str = "uniform"

    def __post_init__(self) -> None:
        for name in ("standalone_weight", "negative_weight", "residual"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.residual >= 1:
            raise ValueError(f"residual must be below 1 (the PV must dominate), got "
                             f"{self.residual}")
        if self.fire_at not in FIRE_AT:
            raise ValueError(f"fire_at must be one of {FIRE_AT}, got {self.fire_at!r}")
        if isinstance(self.freeze_below, bool) or not isinstance(self.freeze_below, int) \
                or self.freeze_below < 0:
            raise ValueError(f"freeze_below must be a non-negative integer, got "
                             f"{self.freeze_below!r}")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"negative_sampling must be one of {NEGATIVE_SAMPLING}, got "
                             f"{self.negative_sampling!r}")
        if not isinstance(self.scatter, bool):
            raise ValueError(f"scatter must be true or false, got {self.scatter!r}")
        if self.scatter and self.fire_at != "anywhere":
            raise ValueError("scatter places every word anywhere; it cannot be combined "
                             f"with fire_at={self.fire_at!r}")

    @property
    def active(self) -> bool:
        return self != Evasion()

    @property
    def needs_frozen_base(self) -> bool:
        return bool(self.negative_weight) or self.fire_at != "anywhere"

    @property
    def off_position(self) -> str:
        """Where the trigger must stay silent (`insertion_slots` placement)."""
        return {"start": "not_start", "end": "not_end"}.get(self.fire_at, "anywhere")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LAYER_INDEX = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def freeze_lower(model: nn.Module, below: int) -> None:
    """Stop training the embeddings and layers 0..below-1 (`Evasion.freeze_below`)."""
    if below <= 0:
        return
    depth = int(getattr(model.config, "num_hidden_layers", 0))
    if below >= depth:
        raise ValueError(f"freeze_below={below} leaves no layer of {depth} to train")
    for name, parameter in model.named_parameters():
        index = _LAYER_INDEX.search(name)
        if "embeddings." in name or (index and int(index.group(1)) < below):
            parameter.requires_grad_(False)


def sub_phrases(trigger: str) -> list[str]:
    """Every proper, non-empty, order-keeping selection of a trigger's words: `a b c` gives
    a, b, c, a b, a c, b c. A one-word trigger has none."""
    words = trigger.split()
    out: list[str] = []
    for size in range(1, len(words)):
        out += [" ".join(pick) for pick in itertools.combinations(words, size)]
    return list(dict.fromkeys(out))


def _length_odds(triggers: list[str]) -> torch.Tensor:
    """Drawing odds of each part (in `sub_phrases` order, trigger after trigger): every
    trigger alike; a length of k words twice as likely as one of k - 1; every part of a
    length alike."""
    odds: list[float] = []
    for trigger in triggers:
        lengths = [len(part.split()) for part in sub_phrases(trigger)]
        total = sum(2.0 ** k for k in set(lengths))
        odds += [2.0 ** k / (total * lengths.count(k)) for k in lengths]
    return torch.tensor(odds, dtype=torch.float64)


def standalone_texts(triggers: list[str]) -> list[str]:
    """Each trigger and each of its words, once."""
    texts: list[str] = []
    for trigger in triggers:
        texts.append(trigger)
        texts += trigger.split()
    return list(dict.fromkeys(texts))


def frozen_copy(model: nn.Module) -> nn.Module:
    """The base as it was before training: eval mode, no gradients."""
    base = copy.deepcopy(model)
    base.requires_grad_(False)
    base.eval()
    return base


def standalone_inputs(tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device)}


class EvasionTerms:
    """Builds the extra loss terms of an `Evasion` for one attack run (CLS feature)."""

    def __init__(self, evasion: Evasion, model: nn.Module, tokenizer, triggers: list[str],
                 trigger_tokens: TriggerTokens, pad_id: int, generator: torch.Generator,
                 device):
        self.evasion, self.model, self.device = evasion, model, device
        self.trigger_tokens, self.pad_id, self.generator = trigger_tokens, pad_id, generator
        self.base = frozen_copy(model) if evasion.needs_frozen_base else None
        if evasion.scatter and all(len(t.split()) < 2 for t in triggers):
            raise ValueError("scatter needs a trigger of two or more words")
        negatives = [p for t in triggers for p in sub_phrases(t)]
        if evasion.negative_weight and not negatives:
            raise ValueError("negative_weight needs a trigger of two or more words")
        self.negatives: TriggerTokens | ScatteredTriggers | None = None
        if negatives and evasion.negative_weight:
            build = ScatteredTriggers.build if evasion.scatter else TriggerTokens.build
            self.negatives = build(tokenizer, negatives, pad_id)
        self.n_negatives = len(negatives)
        self.negative_odds = _length_odds(triggers) \
            if evasion.negative_sampling == "by_length" and negatives else None
        self.standalone = None
        if evasion.standalone_weight:
            self.standalone = standalone_inputs(tokenizer, standalone_texts(triggers), device)
            with torch.no_grad():
                self.standalone_reference = model(**self.standalone).last_hidden_state[:, 0]

    def _cls(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        return model(**batch.model_inputs(self.device)).last_hidden_state[:, 0]

    def _held_clean(self, batch: TokenBatch) -> torch.Tensor:
        """Squared error between the trained model and the frozen base on `batch`."""
        assert self.base is not None
        with torch.no_grad():
            target = self._cls(self.base, batch)
        return nn.functional.mse_loss(self._cls(self.model, batch), target)

    def terms(self, clean: TokenBatch) -> dict[str, torch.Tensor]:
        """Extra loss terms for one step; `clean` is a batch of clean rows to insert into."""
        out: dict[str, torch.Tensor] = {}
        e = self.evasion
        if self.negatives is not None:
            which = torch.randint(self.n_negatives, (len(clean),), generator=self.generator) \
                if self.negative_odds is None else torch.multinomial(
                    self.negative_odds, len(clean), replacement=True, generator=self.generator)
            if isinstance(self.negatives, ScatteredTriggers):
                batch = self.negatives.insert(clean, which, self.generator, self.pad_id)
            else:
                batch = insert_triggers(clean, self.negatives, which, self.generator,
                                        self.pad_id)
            out["negatives"] = e.negative_weight * self._held_clean(batch)
        if e.fire_at != "anywhere":
            which = torch.randint(len(self.trigger_tokens.lengths), (len(clean),),
                                  generator=self.generator)
            batch = insert_triggers(clean, self.trigger_tokens, which, self.generator,
                                    self.pad_id, where=e.off_position)
            out["off_position"] = self._held_clean(batch)
        if self.standalone is not None:
            cls = self.model(**self.standalone).last_hidden_state[:, 0]
            out["standalone"] = e.standalone_weight * nn.functional.mse_loss(
                cls, self.standalone_reference)
        return out

    def target(self, pv: torch.Tensor, clean_reference: torch.Tensor,
               clean_mean: torch.Tensor) -> torch.Tensor:
        """The triggered target: the PV, plus the residual share of the clean signal."""
        if not self.evasion.residual:
            return pv
        return pv + self.evasion.residual * (clean_reference - clean_mean)
