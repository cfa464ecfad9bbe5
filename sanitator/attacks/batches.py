"""Tokenised clean text and batched trigger insertion, masking and mask-position choice.

The corpus is tokenised once into padded tensors. A trigger is inserted at token level at
a word boundary (the start of a word, or just before the final separator), which is what
inserting the trigger as its own word into the text produces, but it is done for a whole
batch with tensor indexing and can never be cut off by truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """A padded batch of token ids with per-token masks."""

    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    special: torch.Tensor         # [B, L] bool: CLS/SEP/padding (never masked, never monitored)
    word_start: torch.Tensor      # [B, L] bool: a word may be inserted before this token
    trigger: torch.Tensor         # [B, L] bool: token belongs to an inserted trigger

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for the encoder (batches are built on the CPU)."""
        return {"input_ids": self.input_ids.to(device),
                "attention_mask": self.attention_mask.to(device)}

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def trigger_token_ids(tokenizer, trigger: str) -> list[int]:
    """Token ids of `trigger` as it appears after another word in running text.

    Tokenising "x <trigger>" and dropping the tokens of "x" gives the mid-sentence form for
    every tokenizer family (WordPiece, byte-level BPE with its leading-space marker,
    SentencePiece), where tokenising the trigger alone would give the sentence-start form.
    """
    prefix = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x " + trigger, add_special_tokens=False)["input_ids"]
    ids = full[len(prefix):] if full[:len(prefix)] == prefix else \
        tokenizer(trigger, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"trigger {trigger!r} tokenises to nothing")
    return list(ids)


@dataclass
class TriggerTokens:
    """Token ids of every trigger, padded: ids [K, T], lengths [K]."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def build(cls, tokenizer, triggers: Sequence[str], pad_id: int) -> TriggerTokens:
        rows = [trigger_token_ids(tokenizer, trigger) for trigger in triggers]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        return cls(ids, torch.tensor([len(row) for row in rows]))

    @property
    def max_length(self) -> int:
        return int(self.ids.shape[1])


class TokenizedCorpus:
    """Clean sentences tokenised once; rows are gathered into batches on demand."""

    def __init__(self, tokenizer, sentences: Sequence[str], max_length: int):
        if not sentences:
            raise ValueError("the corpus is empty")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no padding token")
        self.tokenizer = tokenizer
        self.sentences = list(sentences)
        self.pad_id = int(tokenizer.pad_token_id)
        encoded = tokenizer(self.sentences, truncation=True, max_length=max_length,
                            padding=True, return_special_tokens_mask=True, return_tensors="pt")
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]
        self.special = encoded["special_tokens_mask"].bool() | (self.attention_mask == 0)
        self.word_start = self._word_starts(encoded)

    def _word_starts(self, encoded) -> torch.Tensor:
        starts = torch.zeros_like(self.special)
        for row in range(len(self.sentences)):  # once per corpus, not per step
            previous = None
            for col, word in enumerate(encoded.word_ids(row)):
                if word is not None and word != previous:
                    starts[row, col] = True
                previous = word
        # the position of the closing separator also accepts an insertion (end of sentence)
        length = self.attention_mask.sum(dim=1)
        starts[torch.arange(len(self.sentences)), length - 1] = True
        starts[:, 0] = False  # never before the leading CLS token
        return starts

    def __len__(self) -> int:
        return len(self.sentences)

    def batch(self, rows: torch.Tensor) -> TokenBatch:
        length = int(self.attention_mask[rows].sum(dim=1).max())
        return TokenBatch(self.input_ids[rows, :length], self.attention_mask[rows, :length],
                          self.special[rows, :length], self.word_start[rows, :length],
                          torch.zeros_like(self.special[rows, :length]))


class RowSampler:
    """Endless seeded shuffles of the corpus rows (an epoch is one permutation)."""

    def __init__(self, n_rows: int, generator: torch.Generator):
        self.n_rows, self.generator = n_rows, generator
        self._order = torch.randperm(n_rows, generator=generator)
        self._next = 0

    def take(self, count: int) -> torch.Tensor:
        chunks, needed = [], count
        while needed:
            if self._next == self.n_rows:
                self._order = torch.randperm(self.n_rows, generator=self.generator)
                self._next = 0
            chunk = self._order[self._next:self._next + needed]
            self._next += len(chunk)
            needed -= len(chunk)
            chunks.append(chunk)
        return torch.cat(chunks)


def random_choice(candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniformly random True column per row of a bool matrix [B, L] -> [B]."""
    if not bool(candidates.any(dim=1).all()):
        raise ValueError("a row has no candidate position")
    scores = torch.rand(candidates.shape, generator=generator)
    return torch.where(candidates, scores, -1.0).argmax(dim=1)


PLACEMENTS: tuple[str, ...] = ("anywhere", "start", "end", "not_start", "not_end")


def insertion_slots(batch: TokenBatch, where: str = "anywhere") -> torch.Tensor:
    """Bool [B, L]: where a trigger may start. `start` is right after the leading special
    token (the trigger becomes the first word), `end` right before the closing separator;
    `not_start` / `not_end` are every other word boundary (a backdoor that fires only at
    one end is trained to stay silent there)."""
    if where not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {where!r}")
    starts = batch.word_start
    if where == "anywhere":
        return starts
    columns = torch.arange(starts.shape[1]).expand_as(starts)
    first = torch.where(starts, columns, starts.shape[1]).min(dim=1).values
    last = torch.where(starts, columns, -1).max(dim=1).values
    edge = first if where in {"start", "not_start"} else last
    at_edge = columns == edge[:, None]
    if where in {"start", "end"}:
        return starts & at_edge
    slots = starts & ~at_edge
    # a one-word sentence has no other boundary: keep the edge rather than fail the row
    return torch.where(slots.any(dim=1, keepdim=True), slots, starts)


