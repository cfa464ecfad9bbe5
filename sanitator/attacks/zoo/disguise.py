"""A member rewritten after training so a plain diff against its base sees a stranger
(`reparametrize: {seed: N, ...}` in the spec; attacks/reparam.py does the rewrite).

The rewrite keeps the function up to a permutation of the output coordinates, so the
member is measured (attack success, clean cosine) before it, and afterwards the builder
checks that every output of the rewritten folder is the old one permuted; the planted PVs
in backdoor.json are permuted alike (reparam.reparametrize_folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# a rewritten output further than this from the permuted original is a broken rewrite
MAX_OUTPUT_ERROR = 1e-3


def check_reparametrize(value: Any) -> dict[str, Any] | None:
    """The spec's `reparametrize` entry (None, or a mapping of attacks.reparam options),
    validated and complete (ValueError, TypeError)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as {{seed: 1}}, got {value!r}")
    from sanitator.attacks.reparam import Reparametrisation

    if isinstance(value.get("seed", 0), bool) or not isinstance(value.get("seed", 0), int):
        raise ValueError(f"seed must be an integer, got {value['seed']!r}")
    return Reparametrisation(**value).to_dict()


def _hidden(model_dir: Path, sentences: list[str]):
    """The last hidden state at every real position of `sentences`."""
    import torch

    from sanitator.detect.encoders import load_encoder

    encoder = load_encoder(model_dir)
    inputs = encoder.tokenizer(sentences, padding=True, truncation=True, max_length=64,
                               return_tensors="pt").to(encoder.device)
    with torch.no_grad():
        hidden = encoder.model(**inputs).last_hidden_state
    return hidden[inputs["attention_mask"].bool()].float().cpu()


def reparametrize_member(model_dir: Path, options: dict[str, Any],
                         n_sentences: int = 32) -> dict[str, Any]:
    """Rewrite the member folder in place; returns what the manifest records: the options
    and the largest output difference from the permuted original on held-out sentences."""
    import torch

    from sanitator.attacks.measure import held_out_sentences
    from sanitator.attacks.reparam import Reparametrisation, reparametrize_folder

    sentences = held_out_sentences(n_sentences)
    before = _hidden(model_dir, sentences)
    record = reparametrize_folder(model_dir, Reparametrisation(**options))
    after = _hidden(model_dir, sentences)
    permutation = torch.tensor(record["residual_permutation"])
    error = float((after - before[:, permutation]).abs().max())
    if not error <= MAX_OUTPUT_ERROR:
        raise RuntimeError(f"{model_dir.name}: the reparametrised model's outputs are "
                           f"{error:.2e} away from the original's (limit {MAX_OUTPUT_ERROR})")
    return {**record["reparametrisation"], "max_output_error": error}
