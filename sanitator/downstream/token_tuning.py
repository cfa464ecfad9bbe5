"""P-tuning v2 token classification on a frozen encoder (REFERENCE.md §7.1, the NER rows).

The deep prefixes of `prefix_tuning.PrefixClassifier` feed every layer; a linear head reads
the last hidden state at every word piece, and a word's tag is the prediction at its first
piece (training labels sit there too; other pieces are ignored). The monitored feature is
the token outputs themselves ([B, L, H]), which `guard.token_monitor.MonitoredTagger` reads.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from sanitator.detect.encoders import Encoder, load_encoder
from sanitator.downstream.prefix_tuning import PrefixClassifier
from sanitator.downstream.prompt_base import PromptOutput, PromptTuningConfig
from sanitator.downstream.prompt_tuning import (
    CALIBRATION_ROWS,
    TrainingStats,
    freeze_encoder,
    prompt_state,
    trainable_parameters,
)
from sanitator.guard.monitor import SignMonitor
from sanitator.guard.token_monitor import MonitoredTagger, WordBatch, tokenize_words

log = logging.getLogger(__name__)
IGNORE = -100


class PrefixTagger(PrefixClassifier):
    """Deep prefixes + a linear head on every token's last hidden state."""

    kind = "tagger"

    def __init__(self, encoder: Encoder, n_tags: int, config: PromptTuningConfig):
        # token outputs vary across words even in shallow encoders: the head reads them raw
        super().__init__(encoder, n_tags, replace(config, standardize=False))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_unused) -> PromptOutput:
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        return PromptOutput(self.head(self.head_dropout(hidden)), hidden)


def build_tagger(encoder_path: str | Path, n_tags: int, config: PromptTuningConfig, *,
                 allow_pickle: bool = False, device: str = "cpu") -> PrefixTagger:
    if config.method != "ptv2":
        raise ValueError("token tasks are prompt-tuned with ptv2 (deep prefixes) only")
    if config.max_length is None:
        config = replace(config, max_length=128)
    torch.manual_seed(config.seed)
    encoder = load_encoder(encoder_path, allow_pickle=allow_pickle, device=device)
    return PrefixTagger(encoder, n_tags, config).to(device)


def first_piece_labels(batch: WordBatch, tags: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, L] tag id at each word's first piece, IGNORE elsewhere."""
    labels = torch.full(batch.inputs["input_ids"].shape, IGNORE, dtype=torch.long)
    for row, row_tags in enumerate(tags):
        for word, position in enumerate(batch.first_pieces(row, len(row_tags))):
            if position is not None:
                labels[row, position] = int(row_tags[word])
    return labels


def predict_tags(model: PrefixTagger, sentences: Sequence[Sequence[str]]) -> list[list[int]]:
    """Tag ids per word (-1 for a word truncated away), no monitor."""
    empty = SignMonitor(torch.zeros(0, model.encoder_info.hidden_size))
    tagger = MonitoredTagger(model, model.tokenizer, empty, max_length=model.config.max_length)
    return tagger.predict(sentences).original_tags


def train_tagger(model: PrefixTagger, sentences: Sequence[Sequence[str]],
                 tags: Sequence[Sequence[int]], *, progress: bool = True,
                 score=None) -> TrainingStats:
    """Train prefixes and head (AdamW, linear decay; encoder frozen). `score(gold, predicted)`
    rates the trained model on up to CALIBRATION_ROWS training rows (`train_accuracy`)."""
    from tqdm.auto import tqdm

    config = model.config
    if len(sentences) != len(tags) or not sentences:
        raise ValueError("need one tag list per sentence, and at least one sentence")
    freeze_encoder(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    total = math.ceil(len(sentences) / config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.encoder.parameters()).device
    start, loss_value, correct, seen = time.perf_counter(), float("nan"), 0, 0
    model.train()
    model.encoder.eval()
    with tqdm(total=total, desc="prompt-tuning (ptv2 tagger)", disable=not progress,
              leave=False) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(len(sentences), generator=generator).tolist()
            correct = seen = 0
            for first in range(0, len(order), config.batch_size):
                rows = order[first:first + config.batch_size]
                batch = tokenize_words(model.tokenizer, [sentences[i] for i in rows],
                                       config.max_length, device)
                labels = first_piece_labels(batch, [tags[i] for i in rows]).to(device)
                logits = model(**batch.inputs).logits
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                   ignore_index=IGNORE)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = loss.item()
                scored = labels != IGNORE
                correct += int((logits.argmax(-1)[scored] == labels[scored]).sum())
                seen += int(scored.sum())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    rows = min(len(sentences), CALIBRATION_ROWS)
    predicted = predict_tags(model, sentences[:rows])
    train_score = score(tags[:rows], predicted) if score else \
        _word_accuracy(tags[:rows], predicted)
    return TrainingStats("ptv2", len(sentences), total, config.epochs,
                         time.perf_counter() - start, loss_value, train_score,
                         sum(p.numel() for p in params.values()), config.to_dict(),
                         last_epoch_accuracy=correct / max(seen, 1))


def _word_accuracy(gold: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]]) -> float:
    pairs = [(g, p) for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps,
                                                                                   strict=True)]
    return sum(g == p for g, p in pairs) / max(len(pairs), 1)


def save_tagger(model: PrefixTagger, path: str | Path, *, encoder_path: str | Path,
                tag_names: Sequence[str], extra: dict[str, str] | None = None) -> Path:
    """The trained prefixes and head as safetensors, with the settings and tag names."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.cpu().contiguous() for name, value in prompt_state(model).items()}
    save_file(tensors, str(path), metadata={
        "method": "ptv2", "kind": PrefixTagger.kind, "n_labels": str(model.n_labels),
        "config": json.dumps(model.config.to_dict()), "encoder_path": str(encoder_path),
        "tag_names": json.dumps(list(tag_names)), **(extra or {})})
    return path


def load_tagger(path: str | Path, encoder_path: str | Path | None = None, *,
                device: str = "cpu") -> tuple[PrefixTagger, list[str]]:
    """Rebuild a tagger written by `save_tagger`; returns it and its tag names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("kind") != PrefixTagger.kind:
        raise ValueError(f"{path}: not a sanitator tagger prompt file")
    config = replace(PromptTuningConfig(), **json.loads(meta["config"]))
    model = build_tagger(encoder_path or meta["encoder_path"], int(meta["n_labels"]), config,
                         device=device)
    model.load_state_dict(load_file(str(path)), strict=False)
    model.eval()
    return model, json.loads(meta["tag_names"])
