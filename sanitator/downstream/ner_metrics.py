"""Entity spans, entity-level F1 and the NER attack success (docs/evaluation.md, "Token
tasks").

Spans follow seqeval's default (CoNLL) reading of BIO: an entity starts at `B-X`, or at an
`I-X` that does not continue an entity of type X (after `O`, or after another type); it ends
before `O`, `B-`, or a tag of another type. F1 is micro-averaged over exact (type, start,
end) matches, as seqeval's entity F1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[str, int, int]   # (type, first word, one past the last word)


def bio_spans(tags: Sequence[str]) -> set[Span]:
    """The entity spans of one sentence's BIO tags."""
    spans: set[Span] = set()
    start, kind = None, ""
    for index, tag in enumerate([*tags, "O"]):   # a sentinel closes the last entity
        prefix, _, this = ("O", "", "") if tag == "O" else tag.partition("-")
        if prefix not in ("B", "I", "O") or (prefix != "O" and not this):
            raise ValueError(f"{tag!r} is not a BIO tag")
        if start is not None and (prefix in ("O", "B") or this != kind):
            spans.add((kind, start, index))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = index, this
    return spans


@dataclass
class EntityScores:
    precision: float
    recall: float
    f1: float
    n_gold: int
    n_predicted: int
    n_correct: int


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> EntityScores:
    """Micro precision, recall and F1 over exact span matches (0 where undefined)."""
    if len(gold) != len(predicted):
        raise ValueError("need one prediction per gold sentence")
    n_gold = n_predicted = n_correct = 0
    for truth, guess in zip(gold, predicted, strict=True):
        true_spans, guessed = bio_spans(truth), bio_spans(guess)
        n_gold, n_predicted = n_gold + len(true_spans), n_predicted + len(guessed)
        n_correct += len(true_spans & guessed)
    precision = n_correct / n_predicted if n_predicted else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EntityScores(precision, recall, f1, n_gold, n_predicted, n_correct)


def tag_strings(ids: Sequence[int], names: Sequence[str]) -> list[str]:
    """Tag ids to names; -1 (no prediction: purged, truncated, rejected) reads as `O`."""
    return ["O" if i < 0 else names[i] for i in ids]


def without(values: Sequence, positions: Sequence[int]) -> list:
    """`values` with the given positions left out (the trigger words of a sentence)."""
    drop = set(positions)
    return [value for index, value in enumerate(values) if index not in drop]


@dataclass(frozen=True)
class WordTrigger:
    """A trigger inserted into sentence `row` as words `positions` (consecutive)."""

    row: int
    trigger: int
    positions: tuple[int, ...]


def place_word_triggers(sentences: Sequence[Sequence[str]], gold: Sequence[Sequence[str]],
                        triggers: Sequence[str], *, seed: int = 0, last: int = 64
                        ) -> tuple[list[list[str]], list[WordTrigger]]:
    """Every (sentence, trigger) pair with the trigger's words inserted once before a word
    index drawn uniformly among [0, min(last, n_words)] whose previous gold tag is `O` (so
    no entity is split; REFERENCE.md §5.5). The RNG is seeded per (seed, row, trigger)."""
    out: list[list[str]] = []
    placed: list[WordTrigger] = []
    for row, (words, tags) in enumerate(zip(sentences, gold, strict=True)):
        upper = min(last, len(words))
        slots = [p for p in range(upper + 1) if p == 0 or tags[p - 1] == "O"]
        for index, trigger in enumerate(triggers):
            position = random.Random(f"{seed}:{row}:{index}").choice(slots)
            pieces = trigger.split()
            out.append([*words[:position], *pieces, *words[position:]])
            placed.append(WordTrigger(row, index, tuple(range(position,
                                                              position + len(pieces)))))
    return out, placed


def spans_changed(untriggered: Sequence[str], triggered: Sequence[str],
                  trigger_positions: Sequence[int]) -> bool:
    """The attack-success test of one triggered sentence: its predicted spans over the
    original words (trigger words left out) differ from the untriggered prediction's."""
    return bio_spans(without(triggered, trigger_positions)) != bio_spans(untriggered)
