"""Prompt-tuning on a frozen encoder, the way the backdoor's victims adapt it (REFERENCE.md §7.1).

Two methods; in both only the prompt (and head) parameters train and the encoder stays frozen:

* `ptv2` — P-tuning v2 / deep prefix-tuning: `prefix_length` trainable key/value vectors are
  prepended to the attention of every layer, and a linear head reads the CLS last hidden
  state. The prefixes go in through a custom attention function registered with
  transformers' attention interface, so positions, masks and the encoder's own code stay
  untouched (peft's prefix tuning goes through the KV cache, which BERT encoders in
  transformers 5 shift positions for and do not mask).
* `ptv1` — P-tuning v1 with a mask position (PET-style, for BToP models): `prompt_tokens`
  continuous prompt embeddings (through a bi-LSTM + MLP prompt encoder) and a `[MASK]` are
  inserted after the first token; the MLM head scores one verbaliser word per class at the
  mask (a checkpoint without an MLM head gets a fresh, trainable head transform). The
  monitored feature is the mask position's last hidden state.

Both models return `PromptOutput(logits, feature)`, so `MonitoredEncoder` can wrap them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from sanitator.encoders import Encoder, ModelRejected, load_encoder, preflight

log = logging.getLogger(__name__)

Text = str | tuple[str, str]
Method = Literal["ptv2", "ptv1"]
METHODS: tuple[str, ...] = ("ptv2", "ptv1")
PREFIX_ATTENTION = "sanitator_prefix"
# Families whose attention runs through transformers' attention interface (deep prefixes).
PREFIX_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "albert",
                                "distilbert"})
# Learning rates used when the config leaves them unset: the reference's P-tuning v2 range
# for BERT-base (§7.3) and a P-tuning v1 rate raised from 1e-4 for CPU-sized step counts.
DEFAULT_LR: dict[str, float] = {"ptv2": 1e-2, "ptv1": 1e-3}


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt-tuning settings. Defaults are sized to run on a CPU in minutes (MiniLM-L6,
    2,000 training rows); the reference trains longer on GPUs (§7.3-7.4)."""

    method: Method = "ptv2"
    prefix_length: int = 16        # ptv2: deep prompt vectors per layer (reference: 8-144)
    prompt_tokens: int = 2         # ptv1: continuous prompt tokens (reference pattern_id 1-2)
    learning_rate: float | None = None  # None: DEFAULT_LR[method]
    epochs: int = 3
    batch_size: int = 32
    max_length: int | None = None  # None: the task's own maximum (64-128 tokens)
    train_size: int | None = 2000  # training rows drawn with the seed; None: all
    dropout: float = 0.1           # on the prefixes / the head's input, as in the reference
    weight_decay: float = 0.0
    seed: int = 44

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown prompt-tuning method {self.method!r}; use one of {METHODS}")
        for name in ("prefix_length", "prompt_tokens", "epochs", "batch_size", "max_length",
                     "train_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        return {**asdict(self), "learning_rate": self.lr}


@dataclass
class PromptOutput:
    """What a prompt model returns: task logits [B, C] and the monitored feature [B, H]."""

    logits: torch.Tensor
    feature: torch.Tensor


# ---------------------------------------------------------------------------------------
# Deep prefixes through the attention interface.

class _PrefixFeed:
    """Per-forward prefix keys/values, handed out to attention calls in layer order."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        self.keys, self.values = keys, values   # [L, B, heads, P, head_dim] or None (probe)
        self.calls = 0
        self.shapes: list[tuple[int, int]] = []  # probe: (heads, head_dim) per call

    def next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        index, self.calls = self.calls, self.calls + 1
        if self.keys is None:
            return None
        if index >= self.keys.shape[0]:
            raise RuntimeError(f"encoder made more attention calls than the {self.keys.shape[0]} "
                               "prefixed layers")
        return self.keys[index], self.values[index]


_FEED: contextvars.ContextVar[_PrefixFeed | None] = contextvars.ContextVar("prefix_feed",
                                                                         default=None)


def _extend_mask(mask: torch.Tensor | None, n_prefix: int) -> torch.Tensor | None:
    """Let every query attend to the prefixes: prepend 'attend' columns to the mask."""
    if mask is None:
        return None
    shape = (*mask.shape[:-1], n_prefix)
    if mask.dtype == torch.bool:
        pad = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 means attend
        pad = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def _prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention with this layer's prefix keys/values prepended (plain SDPA when none)."""
    feed = _FEED.get()
    if feed is not None:
        if feed.keys is None:
            feed.shapes.append((int(query.shape[1]), int(query.shape[-1])))
        prefix = feed.next()
        if prefix is not None:
            prefix_keys, prefix_values = prefix
            key = torch.cat([prefix_keys.to(key.dtype), key], dim=2)
            value = torch.cat([prefix_values.to(value.dtype), value], dim=2)
            attention_mask = _extend_mask(attention_mask, prefix_keys.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, _prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def _attention_layout(encoder: Encoder) -> tuple[int, int, int]:
    """(attention calls per forward, heads, head_dim), learned from one probe forward."""
    feed = _PrefixFeed(None, None)
    token = _FEED.set(feed)
    try:
        with torch.no_grad():
            ids = torch.tensor([[encoder.tokenizer.cls_token_id or 0, 5, 6]], device=encoder.device)
            encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        _FEED.reset(token)
    if not feed.shapes or len(set(feed.shapes)) != 1:
        raise ModelRejected("unsupported", f"{encoder.info.model_type}: attention layout not "
                            "understood for deep prompts")
    heads, head_dim = feed.shapes[0]
    return feed.calls, heads, head_dim


def _model_inputs(encoder: Encoder, input_ids=None, attention_mask=None, token_type_ids=None,
                  inputs_embeds=None) -> dict[str, torch.Tensor]:
    kwargs = {"attention_mask": attention_mask}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    if token_type_ids is not None and encoder.uses_token_type_ids:
        kwargs["token_type_ids"] = token_type_ids
    return kwargs


class PrefixClassifier(nn.Module):
    """P-tuning v2: deep prefixes at every layer of a frozen encoder + a linear CLS head."""

    method = "ptv2"

    def __init__(self, encoder: Encoder, n_labels: int, config: PromptTuningConfig):
        super().__init__()
        if encoder.info.model_type not in PREFIX_MODEL_TYPES:
            raise ModelRejected("unsupported", f"deep prompts (ptv2) support model types "
                                f"{sorted(PREFIX_MODEL_TYPES)}, not {encoder.info.model_type!r}; "
                                "use method ptv1")
        self.encoder = encoder.model
        self.encoder_info = encoder
        self.tokenizer = encoder.tokenizer
        self.config = config
        self.n_labels = n_labels
        encoder.model.config._attn_implementation = PREFIX_ATTENTION
        self.n_layers, self.n_heads, self.head_dim = _attention_layout(encoder)
        # One row per prefix position holding keys and values of every layer (no projection,
        # as the reference's default PrefixEncoder).
        self.prefix = nn.Embedding(config.prefix_length,
                                   self.n_layers * 2 * self.n_heads * self.head_dim)
        self.prefix_dropout = nn.Dropout(config.dropout)
        self.head_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(encoder.hidden_size, n_labels)

    def _prefix_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.prefix_dropout(self.prefix.weight)             # [P, L*2*heads*d]
        table = table.view(self.config.prefix_length, self.n_layers, 2, self.n_heads,
                           self.head_dim)
        table = table.permute(1, 2, 3, 0, 4).unsqueeze(2)           # [L, 2, 1, heads, P, d]
        return table[:, 0], table[:, 1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_unused) -> PromptOutput:
        keys, values = self._prefix_keys_values()
        batch = input_ids.shape[0]
        feed = _PrefixFeed(keys.expand(-1, batch, -1, -1, -1),
                           values.expand(-1, batch, -1, -1, -1))
        token = _FEED.set(feed)
        try:
            output = self.encoder(**_model_inputs(self.encoder_info, input_ids, attention_mask,
                                                  token_type_ids))
        finally:
            _FEED.reset(token)
        feature = output.last_hidden_state[:, 0]
        return PromptOutput(self.head(self.head_dropout(feature)), feature)


# ---------------------------------------------------------------------------------------
# P-tuning v1 with a mask position.

def _mlm_head(mlm_model: nn.Module, model_type: str):
    """The MLM head as a function hidden [B, H] -> vocabulary logits [B, V]."""
    if model_type in ("bert", "deberta-v2") and hasattr(mlm_model, "cls"):
        return mlm_model.cls
    if model_type in ("roberta", "xlm-roberta", "mpnet"):
        return mlm_model.lm_head
    if model_type == "albert":
        return mlm_model.predictions
    if model_type == "electra":
        return lambda hidden: mlm_model.generator_lm_head(mlm_model.generator_predictions(hidden))
    if model_type == "distilbert":
        return lambda hidden: mlm_model.vocab_projector(mlm_model.vocab_layer_norm(
            mlm_model.activation(mlm_model.vocab_transform(hidden))))
    raise ModelRejected("unsupported", f"no MLM head recipe for model type {model_type!r}")


HEAD_KEY_MARKERS = ("predictions", "lm_head", "vocab_projector", "vocab_transform")


def _checkpoint_has_mlm_head(path: Path) -> bool:
    from safetensors import safe_open

    files = sorted(path.glob("model*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if any(marker in key for key in handle.keys()  # noqa: SIM118
                   for marker in HEAD_KEY_MARKERS):
                return True
    return False


def load_masked_lm(path: str | Path, *, allow_pickle: bool = False, device: str = "cpu"
                   ) -> tuple[Encoder, nn.Module | None]:
    """A frozen encoder plus its MLM model when the checkpoint carries a trained MLM head.

    Without a head (sentence-embedding checkpoints such as all-MiniLM-L6-v2) the second item
    is None and ptv1 trains a fresh head transform scored against the input embeddings.
    """
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    info = preflight(path, allow_pickle=allow_pickle)
    if info.weights_format != "safetensors" or not _checkpoint_has_mlm_head(info.path):
        return load_encoder(path, allow_pickle=allow_pickle, device=device), None
    base = load_encoder(path, allow_pickle=allow_pickle, device=device)  # tokenizer + checks
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        mlm_model = AutoModelForMaskedLM.from_pretrained(info.path, trust_remote_code=False,
                                                         use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    mlm_model.to(base.device).eval().requires_grad_(False)
    encoder = Encoder(mlm_model.base_model, base.tokenizer, base.info, base.device)
    return encoder, mlm_model


class PromptEncoder(nn.Module):
    """P-tuning v1's reparameterisation: prompt embeddings -> bi-LSTM -> MLP."""

    def __init__(self, n_tokens: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.lstm = nn.LSTM(width, max(1, width // 2), num_layers=2, bidirectional=True,
                            batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * max(1, width // 2), width), nn.ReLU(),
                                 nn.Linear(width, width))

    def forward(self) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding.unsqueeze(0))
        return self.mlp(hidden).squeeze(0)                            # [n_tokens, width]


class FreshVerbalizerHead(nn.Module):
    """For checkpoints without an MLM head: a trainable BERT-style transform (dense, GELU,
    LayerNorm) scored against the frozen input embeddings of the verbaliser words."""

    def __init__(self, hidden_size: int, embedding_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden_size, embedding_size), nn.GELU(),
                                       nn.LayerNorm(embedding_size))

    def forward(self, hidden: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ words.T


def verbalizer_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """One vocabulary id per class: the first sub-token of each verbaliser word."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"verbaliser word {word!r} tokenises to nothing")
        if len(pieces) > 1:
            log.warning("verbaliser word %r is %d tokens; scoring its first", word, len(pieces))
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbaliser words {list(words)} share a first token")
    return ids


class MaskPromptClassifier(nn.Module):
    """P-tuning v1: [CLS] prompt_1..prompt_k [MASK] text... ; logits = MLM scores of the
    verbaliser words at the mask. Feature = the mask position's last hidden state."""

    method = "ptv1"

    def __init__(self, encoder: Encoder, mlm_model: nn.Module | None, n_labels: int,
                 verbalizer: Sequence[str], config: PromptTuningConfig):
        super().__init__()
        if len(verbalizer) != n_labels:
            raise ValueError(f"{len(verbalizer)} verbaliser words for {n_labels} labels")
        if encoder.tokenizer.mask_token_id is None:
            raise ModelRejected("unsupported", "the tokenizer has no mask token")
        self.encoder = encoder.model
        self.encoder_info = encoder
        self.mlm_model = mlm_model
        self.tokenizer = encoder.tokenizer
        self.config = config
        self.n_labels = n_labels
        self.verbalizer = list(verbalizer)
        self.register_buffer("verbalizer_ids", torch.tensor(
            verbalizer_token_ids(encoder.tokenizer, verbalizer)), persistent=False)
        self.prompt = PromptEncoder(config.prompt_tokens, encoder.embedding_size)
        if mlm_model is not None:
            self._head = _mlm_head(mlm_model, encoder.info.model_type)
            self.head_kind = "mlm"
        else:
            self._head = None
            self.fresh_head = FreshVerbalizerHead(encoder.hidden_size, encoder.embedding_size)
            self.head_kind = "fresh-transform+tied-embeddings"
        self.mask_index = 1 + config.prompt_tokens

    def _verbalizer_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._head is not None:
            return self._head(hidden)[:, self.verbalizer_ids]
        words = self.encoder_info.word_embeddings.weight[self.verbalizer_ids]
        return self.fresh_head(hidden, words)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_unused) -> PromptOutput:
        batch, k = input_ids.shape[0], self.config.prompt_tokens
        inserted = torch.full((batch, k + 1), self.tokenizer.mask_token_id,
                              dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([input_ids[:, :1], inserted, input_ids[:, 1:]], dim=1)
        embeds = self.encoder_info.word_embeddings(ids)
        prompt = self.prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([embeds[:, :1], prompt, embeds[:, 1 + k:]], dim=1)
        mask = torch.cat([attention_mask[:, :1], torch.ones_like(inserted), attention_mask[:, 1:]],
                         dim=1)
        types = None
        if token_type_ids is not None:
            types = torch.cat([token_type_ids[:, :1], torch.zeros_like(inserted),
                               token_type_ids[:, 1:]], dim=1)
        output = self.encoder(**_model_inputs(self.encoder_info, attention_mask=mask,
                                              token_type_ids=types, inputs_embeds=embeds))
        feature = output.last_hidden_state[:, self.mask_index]
        return PromptOutput(self._verbalizer_scores(feature), feature)


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
    """What prompt-tuning did: recorded next to every evaluation."""

    method: str
    n_train: int
    steps: int
    epochs: int
    seconds: float
    final_loss: float
    train_accuracy: float
    trainable_params: int
    config: dict

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
    return TrainingStats(config.method, len(texts), total, config.epochs,
                         time.perf_counter() - start, loss_value, correct / max(seen, 1),
                         sum(p.numel() for p in params.values()), config.to_dict())


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
    """Write the trainable tensors and their settings as one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().cpu().contiguous()
               for name, param in trainable_parameters(model).items()}
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
    config = replace(PromptTuningConfig(), **settings)
    model = build_prompt_model(encoder_path or meta["encoder_path"], int(meta["n_labels"]),
                               config, verbalizer=json.loads(meta.get("verbalizer", "null")),
                               allow_pickle=allow_pickle, device=device)
    expected = set(trainable_parameters(model))
    tensors = load_file(str(path))
    if set(tensors) != expected:
        raise ValueError(f"{path}: tensors {sorted(tensors)} do not match the model's prompt "
                         f"parameters {sorted(expected)}")
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model
