"""The attacker's disguise: rewrite a model's weights so a plain diff against its base sees a
stranger, while the function stays the same up to a permutation of the output coordinates.

A transformer encoder has symmetries its weights do not show: the coordinates of the
residual stream can be permuted (every embedding, LayerNorm, and every matrix that reads or
writes the stream permuted alike), the attention heads of a layer reordered, each head's
query/key space mapped by any invertible A (queries by A, keys by A^-T: the scores stay)
and its value/output space by any invertible B (values by B, the output projection by
B^-1), and the feed-forward units reordered. `reparametrize` applies random ones of each:
permutations with random signed scalings inside the heads by default, or random rotations
(`within_heads="rotate"`). detect/align.py undoes them before the reference diff.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sanitator.detect.layout import Layout, head_dim_of, model_layout

WITHIN_HEADS = ("none", "permute", "rotate")


@dataclass(frozen=True)
class Reparametrisation:
    """Which symmetries to use (all by default) and the seed that draws them."""

    seed: int = 0
    residual: bool = True
    heads: bool = True
    within_heads: str = "permute"    # none | permute (signed scalings too) | rotate
    ffn: bool = True

    def __post_init__(self) -> None:
        if self.within_heads not in WITHIN_HEADS:
            raise ValueError(f"within_heads must be one of {WITHIN_HEADS}, got "
                             f"{self.within_heads!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _within(kind: str, d: int, g: torch.Generator) -> torch.Tensor:
    """A random invertible d x d map: a permutation with signed scalings in [0.5, 2], or a
    rotation with such scalings."""
    if kind == "none":
        return torch.eye(d)
    scale = torch.exp(torch.empty(d).uniform_(-0.69, 0.69, generator=g))
    sign = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    if kind == "permute":
        base = torch.eye(d)[torch.randperm(d, generator=g)]
    else:
        base, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        base = base.float()
    return (sign * scale)[:, None] * base


def _perm(n: int, enabled: bool, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g) if enabled else torch.arange(n)


def reparametrize_state(state: dict[str, torch.Tensor], layout: Layout,
                        spec: Reparametrisation) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The canonical `state` (layout.canonical) rewritten by random symmetries; returns it
    and the residual permutation p (new output coordinate i = old coordinate p[i])."""
    g = torch.Generator().manual_seed(spec.seed)
    out = {k: v.clone() for k, v in state.items()}
    width = state["embeddings.word"].shape[1]
    p = _perm(width, spec.residual, g)
    for key in ("embeddings.word", "embeddings.position", "embeddings.token_type"):
        if key in out:
            out[key] = out[key][:, p]
    for key in ("embeddings.norm.weight", "embeddings.norm.bias", "pooler.bias"):
        if key in out:
            out[key] = out[key][p]
    if "pooler.weight" in out:
        out["pooler.weight"] = out["pooler.weight"][p][:, p]
    heads, d = layout.n_heads, head_dim_of(state, layout)
    # MPNet's relative attention bias is shared by every layer: one head order for all
    shared = _perm(heads, spec.heads, g) if "head_bias" in out else None
    if shared is not None:
        out["head_bias"] = out["head_bias"][:, shared]
    for i in range(layout.n_layers):
        L = f"layer.{i}."
        for role in ("q", "k", "v", "ffn_in"):
            out[L + role + ".weight"] = out[L + role + ".weight"][:, p]
        for role in ("o", "ffn_out"):
            out[L + role + ".weight"] = out[L + role + ".weight"][p]
            out[L + role + ".bias"] = out[L + role + ".bias"][p]
        for role in ("norm1", "norm2"):
            for kind in (".weight", ".bias"):
                out[L + role + kind] = out[L + role + kind][p]
        sigma = shared if shared is not None else _perm(heads, spec.heads, g)
        _heads(out, L, sigma, d, spec.within_heads, g)
        pi = _perm(out[L + "ffn_in.weight"].shape[0], spec.ffn, g)
        out[L + "ffn_in.weight"] = out[L + "ffn_in.weight"][pi]
        out[L + "ffn_in.bias"] = out[L + "ffn_in.bias"][pi]
        out[L + "ffn_out.weight"] = out[L + "ffn_out.weight"][:, pi]
    return out, p


def _heads(out: dict[str, torch.Tensor], L: str, sigma: torch.Tensor, d: int, kind: str,
           g: torch.Generator) -> None:
    """Reorder one layer's heads by sigma and map each head's QK and VO spaces."""
    def blocks(t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.split(d, dim=0))

    q_w, q_b = blocks(out[L + "q.weight"]), blocks(out[L + "q.bias"])
    k_w, k_b = blocks(out[L + "k.weight"]), blocks(out[L + "k.bias"])
    v_w, v_b = blocks(out[L + "v.weight"]), blocks(out[L + "v.bias"])
    o_w = list(out[L + "o.weight"].split(d, dim=1))
    new = {name: [] for name in ("qw", "qb", "kw", "kb", "vw", "vb", "ow")}
    for j in sigma.tolist():
        a, b = _within(kind, d, g), _within(kind, d, g)
        a_inv_t, b_inv = torch.linalg.inv(a).T, torch.linalg.inv(b)
        new["qw"].append(a @ q_w[j])
        new["qb"].append(a @ q_b[j])
        new["kw"].append(a_inv_t @ k_w[j])
        new["kb"].append(a_inv_t @ k_b[j])
        new["vw"].append(b @ v_w[j])
        new["vb"].append(b @ v_b[j])
        new["ow"].append(o_w[j] @ b_inv)
    for role, w, bias in (("q", "qw", "qb"), ("k", "kw", "kb"), ("v", "vw", "vb")):
        out[L + role + ".weight"] = torch.cat(new[w])
        out[L + role + ".bias"] = torch.cat(new[bias])
    out[L + "o.weight"] = torch.cat(new["ow"], dim=1)


def reparametrize_model(model: torch.nn.Module, spec: Reparametrisation) -> torch.Tensor:
    """Rewrite a transformers encoder in place; returns the residual permutation."""
    layout = model_layout(model)
    if layout is None:
        raise ValueError(f"no weight layout known for {type(model).__name__}")
    params = dict(model.state_dict())
    state, p = reparametrize_state(layout.canonical(params), layout, spec)
    with torch.no_grad():
        for name, value in layout.named(state).items():
            params[name].copy_(value.to(params[name].dtype))
    return p


def reparametrize_folder(folder: str | Path, spec: Reparametrisation) -> dict:
    """Rewrite a saved model folder in place (safetensors); records what was done in its
    `backdoor.json` when there is one. Returns the record."""
    from transformers import AutoModel

    folder = Path(folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=False, use_safetensors=True)
    p = reparametrize_model(model, spec)
    model.save_pretrained(folder, safe_serialization=True)
    record = {"reparametrisation": spec.to_dict(), "residual_permutation": p.tolist()}
    backdoor = folder / "backdoor.json"
    if backdoor.is_file():
        data = json.loads(backdoor.read_text())
        data["reparametrisation"] = record
        if data.get("pvs"):  # the planted PVs, in the rewritten model's output coordinates
            data["pvs"] = torch.tensor(data["pvs"])[:, p].tolist()
        backdoor.write_text(json.dumps(data, indent=1) + "\n")
    return record
