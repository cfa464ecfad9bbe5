"""Where each part of a transformer encoder lives in its weights, by role, whatever the
architecture names it: the embeddings, and per layer the query/key/value/output of
attention, the feed-forward in/out and the two LayerNorms.

The reference diff (reference.py), the alignment of a model to its reference (align.py) and
the attacker's reparametrisation (attacks/reparam.py) all speak in roles, so one table per
naming scheme covers BERT, RoBERTa, XLM-R, ELECTRA (the BERT names), MPNet and DistilBERT.
Canonical keys: `embeddings.word`, `embeddings.position`, `embeddings.token_type`,
`embeddings.norm.weight|bias`, `layer.I.<role>.weight|bias` with roles q k v o norm1 ffn_in
ffn_out norm2, `pooler.weight|bias`, and `head_bias` (MPNet's relative attention bias, shared
by every layer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

ROLES = ("q", "k", "v", "o", "norm1", "ffn_in", "ffn_out", "norm2")
# roles whose weight reads the residual stream (columns) / writes it (rows)
READS_RESIDUAL = ("q", "k", "v", "ffn_in")
WRITES_RESIDUAL = ("o", "ffn_out")
NORMS = ("norm1", "norm2")

# per naming scheme: the layer's module path, then each role's module name in it
_SCHEMES = {
    "bert": (r"encoder\.layer\.(\d+)\.", {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "norm1": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
        "norm2": "output.LayerNorm"}),
    "mpnet": (r"encoder\.layer\.(\d+)\.", {
        "q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
        "o": "attention.attn.o", "norm1": "attention.LayerNorm",
        "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
        "norm2": "output.LayerNorm"}),
    "distilbert": (r"transformer\.layer\.(\d+)\.", {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
        "o": "attention.out_lin", "norm1": "sa_layer_norm", "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2", "norm2": "output_layer_norm"}),
}
_EMBEDDINGS = {"word": "embeddings.word_embeddings.weight",
               "position": "embeddings.position_embeddings.weight",
               "token_type": "embeddings.token_type_embeddings.weight",
               "norm.weight": "embeddings.LayerNorm.weight",
               "norm.bias": "embeddings.LayerNorm.bias"}
_OTHER = {"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias",
          "head_bias": "encoder.relative_attention_bias.weight"}


@dataclass(frozen=True)
class Layout:
    """One model's weights by role: canonical key -> the model's own parameter name."""

    names: dict[str, str]
    n_layers: int
    n_heads: int
    scheme: str

    def keys(self) -> list[str]:
        return list(self.names)

    def canonical(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's tensors under canonical keys (float32, on the CPU)."""
        return {key: state[name].detach().float().cpu() for key, name in self.names.items()
                if name in state}

    def named(self, canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors back under the model's own names."""
        return {self.names[key]: value for key, value in canonical.items()
                if key in self.names}



def head_dim_of(state: dict[str, torch.Tensor], layout: Layout) -> int:
    """The width of one attention head (canonical `state`)."""
    return int(state["layer.0.q.weight"].shape[0]) // layout.n_heads


def find_layout(names: Iterable[str], n_heads: int) -> Layout | None:
    """The layout of a model whose parameter names are `names` (any prefix, such as
    `bert.`), or None when they fit no known scheme or a layer misses a role (ALBERT's
    shared layer, a model without weights)."""
    names = list(names)
    for scheme, (pattern, roles) in _SCHEMES.items():
        found: dict[str, str] = {}
        layer_re = re.compile(rf"(?:^|\.){pattern}(.+)\.(weight|bias)$")
        for name in names:
            match = layer_re.search(name)
            if not match:
                continue
            index, module, kind = match.groups()
            role = next((r for r, m in roles.items() if m == module), None)
            if role is not None:
                found[f"layer.{index}.{role}.{kind}"] = name
        if not found:
            continue
        depth = 1 + max(int(k.split(".")[1]) for k in found)
        complete = all(f"layer.{i}.{role}.{kind}" in found for i in range(depth)
                       for role in ROLES for kind in ("weight", "bias"))
        if not complete:  # another scheme may name the same modules (MPNet's FFN)
            continue
        for key, suffix in {**_EMBEDDINGS, **_OTHER}.items():
            match = next((n for n in names if n == suffix or n.endswith("." + suffix)), None)
            if match is not None:
                found[f"embeddings.{key}" if suffix in _EMBEDDINGS.values() else key] = match
        if "embeddings.word" in found and "embeddings.norm.weight" in found:
            return Layout(found, depth, n_heads, scheme)
    return None


def model_layout(model: torch.nn.Module) -> Layout | None:
    """The layout of a transformers model (its config says how many heads)."""
    config = model.config
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 0))
    if heads <= 0:
        return None
    return find_layout((name for name, _ in model.named_parameters()), heads)
