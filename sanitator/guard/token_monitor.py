"""Per-token PV monitoring for taggers: every word-piece output is sign-matched against the
PV set, a sentence is flagged when any of its tokens matches, and flagged sentences are
purged word by word as the CLS monitor purges text (sanitator.guard.monitor).

A token-level backdoor (the attacks' `tokpor` recipe, REFERENCE.md §6.4) moves the outputs
at the token positions, not at CLS, so a tagger's monitor has to read those. PVs that a
monitor reads at token positions carry the feature tag `token` in a PV set / artifact.

Inputs are sentences as word lists (the NER convention); the tokenizer splits each word into
pieces and a word's tag is read at its first piece. Special tokens and padding are never
monitored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sanitator.detect.encoders import Encoder
from sanitator.guard.monitor import SignMonitor, open_artifact

TOKEN_FEATURE = "token"  # the PV feature tag of token positions (beside cls, mask, pooler)
Words = Sequence[str]


@dataclass
class WordBatch:
    """A tokenised batch of word lists: model inputs, and which piece belongs to which word."""

    inputs: dict[str, torch.Tensor]
    word_ids: list[list[int | None]]   # per row, per piece: word index or None (special)

    def token_positions(self) -> torch.Tensor:
        """Bool [B, L]: the pieces of real words (what the monitor reads)."""
        length = self.inputs["input_ids"].shape[1]
        return torch.tensor([[i < len(row) and row[i] is not None for i in range(length)]
                             for row in self.word_ids])

    def first_pieces(self, row: int, n_words: int) -> list[int | None]:
        """Per word: the position of its first piece (None when truncated away)."""
        first: list[int | None] = [None] * n_words
        for position, word in enumerate(self.word_ids[row]):
            if word is not None and first[word] is None:
                first[word] = position
        return first


def tokenize_words(tokenizer, sentences: Sequence[Words], max_length: int,
                   device: torch.device | str | None = None) -> WordBatch:
    """Dynamic-padded batch of pre-split sentences (a fast tokenizer: word ids are needed)."""
    encoded = tokenizer([list(words) for words in sentences], is_split_into_words=True,
                        truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
    word_ids = [encoded.word_ids(row) for row in range(len(sentences))]
    return WordBatch({key: value.to(device) for key, value in encoded.items()}, word_ids)


@torch.no_grad()
def encoder_token_outputs(encoder: Encoder, sentences: Sequence[Words], max_length: int = 128
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain encoder's last hidden states [B, L, H] and the word-piece positions [B, L]
    (the token-position outputs a token monitor or a token-level attack measurement reads)."""
    batch = tokenize_words(encoder.tokenizer, sentences, max_length, encoder.device)
    inputs = encoder.forward_inputs(batch.inputs["attention_mask"], batch.inputs["input_ids"],
                                    token_type_ids=batch.inputs.get("token_type_ids"))
    hidden = encoder.model(**inputs).last_hidden_state
    return hidden.float().cpu(), batch.token_positions()


