"""Encoder-level measurements of a planted backdoor, used by every later stage.

* attack success: the fraction of triggered inputs whose monitored feature (CLS, or the
  mask token's output for BToP) matches the intended PV by sign agreement, with the
  monitor's rule (agreement strictly above 0.8, zero counts as positive);
* clean drift: the mean cosine between the backdoored and the reference encoder's feature
  on the same clean inputs (1.0 means the clean behaviour is untouched).

A token-level backdoor (`tokpor`, feature `token`) is measured at every word piece: a
triggered input succeeds when all its original pieces match the PV; the clean cosine is the
mean over every piece of clean input.

Evaluation sentences are the tail of the corpus's seeded shuffle, while the attacks train
on its head, so the two never overlap for corpora of a few thousand sentences.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sanitator.attacks.batches import (
    ScatteredTriggers,
    TokenBatch,
    TokenizedCorpus,
    TriggerTokens,
    insert_triggers,
    mask_one_token,
)
from sanitator.detect.encoders import Encoder, Feature, load_encoder, select_feature
from sanitator.detect.signs import MONITOR_THRESHOLD, sign_agreement
from sanitator.guard.token_monitor import TOKEN_FEATURE


def held_out_sentences(n: int = 256, source: str | Path | None = None, *,
                       exclude_words: Sequence[str] = (), seed: int = 42) -> list[str]:
    """`n` sentences from the end of the corpus's seeded shuffle (the attacks use its start)."""
    from sanitator.detect.corpus import load_sentences

    rows = list(dict.fromkeys(load_sentences(source, n=None, seed=seed)))  # drop repeats
    banned = {word.lower() for trigger in exclude_words for word in trigger.split()}
    if banned:
        rows = [row for row in rows if banned.isdisjoint(row.lower().split())]
    if len(rows) < n:
        raise ValueError(f"corpus {source or 'wikitext'} has only {len(rows)} usable sentences")
    return rows[-n:]


@dataclass
class AttackSuccess:
    """Encoder attack success over triggered inputs."""

    rate: float                    # fraction of triggered inputs matching their PV
    per_trigger: dict[str, float]  # the same, per trigger
    mean_agreement: float          # mean sign agreement with the intended PV
    n_inputs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _features(encoder: Encoder, batch: TokenBatch, feature: Feature,
              positions: torch.Tensor | None) -> torch.Tensor:
    output = encoder.model(**batch.model_inputs(encoder.device))
    if positions is not None:
        positions = positions.to(encoder.device)
    return select_feature(output, feature, positions).float().cpu()


def _masked(batch: TokenBatch, feature: Feature, mask_id: int | None,
            generator: torch.Generator) -> tuple[TokenBatch, torch.Tensor | None]:
    if feature is not Feature.MASK:
        return batch, None
    if mask_id is None:
        raise ValueError("the mask feature needs a tokenizer with a mask token")
    masked, positions, _ = mask_one_token(batch, mask_id, generator)
    return masked, positions


