"""Load a frozen encoder safely and read the feature a task-agnostic backdoor targets.

Safety rules: safetensors only unless the caller explicitly allows pickle weights (then
`torch.load(weights_only=True)` through transformers), and never `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# model_type (config.json) -> family; every one has a fast tokenizer and accepts inputs_embeds.
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({
    "bert", "roberta", "xlm-roberta", "albert", "deberta-v2", "electra", "distilbert", "mpnet",
})
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class Feature(StrEnum):
    """Where the backdoor's predefined vector (PV) appears in the encoder output."""

    CLS = "cls"        # first token of the last hidden state (P-tuning v2 / POR / NeuBA)
    MASK = "mask"      # the mask token's last hidden state (P-tuning v1 / BToP)
    POOLER = "pooler"  # the pooler output, for models whose heads read it


class ModelRejected(Exception):
    """The model cannot be audited. `status` is `unsupported` or `error`; `reason` says why."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ModelInfo:
    """What a preflight learns from a model folder without loading any weights."""

    path: Path
    model_type: str
    weights_format: str  # "safetensors" or "pickle"
    weight_bytes: int
    n_params: int | None  # exact for safetensors (from the header), None for pickle


def _safetensors_param_count(files: list[Path]) -> int:
    total = 0
    for file in files:
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelRejected("error", f"{file.name}: corrupt safetensors file (truncated)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > 100_000_000:
                raise ModelRejected("error", f"{file.name}: corrupt safetensors header")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ModelRejected("error", f"{file.name}: corrupt safetensors header") from exc
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def _weight_files(path: Path, names: tuple[str, str]) -> list[Path]:
    single, index = (path / name for name in names)
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    return []


def preflight(path: str | Path, *, allow_pickle: bool = False,
              max_params: int | None = None) -> ModelInfo:
    """Check a model folder before loading: config, architecture, weight format, size.

    Raises ModelRejected with status `unsupported` (architecture) or `error` (anything else).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelRejected("error", f"{path}: no config.json (not a model folder)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelRejected("error", f"{path}: config.json is not valid JSON ({exc})") from exc
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ",".join(config.get("architectures") or []) or "unknown architecture"
        raise ModelRejected("unsupported", f"unsupported architecture: model_type={model_type!r} "
                            f"({arch}); supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    safe = _weight_files(path, SAFETENSORS_FILES)
    if safe:
        missing = [file.name for file in safe if not file.is_file()]
        if missing:
            raise ModelRejected("error", f"{path}: missing weight shards {missing}")
        n_params: int | None = _safetensors_param_count(safe)
        files, weights_format = safe, "safetensors"
    else:
        pickled = _weight_files(path, PICKLE_FILES)
        if not pickled:
            raise ModelRejected("error", f"{path}: no weights (model.safetensors or "
                                "pytorch_model.bin) in the folder")
        if not allow_pickle:
            raise ModelRejected("error", f"{path}: only pickle weights ({pickled[0].name}); "
                                "refusing to unpickle an audited model. Convert it to "
                                "safetensors, or allow pickle explicitly (--allow-pickle), "
                                "which loads with torch.load(weights_only=True)")
        n_params, files, weights_format = None, pickled, "pickle"
    if max_params is not None and n_params is not None and n_params > max_params:
        raise ModelRejected("error", f"{path}: {n_params:,} parameters exceed the limit of "
                            f"{max_params:,}")
    return ModelInfo(path, model_type, weights_format, sum(f.stat().st_size for f in files),
                     n_params)


@dataclass
class Encoder:
    """A frozen encoder with its tokenizer, ready for feature extraction."""

    model: nn.Module
    tokenizer: object
    info: ModelInfo
    device: torch.device

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
        """The monitored feature [B, H] for a batch of ids or input embeddings."""
        kwargs = {"attention_mask": attention_mask}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        if token_type_ids is not None and self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        output = self.model(**kwargs)
        return select_feature(output, feature, mask_positions)


def select_feature(output, feature: Feature | str, mask_positions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Pick the monitored feature from a transformers model output."""
    feature = Feature(feature)
    hidden = output.last_hidden_state
    if feature is Feature.CLS:
        return hidden[:, 0]
    if feature is Feature.MASK:
        if mask_positions is None:
            raise ValueError("the mask feature needs mask_positions")
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask_positions]
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ModelRejected("unsupported", "this encoder has no pooler output; use the cls feature")
    return pooled


def load_encoder(path: str | Path, *, allow_pickle: bool = False, device: str = "cpu",
                 max_params: int | None = None) -> Encoder:
    """Load a supported encoder frozen (eval mode, no gradients) after a preflight."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    info = preflight(path, allow_pickle=allow_pickle, max_params=max_params)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(
            info.path, trust_remote_code=False,
            use_safetensors=info.weights_format == "safetensors")
    except Exception as exc:  # transformers raises many types for corrupt/mismatched files
        raise ModelRejected("error", f"{info.path}: cannot load weights: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path, trust_remote_code=False)
    except Exception as exc:
        raise ModelRejected("error", f"{info.path}: cannot load tokenizer: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelRejected("unsupported", f"{info.path}: needs a fast tokenizer (tokenizer.json)")
    target = torch.device(device)
    model.to(target).eval().requires_grad_(False)
    if info.n_params is None:
        info = ModelInfo(info.path, info.model_type, info.weights_format, info.weight_bytes,
                         sum(p.numel() for p in model.parameters()))
    log.info("loaded %s (%s, %s params) on %s", info.path, info.model_type,
             f"{info.n_params:,}", target)
    return Encoder(model, tokenizer, info, target)