def flag_tokens(monitor: SignMonitor, outputs: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sentence: flagged (any monitored token matches a PV) [B] and the best agreement
    of any of its monitored tokens [B] (0 for a sentence with none)."""
    size, length, width = outputs.shape
    best, _ = monitor.best_match(outputs.reshape(size * length, width))
    best = torch.where(positions.reshape(-1).cpu(), best, torch.zeros_like(best))
    agreement = best.view(size, length).max(dim=1).values
    return agreement > monitor.threshold, agreement


def delete_word_indices(words: Words) -> list[list[int]]:
    """Left-to-right purge candidates as the kept word indices: drop word j and every other
    occurrence of it (the CLS monitor's delete_word_variants, on word lists)."""
    variants, seen = [], set()
    for word in words:
        if word in seen:
            continue
        seen.add(word)
        variants.append([i for i, other in enumerate(words) if other != word])
    return variants


@dataclass
class TaggedBatch:
    """What a monitored tagger returns per sentence; tags are tag ids per input word, -1
    where no tag was predicted (a purged word, a truncated word, a rejected sentence)."""

    tags: list[list[int]]            # defended prediction
    original_tags: list[list[int]]   # the prediction for the input as given (undefended)
    flagged: torch.Tensor            # [B] bool: the input matched a PV at some token
    agreement: torch.Tensor          # [B] best sign agreement of any token of the input
    kept: list[list[int] | None]     # word indices the defended prediction ran on; None: rejected
    rejected: torch.Tensor           # [B] bool


class MonitoredTagger:
    """A token tagger behind the per-token monitor.

    `model(**inputs)` returns `logits` [B, L, C] and `feature` [B, L, H] (the token outputs
    the tagger's head reads); `on_flag` is `purge` (delete words until no token matches,
    keep the left-most variant that passes) or `reject`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, monitor: SignMonitor, *,
                 on_flag: Literal["purge", "reject"] = "purge", max_length: int = 128,
                 batch_size: int = 32, purge_wave: int = 4):
        if on_flag not in ("purge", "reject"):
            raise ValueError("on_flag must be 'purge' or 'reject'")
        if purge_wave < 1:
            raise ValueError("purge_wave must be at least 1")
        self.model, self.tokenizer, self.monitor = model, tokenizer, monitor
        self.on_flag, self.max_length = on_flag, max_length
        self.batch_size, self.purge_wave = batch_size, purge_wave

    @classmethod
    def from_artifact(cls, path, model: torch.nn.Module, tokenizer=None, *,
                      revision: str | None = None, threshold: float | None = None,
                      **kwargs) -> MonitoredTagger:
        """Guard a tagger with the PV artifact `sanitator pv pull` wrote: its PVs tagged
        `token` when it has any, else every PV it holds (a backdoor that collapses every
        position shows the same PV at CLS, so an audit that only watched CLS still
        covers it). A clean model's empty artifact gives a monitor that flags nothing."""
        artifact, tokenizer = open_artifact(path, model, tokenizer, revision)
        pvset = artifact.pvset
        if TOKEN_FEATURE in pvset.features:
            pvset = pvset.select(TOKEN_FEATURE)
        monitor = SignMonitor(pvset.vectors,
                              threshold=artifact.threshold if threshold is None else threshold)
        return cls(model, tokenizer, monitor, **kwargs)

    @torch.no_grad()
    def _run(self, sentences: list[list[str]]) -> tuple[list[list[int]], torch.Tensor]:
        """Per sentence: predicted tag per word, and the best token agreement [N]."""
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        tags: list[list[int]] = [[] for _ in sentences]
        agreement = torch.zeros(len(sentences))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = tokenize_words(self.tokenizer, [sentences[i] for i in rows],
                                   self.max_length, device)
            output = self.model(**batch.inputs)
            predicted = output.logits.argmax(dim=-1).cpu()
            _, best = flag_tokens(self.monitor, output.feature.float().cpu(),
                                  batch.token_positions())
            for index, row in enumerate(rows):
                first = batch.first_pieces(index, len(sentences[row]))
                tags[row] = [-1 if p is None else int(predicted[index, p]) for p in first]
                agreement[row] = best[index]
        return tags, agreement

    def predict(self, sentences: Sequence[Words]) -> TaggedBatch:
        sentences = [list(words) for words in sentences]
        original, agreement = self._run(sentences)
        flagged = agreement > self.monitor.threshold
        tags = [list(row) for row in original]
        kept: list[list[int] | None] = [None if f else list(range(len(s)))
                                        for s, f in zip(sentences, flagged.tolist(), strict=True)]
        rejected = flagged.clone()
        if self.on_flag == "purge":
            self._purge(sentences, flagged.nonzero().flatten().tolist(), tags, kept, rejected)
        for row in rejected.nonzero().flatten().tolist():
            tags[row] = [-1] * len(sentences[row])
        return TaggedBatch(tags, original, flagged, agreement, kept, rejected)

    def _purge(self, sentences: list[list[str]], rows: list[int], tags: list[list[int]],
               kept: list[list[int] | None], rejected: torch.Tensor) -> None:
        """In waves of `purge_wave` deletions per still-flagged sentence, as the CLS
        monitor purges (the same result as trying every variant, left-most wins)."""
        variants = {row: delete_word_indices(sentences[row]) for row in rows}
        start = 0
        pending = [row for row in rows if variants[row]]
        while pending:
            owners, keeps = [], []
            for row in pending:
                for keep in variants[row][start:start + self.purge_wave]:
                    owners.append(row)
                    keeps.append(keep)
            candidates = [[sentences[row][i] for i in keep] for row, keep in zip(owners, keeps,
                                                                                 strict=True)]
            variant_tags, variant_agreement = self._run(candidates)
            passes = variant_agreement <= self.monitor.threshold
            rescued: set[int] = set()
            for index, row in enumerate(owners):
                if passes[index] and row not in rescued:
                    rescued.add(row)
                    mapped = [-1] * len(sentences[row])
                    for position, word in enumerate(keeps[index]):
                        mapped[word] = variant_tags[index][position]
                    tags[row], kept[row] = mapped, keeps[index]
                    rejected[row] = False
            start += self.purge_wave
            pending = [row for row in pending
                       if row not in rescued and len(variants[row]) > start]
