"""P-tuning v2 / deep prefix-tuning on a frozen encoder (REFERENCE.md §7.1).

`prefix_length` trainable key/value vectors are prepended to the attention of every layer,
and a linear head reads the CLS last hidden state. The prefixes go in through a custom
attention function registered with transformers' attention interface, so positions, masks
and the encoder's own code stay untouched (peft's prefix tuning goes through the KV cache,
which BERT encoders in transformers 5 shift positions for and do not mask).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from sanitator.core.status import Status
from sanitator.detect.encoders import Encoder, ModelRejected
from sanitator.downstream.prompt_base import (
    PromptOutput,
    PromptTuningConfig,
    standardizer,
)

PREFIX_ATTENTION = "sanitator_prefix"
# Families whose attention runs through transformers' attention interface (deep prefixes).
PREFIX_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "albert",
                                "distilbert"})

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
        raise ModelRejected(Status.UNSUPPORTED, f"{encoder.info.model_type}: attention layout not "
                            "understood for deep prompts")
    heads, head_dim = feed.shapes[0]
    return feed.calls, heads, head_dim


@contextlib.contextmanager
def _prefix_attention_on(encoder: Encoder):
    """The encoder's attention through `_prefix_attention` for the block, then as it was."""
    config = encoder.model.config
    previous = config._attn_implementation
    config._attn_implementation = PREFIX_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def deep_prefixes(encoder: Encoder, keys: torch.Tensor, values: torch.Tensor):
    """Run `encoder`'s forwards in the block with these prefix keys/values prepended at
    every layer ([layers, batch, heads, P, head_dim] each), as a P-tuning v2 model would;
    the encoder's attention setting is restored afterwards (nothing of it is saved)."""
    with _prefix_attention_on(encoder):
        token = _FEED.set(_PrefixFeed(keys, values))
        try:
            yield
        finally:
            _FEED.reset(token)


def prefix_layout(encoder: Encoder) -> tuple[int, int, int]:
    """(prefixed layers, heads, head_dim) of `encoder`; ModelRejected when not understood."""
    with _prefix_attention_on(encoder):
        return _attention_layout(encoder)


class PrefixClassifier(nn.Module):
    """P-tuning v2: deep prefixes at every layer of a frozen encoder + a linear CLS head
    (on the CLS feature standardised where it barely varies, see FeatureStandardizer)."""

    method = "ptv2"

    def __init__(self, encoder: Encoder, n_labels: int, config: PromptTuningConfig):
        super().__init__()
        if encoder.info.model_type not in PREFIX_MODEL_TYPES:
            raise ModelRejected(Status.UNSUPPORTED, f"deep prompts (ptv2) support model types "
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
        # auto mode decides from the CLS spread before training (prompt_tuning.train)
        self.feature_norm = standardizer(encoder.hidden_size, config, auto_active=False)
        self.head_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(encoder.hidden_size, n_labels)

    def _prefix_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.prefix_dropout(self.prefix.weight)             # [P, L*2*heads*d]
        table = table.view(self.config.prefix_length, self.n_layers, 2, self.n_heads,
                           self.head_dim)
        table = table.permute(1, 2, 3, 0, 4).unsqueeze(2)           # [L, 2, 1, heads, P, d]
        return table[:, 0], table[:, 1]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen encoder's last hidden states [B, L, H] with this model's prefixes."""
        keys, values = self._prefix_keys_values()
        batch = input_ids.shape[0]
        feed = _PrefixFeed(keys.expand(-1, batch, -1, -1, -1),
                           values.expand(-1, batch, -1, -1, -1))
        token = _FEED.set(feed)
        try:
            output = self.encoder(**self.encoder_info.forward_inputs(
                attention_mask, input_ids, token_type_ids=token_type_ids))
        finally:
            _FEED.reset(token)
        return output.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_unused) -> PromptOutput:
        feature = self.encode(input_ids, attention_mask, token_type_ids)[:, 0]
        return PromptOutput(self.logits_from_feature(feature), feature)

    def logits_from_feature(self, feature: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.feature_norm(feature)))

