"""P-tuning v1 with a mask position (PET-style, for BToP models; REFERENCE.md §7.1).

`prompt_tokens` continuous prompt embeddings (through a bi-LSTM + MLP prompt encoder) and a
`[MASK]` are inserted after the first token; the MLM head scores one verbaliser word per
class at the mask (a checkpoint without an MLM head gets a fresh, trainable head transform).
The monitored feature is the mask position's last hidden state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sanitator.core.status import Status
from sanitator.detect.encoders import Encoder, ModelRejected, load_encoder, preflight
from sanitator.downstream.prompt_base import (
    PromptOutput,
    PromptTuningConfig,
    standardizer,
)

log = logging.getLogger(__name__)

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
    raise ModelRejected(Status.UNSUPPORTED, f"no MLM head recipe for model type {model_type!r}")


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
    verbaliser words at the mask. Feature = the mask position's last hidden state (a fresh
    head reads it standardised, see FeatureStandardizer, unless `config.standardize` is
    False)."""

    method = "ptv1"

    def __init__(self, encoder: Encoder, mlm_model: nn.Module | None, n_labels: int,
                 verbalizer: Sequence[str], config: PromptTuningConfig):
        super().__init__()
        if len(verbalizer) != n_labels:
            raise ValueError(f"{len(verbalizer)} verbaliser words for {n_labels} labels")
        if encoder.tokenizer.mask_token_id is None:
            raise ModelRejected(Status.UNSUPPORTED, "the tokenizer has no mask token")
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
            # a trained MLM head reads raw hidden states: nothing in front of it
            self._head = _mlm_head(mlm_model, encoder.info.model_type)
            self.head_kind = "mlm"
        else:
            self._head = None
            self.feature_norm = standardizer(encoder.hidden_size, config, auto_active=True)
            self.fresh_head = FreshVerbalizerHead(encoder.hidden_size, encoder.embedding_size)
            self.head_kind = "fresh-transform+tied-embeddings"
        self.mask_index = 1 + config.prompt_tokens

    def logits_from_feature(self, hidden: torch.Tensor) -> torch.Tensor:
        """Verbaliser scores of mask-position hidden states [B, H] -> [B, classes]."""
        if self._head is not None:
            return self._head(hidden)[:, self.verbalizer_ids]
        words = self.encoder_info.word_embeddings.weight[self.verbalizer_ids]
        return self.fresh_head(self.feature_norm(hidden), words)

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
        output = self.encoder(**self.encoder_info.forward_inputs(
            mask, inputs_embeds=embeds, token_type_ids=types))
        feature = output.last_hidden_state[:, self.mask_index]
        return PromptOutput(self.logits_from_feature(feature), feature)

