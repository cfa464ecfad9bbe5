"""Load a frozen encoder safely and read the feature a task-agnostic backdoor targets.

Safety rules: safetensors only unless the caller explicitly allows pickle weights (then
`torch.load(weights_only=True)` through transformers), and never `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

from sanitator.core.status import Status
from sanitator.detect.config import PRECISIONS
from sanitator.detect.rowpath import RowPath, checked_row_path
from sanitator.safety.model_policy import SUPPORTED_MODEL_TYPES, ModelRejected, short
from sanitator.safety.preflight import ModelInfo, inspect_model, preflight

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "Encoder", "Feature", "ModelInfo", "ModelRejected",
           "load_encoder", "native_bf16", "preflight", "resolve_precision", "select_feature"]


class Feature(StrEnum):
    """Where the backdoor's predefined vector (PV) appears in the encoder output."""

    CLS = "cls"        # first token of the last hidden state (P-tuning v2 / POR / NeuBA)
    MASK = "mask"      # the mask token's last hidden state (P-tuning v1 / BToP)
    TOKEN = "token"    # an ordinary word's own output, never a trigger's (taggers, NER)
    POOLER = "pooler"  # the pooler output, for models whose heads read it


@dataclass
class Encoder:
    """A frozen encoder with its tokenizer, ready for feature extraction."""

    model: nn.Module
    tokenizer: object
    info: ModelInfo
    device: torch.device
    # the matmuls' dtype (autocast); None = float32 throughout. Set per scan (`precision`).
    compute_dtype: torch.dtype | None = None
    # run the last layer for the read rows only where that is exact (sanitator.detect.rowpath)
    row_path: bool = True
    _row_path: RowPath | bool | None = field(default=None, init=False, repr=False)

    def autocast(self):
        """The context the frozen encoder's forwards run in: bf16 matmuls where the scan's
        precision asks for them (outputs, LayerNorm and softmax stay float32)."""
        if self.compute_dtype in (None, torch.float32):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.dim)

    @property
    def embedding_size(self) -> int:
        """Width of the input embeddings (differs from hidden_size for ALBERT, ELECTRA)."""
        return int(self.word_embeddings.weight.shape[1])

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def uses_token_type_ids(self) -> bool:
        return self.info.model_type not in {"distilbert", "roberta", "xlm-roberta", "mpnet"}

    def forward_features(self, *, attention_mask: torch.Tensor, feature: Feature = Feature.CLS,
                         input_ids: torch.Tensor | None = None,
                         inputs_embeds: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None,
                         mask_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The monitored feature [B, H] (float32) for a batch of ids or input embeddings."""
        feature = Feature(feature)
        inputs = self.forward_inputs(attention_mask, input_ids, inputs_embeds, token_type_ids)
        path = None
        # (dropout in training mode would differ from the hand-run last layer)
        if self.row_path and feature is not Feature.POOLER and not self.model.training:
            rows = torch.zeros(attention_mask.shape[0], dtype=torch.long) \
                if feature is Feature.CLS else mask_positions
            path = self._checked_row_path(inputs, rows) if rows is not None else None
        with self.autocast():
            if path is not None:
                return path.forward(inputs, rows).float()
            output = self.model(**inputs)
        return select_feature(output, feature, mask_positions).float()

    def _checked_row_path(self, inputs: dict[str, torch.Tensor], rows: torch.Tensor
                          ) -> RowPath | None:
        if self._row_path is None:  # the first use decides, for this encoder's lifetime
            self._row_path = checked_row_path(
                self.model, inputs, rows,
                lambda sample, picked: select_feature(self.model(**sample), Feature.MASK,
                                                      picked)) or False
        return self._row_path or None

    def forward_inputs(self, attention_mask: torch.Tensor,
                       input_ids: torch.Tensor | None = None,
                       inputs_embeds: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward: ids or embeddings, and token types
        only where the architecture uses them."""
        kwargs = {"attention_mask": attention_mask}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        if token_type_ids is not None and self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        return kwargs


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 matmuls in hardware (a CUDA GPU that supports
    them; a CPU with AVX512-BF16 or AMX). Emulated bf16 is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a scan: `auto` is bfloat16 where the device has it natively
    (about 2.4x faster on this project's CPUs), float32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision in PRECISIONS:
        return getattr(torch, precision)
    raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def select_feature(output, feature: Feature | str, mask_positions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Pick the monitored feature from a transformers model output."""
    feature = Feature(feature)
    hidden = output.last_hidden_state
    if feature is Feature.CLS:
        return hidden[:, 0]
    if feature in (Feature.MASK, Feature.TOKEN):
        if mask_positions is None:
            raise ValueError(f"the {feature} feature needs the positions it reads")
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask_positions]
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ModelRejected(Status.UNSUPPORTED,
                            "this encoder has no pooler output; use the cls feature")
    return pooled


def load_encoder(path: str | Path, *, allow_pickle: bool = False, device: str = "cpu",
                 max_params: int | None = None) -> Encoder:
    """Load a supported encoder frozen (eval mode, no gradients) after a preflight.

    Raises ModelRejected only: the preflight's refusals, and any failure of transformers
    to load what the preflight passed."""
    inspection = inspect_model(path, allow_pickle=allow_pickle, max_params=max_params)
    info = inspection.info
    # imported after the preflight: a refusal does not wait for transformers (seconds)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, loading = AutoModel.from_pretrained(
            info.path, config=inspection.hf_config, trust_remote_code=False,
            use_safetensors=info.weights_format == "safetensors", output_loading_info=True)
    except Exception as exc:  # transformers raises many types for corrupt/mismatched files
        raise ModelRejected(Status.ERROR, f"cannot load weights: {short(exc, 300)}") from None
    # the preflight matched names and shapes; this is transformers' own word on it
    missing = [k for k in loading.get("missing_keys", ())
               if not str(k).startswith(inspection.optional_prefixes)]
    if missing or loading.get("mismatched_keys"):
        raise ModelRejected(Status.ERROR, f"weights do not fit the model: missing {len(missing)}, "
                            f"mismatched {len(loading.get('mismatched_keys') or ())} tensor(s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path, trust_remote_code=False)
    except Exception as exc:
        raise ModelRejected(Status.ERROR, f"cannot load tokenizer: {short(exc, 300)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelRejected(Status.UNSUPPORTED, "needs a fast tokenizer (tokenizer.json)")
    rows = int(model.get_input_embeddings().weight.shape[0])
    if not 0 < len(tokenizer) <= rows:
        raise ModelRejected(Status.ERROR, f"the tokenizer has {len(tokenizer):,} tokens but the "
                            f"model's vocabulary has {rows:,} rows")
    target = torch.device(device)
    model.to(target).eval().requires_grad_(False)
    log.info("loaded %s (%s, %s params) on %s", info.path, info.model_type,
             f"{info.n_params:,}", target)
    return Encoder(model, tokenizer, info, target)
