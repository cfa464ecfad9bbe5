"""The last layer for the rows a feature reads, and no others.

Every monitored feature but the pooler reads one row per sentence (CLS, the mask, a word).
Of every other position the last layer needs only keys and values: its queries, attention
output and feed-forward there are discarded. For BERT-shaped layers (BERT, RoBERTa,
XLM-R, ELECTRA) the row path stops the forward at the last layer and runs that layer for
the read rows only: about 40 % of a 2-layer encoder's forward, 14 % of a 6-layer one's,
and the same again in the backward of a gradient search. Other architectures keep the
full forward. Each encoder's first use checks the row path against the full forward in
float32 and keeps the full forward for good if they differ (docs/method.md).
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

log = logging.getLogger(__name__)

_local = threading.local()  # the layer this thread is stopping at, and what reached it


class _Stopped(Exception):
    """Raised by the hook at the last layer: the rest of the forward is done by hand."""


def _stop_here(module: nn.Module, args: tuple, kwargs: dict):
    box = getattr(_local, "box", None)
    if box is not None and box[0] is module:  # other threads' forwards pass untouched
        box.append(args[0] if args else kwargs["hidden_states"])
        raise _Stopped


def bert_shaped_last_layer(model: nn.Module) -> nn.Module | None:
    """The last encoder layer when it has BERT's shape (self-attention with query, key and
    value projections, then output, intermediate and output blocks), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "position_embedding_type", None) not in (None, "absolute"):
        return None  # relative positions bias the scores: not the plain attention below
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    last = layers[-1]
    attention = getattr(last, "attention", None)
    projections = getattr(attention, "self", None)
    parts = [getattr(projections, name, None) for name in ("query", "key", "value")]
    if not all(isinstance(part, nn.Linear) for part in parts):
        return None
    if not all(isinstance(getattr(projections, name, None), int)
               for name in ("num_attention_heads", "attention_head_size")):
        return None
    blocks = (getattr(attention, "output", None), getattr(last, "intermediate", None),
              getattr(last, "output", None))
    return last if all(isinstance(block, nn.Module) for block in blocks) else None


class RowPath:
    """Installed once per encoder; `forward` returns the last layer's output [B, H] at
    `rows` [B] (one position per sentence)."""

    def __init__(self, model: nn.Module, last: nn.Module):
        self.model, self.last = model, last
        self._handle = last.register_forward_pre_hook(_stop_here, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def forward(self, inputs: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        box: list = [self.last]
        _local.box = box
        try:
            self.model(**inputs)
        except _Stopped:
            pass
        finally:
            _local.box = None
        if len(box) != 2:
            raise RuntimeError("the forward never reached the last layer")
        return self._last_layer(box[1], inputs["attention_mask"], rows)

    def _last_layer(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
        layer = self.last
        projections = layer.attention.self
        heads, width = projections.num_attention_heads, projections.attention_head_size
        batch, length = hidden.shape[:2]
        picked = hidden[torch.arange(batch, device=hidden.device), rows.to(hidden.device)]
        picked = picked[:, None]                                          # [B, 1, H]
        query = projections.query(picked).view(batch, 1, heads, width).transpose(1, 2)
        key = projections.key(hidden).view(batch, length, heads, width).transpose(1, 2)
        value = projections.value(hidden).view(batch, length, heads, width).transpose(1, 2)
        keep = attention_mask.to(device=hidden.device, dtype=torch.bool)[:, None, None, :]
        context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=keep)
        context = context.transpose(1, 2).reshape(batch, 1, heads * width)
        attended = layer.attention.output(context, picked)
        return layer.output(layer.intermediate(attended), attended)[:, 0]


def checked_row_path(model: nn.Module, inputs: dict[str, torch.Tensor], rows: torch.Tensor,
                     full_rows) -> RowPath | None:
    """A RowPath for `model` if it has a BERT-shaped last layer and, on this batch's first
    two sentences in float32, agrees with the full forward (`full_rows(inputs, rows)` ->
    the full forward's output [B, H] at `rows`); else None."""
    last = bert_shaped_last_layer(model)
    if last is None:
        return None
    path = RowPath(model, last)
    sample = {name: value[:2] for name, value in inputs.items()}
    device_type = inputs["attention_mask"].device.type
    try:
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            fast = path.forward(sample, rows[:2])
            full = full_rows(sample, rows[:2])
        scale = float(full.abs().max()) or 1.0
        differs = None if fast.shape == full.shape and torch.allclose(
            fast.float(), full.float(), rtol=1e-4, atol=1e-4 * scale) else "outputs differ"
    except Exception as exc:  # an unforeseen layer variant: the full forward is always right
        differs = str(exc)
    if differs is not None:
        path.remove()
        log.info("row path refused (%s); using the full forward", differs)
        return None
    return path