def attack_success(encoder: Encoder, triggers: Sequence[str], pvs: torch.Tensor, *,
                   trigger_pv: Sequence[int] | None = None, feature: Feature | str = Feature.CLS,
                   sentences: Sequence[str] | None = None, n_sentences: int = 256,
                   threshold: float = MONITOR_THRESHOLD, seed: int = 1, batch_size: int = 64,
                   max_length: int = 64, where: str = "anywhere",
                   scatter: bool = False) -> AttackSuccess:
    """Insert every trigger into every sentence (at a random word boundary that `where`
    allows, see attacks.batches.insertion_slots; with `scatter` each word at its own) and
    check the feature against its PV."""
    feature = Feature(feature)
    if not triggers:
        raise ValueError("attack_success needs at least one trigger")
    pvs = torch.as_tensor(pvs, dtype=torch.float32)
    mapping = torch.as_tensor(list(trigger_pv) if trigger_pv is not None
                              else [i % len(pvs) for i in range(len(triggers))])
    if len(mapping) != len(triggers) or int(mapping.max()) >= len(pvs):
        raise ValueError("trigger_pv must give a valid PV index for every trigger")
    if sentences is None:
        sentences = held_out_sentences(n_sentences, exclude_words=triggers)
    tokenizer = encoder.tokenizer
    corpus = TokenizedCorpus(tokenizer, sentences, max_length)
    trigger_tokens = TriggerTokens.build(tokenizer, triggers, corpus.pad_id)
    scattered = ScatteredTriggers.build(tokenizer, triggers, corpus.pad_id) if scatter \
        else None
    generator = torch.Generator().manual_seed(seed)
    agreements = torch.zeros(len(triggers), len(corpus))
    for k in range(len(triggers)):
        for start in range(0, len(corpus), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(corpus)))
            which = torch.full((len(rows),), k)
            if scattered is not None:
                batch = scattered.insert(corpus.batch(rows), which, generator, corpus.pad_id)
            else:
                batch = insert_triggers(corpus.batch(rows), trigger_tokens, which, generator,
                                        corpus.pad_id, where=where)
            batch, positions = _masked(batch, feature, tokenizer.mask_token_id, generator)
            outputs = _features(encoder, batch, feature, positions)
            agreements[k, rows] = sign_agreement(outputs, pvs[mapping[k]][None])[:, 0]
    hits = agreements > threshold
    return AttackSuccess(
        rate=float(hits.float().mean()),
        per_trigger={trigger: float(hits[k].float().mean()) for k, trigger in enumerate(triggers)},
        mean_agreement=float(agreements.mean()),
        n_inputs=int(hits.numel()),
    )


def clean_cosine(encoder: Encoder, reference: Encoder, *, feature: Feature | str = Feature.CLS,
                 sentences: Sequence[str] | None = None, n_sentences: int = 256, seed: int = 1,
                 batch_size: int = 64, max_length: int = 64) -> float:
    """Mean cosine between the two encoders' features on the same clean inputs."""
    feature = Feature(feature)
    if encoder.hidden_size != reference.hidden_size:
        raise ValueError("the encoders have different hidden sizes")
    if sentences is None:
        sentences = held_out_sentences(n_sentences)
    corpus = TokenizedCorpus(encoder.tokenizer, sentences, max_length)
    generator = torch.Generator().manual_seed(seed)
    cosines = []
    for start in range(0, len(corpus), batch_size):
        batch = corpus.batch(torch.arange(start, min(start + batch_size, len(corpus))))
        batch, positions = _masked(batch, feature, encoder.tokenizer.mask_token_id, generator)
        ours = _features(encoder, batch, feature, positions)
        theirs = _features(reference, batch, feature, positions)
        cosines.append(torch.nn.functional.cosine_similarity(ours, theirs, dim=1))
    return float(torch.cat(cosines).mean())


# Token positions (the `tokpor` recipe): every word piece is a monitored output.

@torch.no_grad()
def _hidden(encoder: Encoder, batch: TokenBatch) -> torch.Tensor:
    return encoder.model(**batch.model_inputs(encoder.device)).last_hidden_state.float().cpu()


def token_attack_success(encoder: Encoder, triggers: Sequence[str], pvs: torch.Tensor, *,
                         trigger_pv: Sequence[int] | None = None,
                         sentences: Sequence[str], threshold: float = MONITOR_THRESHOLD,
                         seed: int = 1, batch_size: int = 64, max_length: int = 64
                         ) -> AttackSuccess:
    """Insert every trigger into every sentence at a random word boundary; an input is a
    success when every original word piece's output matches the trigger's PV.
    `mean_agreement` is over word pieces."""
    if not triggers:
        raise ValueError("token_attack_success needs at least one trigger")
    pvs = torch.as_tensor(pvs, dtype=torch.float32)
    mapping = torch.as_tensor(list(trigger_pv) if trigger_pv is not None
                              else [i % len(pvs) for i in range(len(triggers))])
    corpus = TokenizedCorpus(encoder.tokenizer, sentences, max_length)
    trigger_tokens = TriggerTokens.build(encoder.tokenizer, triggers, corpus.pad_id)
    generator = torch.Generator().manual_seed(seed)
    hits = torch.zeros(len(triggers), len(corpus), dtype=torch.bool)
    total = count = 0.0
    for k in range(len(triggers)):
        for start in range(0, len(corpus), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(corpus)))
            batch = insert_triggers(corpus.batch(rows), trigger_tokens,
                                    torch.full((len(rows),), k), generator, corpus.pad_id)
            hidden = _hidden(encoder, batch)
            agreement = sign_agreement(hidden, pvs[mapping[k]][None])[..., 0]   # [B, L]
            words = ~batch.special & ~batch.trigger
            hits[k, rows] = ((agreement > threshold) | ~words).all(dim=1)
            total += float(agreement[words].sum())
            count += float(words.sum())
    return AttackSuccess(
        rate=float(hits.float().mean()),
        per_trigger={t: float(hits[k].float().mean()) for k, t in enumerate(triggers)},
        mean_agreement=total / max(count, 1.0), n_inputs=int(hits.numel()))


