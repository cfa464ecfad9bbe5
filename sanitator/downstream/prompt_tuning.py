"""Prompt-tuning on a frozen encoder, the way the backdoor's victims adapt it (REFERENCE.md §7.1).

Two methods; in both only the prompt (and head) parameters train and the encoder stays frozen:

* `ptv2` — P-tuning v2 / deep prefix-tuning (`sanitator.downstream.prefix_tuning`): trainable
  key/value prefixes at every layer, a linear head on the CLS last hidden state.
* `ptv1` — P-tuning v1 with a mask position (`sanitator.downstream.mask_prompt`, for BToP models):
  continuous prompt tokens and a `[MASK]` after the first token, verbaliser scores at the
  mask; the monitored feature is the mask position's last hidden state.

Both models return `PromptOutput(logits, feature)`, so `MonitoredEncoder` can wrap them.
This module builds, trains, runs, saves and loads them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sanitator.detect.encoders import load_encoder
from sanitator.downstream.mask_prompt import MaskPromptClassifier, load_masked_lm
from sanitator.downstream.prefix_tuning import PrefixClassifier
from sanitator.downstream.prompt_base import (
    DEFAULT_LR,
    METHODS,
    SPREAD_ROWS,
    SPREAD_THRESHOLD,
    FeatureStandardizer,
    Method,
    PromptOutput,
    PromptTuningConfig,
    Text,
    feature_spread,
)

__all__ = ["CALIBRATION_ROWS", "DEFAULT_LR", "METHODS", "MaskPromptClassifier", "Method",
           "PrefixClassifier", "PromptModel", "PromptOutput", "PromptTuningConfig", "Text",
           "TrainingStats", "build_prompt_model", "choose_standardization", "freeze_encoder",
           "load_prompt", "predict", "prompt_state", "save_prompt", "settle", "tokenize",
           "train_prompt_model", "trainable_parameters"]

log = logging.getLogger(__name__)


PromptModel = PrefixClassifier | MaskPromptClassifier


def build_prompt_model(encoder_path: str | Path, n_labels: int, config: PromptTuningConfig, *,
                       verbalizer: Sequence[str] | None = None, allow_pickle: bool = False,
                       device: str = "cpu") -> PromptModel:
    """A fresh prompt model over the frozen encoder at `encoder_path` (prompt seeded)."""
    if config.max_length is None:
        config = replace(config, max_length=128)
    torch.manual_seed(config.seed)
    if config.method == "ptv2":
        return PrefixClassifier(load_encoder(encoder_path, allow_pickle=allow_pickle,
                                             device=device), n_labels, config).to(device)
    if verbalizer is None:
        raise ValueError("ptv1 needs verbaliser words (one per class)")
    encoder, mlm_model = load_masked_lm(encoder_path, allow_pickle=allow_pickle, device=device)
    return MaskPromptClassifier(encoder, mlm_model, n_labels, verbalizer, config).to(device)


def trainable_parameters(model: PromptModel) -> dict[str, nn.Parameter]:
    """The prompt and head parameters (everything outside the frozen encoder)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def prompt_state(model: PromptModel) -> dict[str, torch.Tensor]:
    """Everything a trained prompt model adds to its encoder: the trainable tensors and the
    running statistics of its feature standardisation."""
    state = {name: param.detach() for name, param in trainable_parameters(model).items()}
    for prefix, module in model.named_modules():
        if isinstance(module, FeatureStandardizer):
            state.update({f"{prefix}.{name}": value.detach()
                          for name, value in module.state_dict().items()})
    return state


def freeze_encoder(model: PromptModel) -> None:
    model.encoder.requires_grad_(False).eval()
    if getattr(model, "mlm_model", None) is not None:
        model.mlm_model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------
# Tokenising, training, predicting.

def tokenize(tokenizer, texts: Sequence[Text], max_length: int, device: torch.device | str
             ) -> dict[str, torch.Tensor]:
    """Dynamic-padded batch of single texts or (text, text) pairs."""
    if texts and isinstance(texts[0], tuple):
        first, second = zip(*texts, strict=True)
        batch = tokenizer(list(first), list(second), truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
    else:
        batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.encoder.parameters()).device


@dataclass
class TrainingStats:
    """What prompt-tuning did: recorded next to every evaluation. `train_accuracy` is the
    trained model's (eval mode) on up to CALIBRATION_ROWS training rows; the running
    accuracy of the last epoch, under dropout and batch statistics, is kept beside it."""

    method: str
    n_train: int
    steps: int
    epochs: int
    seconds: float
    final_loss: float
    train_accuracy: float
    trainable_params: int
    config: dict
    last_epoch_accuracy: float | None = None
    standardized: bool = False             # the head read the standardised feature
    feature_spread: float | None = None    # what auto mode decided on (ptv2), else None

    def to_dict(self) -> dict:
        return asdict(self)