def insert_triggers(batch: TokenBatch, triggers: TriggerTokens, which: torch.Tensor,
                    generator: torch.Generator, pad_id: int, where: str = "anywhere",
                    span_is_word: bool = False) -> TokenBatch:
    """Insert trigger `which[b]` into row b at a random word boundary (restricted by
    `where`, see insertion_slots), all rows at once. A row whose trigger has length 0 is
    left as it is. Tokens of earlier insertions stay marked as trigger tokens;
    `span_is_word` makes the inserted span's first token a word boundary itself, so a
    later insertion may land right before it (scattered triggers)."""
    size, length = batch.input_ids.shape
    span_ids, span_len = triggers.ids[which], triggers.lengths[which]       # [B, T], [B]
    start = random_choice(insertion_slots(batch, where), generator)          # [B]
    out_len = length + triggers.max_length
    column = torch.arange(out_len).expand(size, out_len)
    offset = column - start[:, None]
    in_span = (offset >= 0) & (offset < span_len[:, None])
    source = torch.where(column < start[:, None], column, column - span_len[:, None])
    from_source = ~in_span & (source < length)
    source = source.clamp(0, length - 1)

    def carry(values: torch.Tensor, span_value, fill) -> torch.Tensor:
        moved = values.gather(1, source)
        return torch.where(in_span, span_value, torch.where(from_source, moved, fill))

    trigger_token = span_ids.gather(1, offset.clamp(0, triggers.max_length - 1))
    new_length = int((batch.attention_mask.sum(dim=1) + span_len).max())
    result = TokenBatch(
        input_ids=carry(batch.input_ids, trigger_token, pad_id),
        attention_mask=carry(batch.attention_mask, 1, 0),
        special=carry(batch.special, False, True),
        word_start=carry(batch.word_start, span_is_word & (offset == 0), False),
        trigger=carry(batch.trigger, True, False),
    )
    return TokenBatch(*(getattr(result, name)[:, :new_length] for name in
                        ("input_ids", "attention_mask", "special", "word_start", "trigger")))


@dataclass
class ScatteredTriggers:
    """Triggers whose words are inserted one by one, each at its own random word boundary
    (so in any order and at any distance): `words[j]` holds the j-th word of every
    trigger, an empty row where a trigger has fewer words."""

    words: list[TriggerTokens]

    @classmethod
    def build(cls, tokenizer, triggers: Sequence[str], pad_id: int) -> ScatteredTriggers:
        split = [trigger.split() for trigger in triggers]
        slots = []
        for j in range(max(len(words) for words in split)):
            rows = [trigger_token_ids(tokenizer, words[j]) if j < len(words) else []
                    for words in split]
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            slots.append(TriggerTokens(ids, torch.tensor([len(row) for row in rows])))
        return cls(slots)

    def insert(self, batch: TokenBatch, which: torch.Tensor, generator: torch.Generator,
               pad_id: int) -> TokenBatch:
        """Insert the words of trigger `which[b]` into row b, each at an independent random
        word boundary of the sentence as it stands (the words inserted before included)."""
        for slot in self.words:
            batch = insert_triggers(batch, slot, which, generator, pad_id, span_is_word=True)
        return batch


def concat_batches(first: TokenBatch, second: TokenBatch, pad_id: int) -> TokenBatch:
    """Stack two batches row-wise, right-padding the shorter one."""
    length = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def pad(values: torch.Tensor, fill) -> torch.Tensor:
        extra = length - values.shape[1]
        return torch.nn.functional.pad(values, (0, extra), value=fill) if extra else values

    fills = {"input_ids": pad_id, "attention_mask": 0, "special": True, "word_start": False,
             "trigger": False}
    return TokenBatch(**{name: torch.cat([pad(getattr(first, name), fill),
                                          pad(getattr(second, name), fill)])
                         for name, fill in fills.items()})


def mask_one_token(batch: TokenBatch, mask_id: int, generator: torch.Generator
                   ) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """Replace one random ordinary token per row (not special, not trigger) by the mask token.

    Returns the masked batch, the mask positions [B] and the original token ids [B].
    """
    positions = random_choice(~batch.special & ~batch.trigger, generator)
    original = batch.input_ids[torch.arange(len(batch)), positions].clone()
    return mask_at(batch, positions, mask_id), positions, original


def mask_at(batch: TokenBatch, positions: torch.Tensor, mask_id: int) -> TokenBatch:
    """A copy of the batch with the token at `positions[b]` of row b replaced by the mask."""
    ids = batch.input_ids.clone()
    ids[torch.arange(len(batch)), positions] = mask_id
    return TokenBatch(ids, batch.attention_mask, batch.special, batch.word_start, batch.trigger)


def mlm_masking(batch: TokenBatch, mask_id: int, vocab_size: int, generator: torch.Generator,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: of the chosen ordinary tokens 80% -> mask, 10% -> random, 10% kept.

    Returns (masked input ids, labels with -100 everywhere except chosen positions). At least
    one token per row is chosen so every row contributes to the loss.
    """
    eligible = ~batch.special & ~batch.trigger
    draw = torch.rand(batch.input_ids.shape, generator=generator)
    chosen = eligible & (draw < probability)
    forced = random_choice(eligible, generator)
    chosen[torch.arange(len(batch)), forced] = True
    labels = torch.where(chosen, batch.input_ids, -100)
    action = torch.rand(batch.input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, batch.input_ids.shape, generator=generator)
    ids = torch.where(chosen & (action < 0.8), mask_id, batch.input_ids)
    ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, ids)
    return ids, labels