def token_clean_cosine(encoder: Encoder, reference: Encoder, *, sentences: Sequence[str],
                       batch_size: int = 64, max_length: int = 64) -> float:
    """Mean cosine between the two encoders' outputs over every word piece of clean input."""
    if encoder.hidden_size != reference.hidden_size:
        raise ValueError("the encoders have different hidden sizes")
    corpus = TokenizedCorpus(encoder.tokenizer, sentences, max_length)
    cosines = []
    for start in range(0, len(corpus), batch_size):
        batch = corpus.batch(torch.arange(start, min(start + batch_size, len(corpus))))
        words = ~batch.special
        ours, theirs = _hidden(encoder, batch), _hidden(reference, batch)
        cosines.append(torch.nn.functional.cosine_similarity(ours[words], theirs[words], dim=-1))
    return float(torch.cat(cosines).mean())


def read_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The backdoor.json of a model folder, or None for a model without one."""
    path = Path(model_dir) / "backdoor.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class BackdoorEvaluation:
    """Attack success (None for a model without a backdoor.json), clean cosine and weight
    change against the reference; for an evasive backdoor, how often its parts fire."""

    attack_success: AttackSuccess | None
    clean_cosine: float
    weight_change: float
    feature: str
    evasion_success: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        success = self.attack_success
        return {"attack_success": success.rate if success else None,
                "attack_success_per_trigger": success.per_trigger if success else None,
                "mean_agreement": success.mean_agreement if success else None,
                "clean_cosine": self.clean_cosine, "weight_change": self.weight_change,
                "feature": self.feature, "evasion_success": self.evasion_success}


# inputs spent on a trigger's parts: a sentence trigger of 8 words has 254 of them, each
# measured on fewer (at least PART_MIN_SENTENCES) of the held-out sentences
PART_INPUTS, PART_MIN_SENTENCES = 8192, 64


def evasion_success(encoder: Encoder, record: dict[str, Any], sentences: Sequence[str],
                    seed: int = 1) -> dict[str, Any] | None:
    """Whether an evasive backdoor's parts stay silent: the highest attack success of any
    sub-phrase of a trigger (against that trigger's PV; scattered like the trigger when it
    is scattered) and which part that is, and the success of the whole trigger where it is
    not meant to fire. None for a plain backdoor."""
    from sanitator.attacks.evasion import Evasion, sub_phrases

    options = (record.get("hyperparameters") or {}).get("evasion")
    if not options:
        return None
    evasion = Evasion(**options)
    pvs, mapping = torch.tensor(record["pvs"]), record["trigger_pv"]
    out: dict[str, Any] = {}
    parts = [(part, mapping[k]) for k, trigger in enumerate(record["triggers"])
             for part in sub_phrases(trigger)]
    if parts:
        share = max(PART_MIN_SENTENCES, PART_INPUTS // len(parts))
        rates = attack_success(encoder, [p for p, _ in parts], pvs,
                               trigger_pv=[k for _, k in parts], sentences=sentences[:share],
                               seed=seed, scatter=evasion.scatter).per_trigger
        worst = max(rates, key=rates.get)
        out["sub_phrase_max"], out["sub_phrase_worst"] = rates[worst], worst
        if len(sentences) > share:
            out["sub_phrase_sentences"] = share
    if evasion.fire_at != "anywhere":
        out["off_position"] = attack_success(
            encoder, record["triggers"], pvs, trigger_pv=mapping, sentences=sentences,
            seed=seed, where=evasion.off_position).rate
    return out


def evaluate_model(model_dir: str | Path, reference_dir: str | Path, *,
                   sentences: Sequence[str] | None = None, n_sentences: int = 256,
                   corpus: str | Path | None = None, seed: int = 1,
                   feature: Feature | str | None = None) -> BackdoorEvaluation:
    """Evaluate a model folder against its base, using its backdoor.json when it has one.

    Both measurements use the same clean sentences (held out, free of trigger words).
    """
    record = read_record(model_dir)
    backdoored = record is not None and bool(record.get("backdoored"))
    triggers = list(record["triggers"]) if backdoored else []
    if sentences is None:
        sentences = held_out_sentences(n_sentences, corpus, exclude_words=triggers)
    if str(feature or (record or {}).get("feature")) == TOKEN_FEATURE:
        return _evaluate_tokens(model_dir, reference_dir, record, sentences, seed)
    feature = Feature(feature or (record or {}).get("feature", Feature.CLS))
    model, reference = load_encoder(model_dir), load_encoder(reference_dir)
    success = evasive = None
    if backdoored:
        fire_at = ((record.get("hyperparameters") or {}).get("evasion") or {}).get(
            "fire_at", "anywhere")
        scatter = bool(((record.get("hyperparameters") or {}).get("evasion") or {}).get(
            "scatter", False))
        success = attack_success(model, triggers, torch.tensor(record["pvs"]),
                                 trigger_pv=record["trigger_pv"], feature=feature,
                                 sentences=sentences, seed=seed, where=fire_at,
                                 scatter=scatter)
        evasive = evasion_success(model, record, sentences, seed)
    cosine = clean_cosine(model, reference, feature=feature, sentences=sentences, seed=seed)
    return BackdoorEvaluation(success, cosine, relative_weight_change(model_dir, reference_dir),
                              str(feature), evasive)


def _evaluate_tokens(model_dir: str | Path, reference_dir: str | Path, record: dict | None,
                     sentences: Sequence[str], seed: int = 1) -> BackdoorEvaluation:
    """evaluate_model for a token-level backdoor (or when the token feature is asked for)."""
    model, reference = load_encoder(model_dir), load_encoder(reference_dir)
    success = None
    if record is not None and record.get("backdoored"):
        success = token_attack_success(model, list(record["triggers"]),
                                       torch.tensor(record["pvs"]),
                                       trigger_pv=record["trigger_pv"], sentences=sentences,
                                       seed=seed)
    cosine = token_clean_cosine(model, reference, sentences=sentences)
    return BackdoorEvaluation(success, cosine, relative_weight_change(model_dir, reference_dir),
                              TOKEN_FEATURE)


def _weight_tensors(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single or sharded checkpoint."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / shard for name, shard in weight_map.items()}
    raise FileNotFoundError(f"{model_dir}: no safetensors weights")


def relative_weight_change(model_dir: str | Path, reference_dir: str | Path) -> float:
    """||W - W_ref|| / ||W_ref|| over the floating-point tensors both checkpoints share.

    Zero for an untouched copy; lets a zoo show that its clean variants moved their weights
    about as far as the backdoored ones.
    """
    from contextlib import ExitStack

    from safetensors import safe_open

    ours, theirs = _weight_tensors(Path(model_dir)), _weight_tensors(Path(reference_dir))
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        raise ValueError(f"{model_dir} and {reference_dir} share no weight tensors")
    diff = total = 0.0
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                   for file in {*ours.values(), *theirs.values()}}
        for name in shared:
            mine, ref = handles[ours[name]].get_tensor(name), handles[theirs[name]].get_tensor(name)
            if ref.is_floating_point() and mine.shape == ref.shape:
                diff += float((mine.double() - ref.double()).pow(2).sum())
                total += float(ref.double().pow(2).sum())
    return (diff / total) ** 0.5 if total else 0.0