def train_prompt_model(model: PromptModel, texts: Sequence[Text], labels: Sequence[int], *,
                       progress: bool = True) -> TrainingStats:
    """Train the prompt and head with AdamW and a linear decay; the encoder stays frozen."""
    from tqdm.auto import tqdm

    config = model.config
    if len(texts) != len(labels) or not texts:
        raise ValueError("need as many labels as texts, and at least one example")
    bad = sorted({int(y) for y in labels if not 0 <= int(y) < model.n_labels})
    if bad:
        raise ValueError(f"labels {bad} outside 0..{model.n_labels - 1}")
    freeze_encoder(model)
    spread = choose_standardization(model, texts)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    generator = torch.Generator().manual_seed(config.seed)
    label_tensor = torch.tensor([int(y) for y in labels])
    device = _device(model)
    start, loss_value, correct, seen = time.perf_counter(), float("nan"), 0, 0
    model.train()
    model.encoder.eval()  # frozen means no dropout inside the encoder either
    with tqdm(total=total, desc=f"prompt-tuning ({config.method})", disable=not progress,
              leave=False) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(len(texts), generator=generator).tolist()
            correct = seen = 0
            for first in range(0, len(order), config.batch_size):
                rows = order[first:first + config.batch_size]
                batch = tokenize(model.tokenizer, [texts[i] for i in rows], config.max_length,
                                 device)
                gold = label_tensor[rows].to(device)
                logits = model(**batch).logits
                loss = nn.functional.cross_entropy(logits, gold)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = loss.item()
                correct += int((logits.argmax(-1) == gold).sum())
                seen += len(rows)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            log.info("epoch %d/%d: loss %.4f, train accuracy %.3f", epoch + 1, config.epochs,
                     loss_value, correct / seen)
    model.eval()
    train_accuracy = settle(model, texts, labels)
    return TrainingStats(config.method, len(texts), total, config.epochs,
                         time.perf_counter() - start, loss_value, train_accuracy,
                         sum(p.numel() for p in params.values()), config.to_dict(),
                         last_epoch_accuracy=correct / max(seen, 1),
                         standardized=_standardizer_active(model), feature_spread=spread)


CALIBRATION_ROWS = 1024


def _standardizers(model: PromptModel) -> list[FeatureStandardizer]:
    return [m for m in model.modules() if isinstance(m, FeatureStandardizer)]


def _standardizer_active(model: PromptModel) -> bool:
    return any(bool(m.active) for m in _standardizers(model))


@torch.no_grad()
def choose_standardization(model: PromptModel, texts: Sequence[Text]) -> float | None:
    """Auto mode, ptv2: standardise the head's input when the CLS feature of the prompt
    model as initialised barely moves across (up to SPREAD_ROWS) training texts. Returns
    the measured spread (None when nothing was decided)."""
    norms = _standardizers(model)
    if model.config.standardize is not None or model.method != "ptv2" or not norms:
        return None
    _, features = predict(model, list(texts[:SPREAD_ROWS]))
    spread = feature_spread(features)
    for module in norms:
        module.active.fill_(spread < SPREAD_THRESHOLD)
    log.info("CLS spread across inputs %.4f: %s head", spread,
             "standardised" if spread < SPREAD_THRESHOLD else "plain")
    return spread


@torch.no_grad()
def settle(model: PromptModel, texts: Sequence[Text], labels: Sequence[int], *,
           rows: int = CALIBRATION_ROWS) -> float:
    """After training: set the feature standardisation to the statistics of the trained
    model's own eval-mode features on the first `rows` training texts, and return the
    model's accuracy on those rows (one forward pass serves both).

    The running statistics gathered while training do not describe the deployed model:
    prefix dropout shifts the whole batch's feature by more than inputs move it in shallow
    encoders, and those shifts average to another centre than the dropout-free feature.
    """
    model.eval()
    texts, gold = list(texts[:rows]), torch.tensor([int(y) for y in labels[:rows]])
    _, features = predict(model, texts)
    if len(texts) >= 2:
        for module in _standardizers(model):
            module.calibrate(features)
    logits = model.logits_from_feature(features.to(_device(model)))
    return float((logits.argmax(-1).cpu() == gold).double().mean())


@torch.no_grad()
def predict(model: PromptModel, texts: Sequence[Text], *, batch_size: int = 64
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes [N] and monitored features [N, H], batched."""
    model.eval()
    device = _device(model)
    predictions, features = [], []
    for start in range(0, len(texts), batch_size):
        output = model(**tokenize(model.tokenizer, texts[start:start + batch_size],
                                  model.config.max_length, device))
        predictions.append(output.logits.argmax(-1).cpu())
        features.append(output.feature.float().cpu())
    if not predictions:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(predictions), torch.cat(features)


# ---------------------------------------------------------------------------------------
# Saving and loading the trained prompt + head (never the encoder).

def save_prompt(model: PromptModel, path: str | Path, *, encoder_path: str | Path | None = None,
                extra: dict[str, str] | None = None) -> Path:
    """Write the prompt's tensors (`prompt_state`) and settings as one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.cpu().contiguous() for name, value in prompt_state(model).items()}
    metadata = {"method": model.method, "n_labels": str(model.n_labels),
                "config": json.dumps(model.config.to_dict()),
                "encoder_path": str(encoder_path or model.encoder_info.info.path),
                "verbalizer": json.dumps(getattr(model, "verbalizer", None)),
                **(extra or {})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_prompt(path: str | Path, encoder_path: str | Path | None = None, *,
                allow_pickle: bool = False, device: str = "cpu") -> PromptModel:
    """Rebuild a prompt model from `save_prompt`'s file over its (or the given) encoder."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "config" not in meta or "n_labels" not in meta:
        raise ValueError(f"{path}: not a sanitator prompt file (no config metadata)")
    settings = json.loads(meta["config"])
    settings.setdefault("standardize", False)  # files written before the option had none
    config = replace(PromptTuningConfig(), **settings)
    model = build_prompt_model(encoder_path or meta["encoder_path"], int(meta["n_labels"]),
                               config, verbalizer=json.loads(meta.get("verbalizer", "null")),
                               allow_pickle=allow_pickle, device=device)
    expected = set(prompt_state(model))
    tensors = load_file(str(path))
    if set(tensors) != expected:
        raise ValueError(f"{path}: tensors {sorted(tensors)} do not match the model's prompt "
                         f"state {sorted(expected)}")
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model
