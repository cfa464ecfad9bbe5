"""Align a reference model to the audited one over the symmetries a transformer has, so a
diff cannot be hidden by rewriting the weights (attacks/reparam.py is the attacker's side).

The reference is rewritten into the audited model's coordinates; the audited model is
never touched (its PVs live in its own output coordinates). In order:

1. the residual stream: its coordinates are matched by the correlation of the word
   embeddings' columns over the vocabulary (one assignment);
2. per layer, the heads: matched by their query-key and value-output circuits
   (Wq_h^T Wk_h and Wo_h Wv_h, both unchanged by any map inside a head); MPNet's relative
   attention bias is shared by every layer, so there one order serves all layers;
3. inside each matched head, the query/key space by the invertible A that best fits
   Q_ours ~ A Q_ref and K_ours ~ A^-T K_ref, the value/output space by B with
   V_ours ~ B V_ref and O_ours ~ O_ref B^-1 (each a Sylvester equation; biases included);
4. per layer, the feed-forward units: matched by their input rows and output columns.

A map is used only where it explains most of the difference (the residual left is under a
quarter of what the identity leaves): an ordinary fine-tune keeps its own coordinates, so
no fitted map absorbs part of a real change. Assignments take the row-wise best match when
that is already a permutation and solve the assignment problem otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sanitator.detect.layout import Layout, head_dim_of

# a fitted map is used when it leaves less than this share of the identity's residual
EXPLAINS = 0.25
# residual coordinates whose embedding columns correlate less than this on average are
# not the same coordinates: the reference is a stranger, and aligning it further is moot
MIN_RESIDUAL_CORRELATION = 0.5


@dataclass
class Alignment:
    """The reference's canonical weights in the audited model's coordinates, and what it
    took to put them there."""

    state: dict[str, torch.Tensor]
    residual_moved: int = 0          # residual coordinates not matched to themselves
    residual_correlation: float = 1.0
    layers_heads_moved: int = 0      # layers whose heads were reordered
    heads_mapped: int = 0            # heads whose QK or VO space was mapped
    layers_ffn_moved: int = 0        # layers whose feed-forward units were reordered
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        return bool(self.residual_moved or self.layers_heads_moved or self.heads_mapped
                    or self.layers_ffn_moved)

    def summary(self) -> dict:
        return {"aligned": self.moved, "residual_moved": self.residual_moved,
                "residual_correlation": round(self.residual_correlation, 4),
                "layers_heads_moved": self.layers_heads_moved,
                "heads_mapped": self.heads_mapped, "layers_ffn_moved": self.layers_ffn_moved,
                "seconds": round(self.seconds, 2)}


def assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation j = perm[i] maximising the summed similarity[i, j]."""
    best = similarity.argmax(dim=1)
    if len(set(best.tolist())) == similarity.shape[0]:
        return best
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    perm = torch.empty(similarity.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of a with every row of b."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def _residual(ours: dict, ref: dict) -> tuple[torch.Tensor, float]:
    """Match residual coordinates by the correlation of embedding columns."""
    rows = min(ours["embeddings.word"].shape[0], ref["embeddings.word"].shape[0])
    a, b = ours["embeddings.word"][:rows], ref["embeddings.word"][:rows]
    a = (a - a.mean(0)) / a.std(0).clamp_min(1e-8)
    b = (b - b.mean(0)) / b.std(0).clamp_min(1e-8)
    corr = a.T @ b / rows
    perm = assignment(corr)
    return perm, float(corr[torch.arange(len(perm)), perm].mean())


def _permute_residual(state: dict, p: torch.Tensor) -> dict:
    """The reference with its residual coordinates reordered: our i <- its p[i]."""
    out = dict(state)
    for key, value in state.items():
        if key.startswith("embeddings.") and value.dim() == 2:
            out[key] = value[:, p]
        elif key in ("embeddings.norm.weight", "embeddings.norm.bias", "pooler.bias"):
            out[key] = value[p]
        elif key == "pooler.weight":
            out[key] = value[p][:, p]
        elif key.startswith("layer."):
            role, kind = key.split(".")[2:4]
            if role in ("q", "k", "v", "ffn_in"):
                out[key] = value[:, p] if kind == "weight" else value
            else:  # o and ffn_out write the stream; the norms act on it
                out[key] = value[p]
    return out


def _aug(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([weight, bias[:, None]], dim=1)


def _head_similarity(ours: dict, ref: dict, L: str, heads: int, d: int) -> torch.Tensor:
    """[heads, heads]: cosine of the QK circuits plus cosine of the VO circuits. The inner
    product of two circuits is a sum over d x d blocks (trace identities), so no H x H
    circuit is ever formed: <Qa^T Ka, Qb^T Kb> = sum((Qa Qb^T) * (Ka Kb^T))."""
    def block_sums(x: torch.Tensor) -> torch.Tensor:  # [heads*d, heads*d] -> [heads, heads]
        return x.view(heads, d, heads, d).sum(dim=(1, 3))

    def inner(a: dict, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        qk = block_sums((a[L + "q.weight"] @ b[L + "q.weight"].T)
                        * (a[L + "k.weight"] @ b[L + "k.weight"].T))
        vo = block_sums((a[L + "o.weight"].T @ b[L + "o.weight"])
                        * (a[L + "v.weight"] @ b[L + "v.weight"].T))
        return qk, vo

    qk_ab, vo_ab = inner(ours, ref)
    qk_aa, vo_aa = (x.diagonal().clamp_min(1e-12).sqrt() for x in inner(ours, ours))
    qk_bb, vo_bb = (x.diagonal().clamp_min(1e-12).sqrt() for x in inner(ref, ref))
    return qk_ab / (qk_aa[:, None] * qk_bb[None]) + vo_ab / (vo_aa[:, None] * vo_bb[None])


def _reorder_heads(state: dict, L: str, perm: torch.Tensor, d: int) -> None:
    """Our head i <- the reference's head perm[i]."""
    index = (perm[:, None] * d + torch.arange(d)[None]).reshape(-1)
    for role in ("q", "k", "v"):
        state[L + role + ".weight"] = state[L + role + ".weight"][index]
        state[L + role + ".bias"] = state[L + role + ".bias"][index]
    state[L + "o.weight"] = state[L + "o.weight"][:, index]


def _sylvester(a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    from scipy.linalg import solve_sylvester

    try:
        x = solve_sylvester(a.double().numpy(), b.double().numpy(), q.double().numpy())
    except (ValueError, ArithmeticError):  # singular: keep the identity
        return None
    out = torch.as_tensor(x).float()
    return out if bool(torch.isfinite(out).all()) else None


def _inverse(a: torch.Tensor) -> torch.Tensor | None:
    try:
        out = torch.linalg.inv(a.double()).float()
    except RuntimeError:  # singular
        return None
    return out if bool(torch.isfinite(out).all()) else None


def _map_head(ours: dict, ref: dict, L: str, h: int, d: int) -> bool:
    """Fit head h's QK and VO maps; rewrite the reference's head where a map explains
    most of the difference. True when it did."""
    rows = slice(h * d, (h + 1) * d)
    qa, qb = _aug(ours[L + "q.weight"][rows], ours[L + "q.bias"][rows]), \
        _aug(ref[L + "q.weight"][rows], ref[L + "q.bias"][rows])
    ka, kb = _aug(ours[L + "k.weight"][rows], ours[L + "k.bias"][rows]), \
        _aug(ref[L + "k.weight"][rows], ref[L + "k.bias"][rows])
    va, vb = _aug(ours[L + "v.weight"][rows], ours[L + "v.bias"][rows]), \
        _aug(ref[L + "v.weight"][rows], ref[L + "v.bias"][rows])
    oa, ob = ours[L + "o.weight"][:, rows], ref[L + "o.weight"][:, rows]
    changed = False
    # a head already in the reference's coordinates differs by a fine-tune's few percent;
    # only a head the identity leaves far apart can have been rewritten
    identity = (qa - qb).pow(2).sum() + (ka - kb).pow(2).sum()
    if identity > EXPLAINS * (qa.pow(2).sum() + ka.pow(2).sum()):
        a = _sylvester(ka @ ka.T, qb @ qb.T, qa @ qb.T + ka @ kb.T)
        a_inv_t = None if a is None else _inverse(a).T
        if a_inv_t is not None and \
                (qa - a @ qb).pow(2).sum() + (ka - a_inv_t @ kb).pow(2).sum() \
                < EXPLAINS * identity:
            qb, kb, changed = a @ qb, a_inv_t @ kb, True
    identity = (va - vb).pow(2).sum() + (oa - ob).pow(2).sum()
    if identity > EXPLAINS * (va.pow(2).sum() + oa.pow(2).sum()):
        b = _sylvester(oa.T @ oa, vb @ vb.T, va @ vb.T + oa.T @ ob)
        b_inv = None if b is None else _inverse(b)
        if b_inv is not None and \
                (va - b @ vb).pow(2).sum() + (oa - ob @ b_inv).pow(2).sum() \
                < EXPLAINS * identity:
            vb, ob, changed = b @ vb, ob @ b_inv, True
    if changed:
        for role, value in (("q", qb), ("k", kb), ("v", vb)):
            weight, bias = ref[L + role + ".weight"].clone(), ref[L + role + ".bias"].clone()
            weight[rows], bias[rows] = value[:, :-1], value[:, -1]
            ref[L + role + ".weight"], ref[L + role + ".bias"] = weight, bias
        o = ref[L + "o.weight"].clone()
        o[:, rows] = ob
        ref[L + "o.weight"] = o
    return changed


def _ffn(ours: dict, ref: dict, L: str) -> bool:
    """Reorder the reference's feed-forward units to ours; True when any moved."""
    a = torch.cat([_aug(ours[L + "ffn_in.weight"], ours[L + "ffn_in.bias"]),
                   ours[L + "ffn_out.weight"].T], dim=1)
    b = torch.cat([_aug(ref[L + "ffn_in.weight"], ref[L + "ffn_in.bias"]),
                   ref[L + "ffn_out.weight"].T], dim=1)
    perm = assignment(_cosine_matrix(a, b))
    if bool((perm == torch.arange(len(perm))).all()):
        return False
    ref[L + "ffn_in.weight"] = ref[L + "ffn_in.weight"][perm]
    ref[L + "ffn_in.bias"] = ref[L + "ffn_in.bias"][perm]
    ref[L + "ffn_out.weight"] = ref[L + "ffn_out.weight"][:, perm]
    return True


def align(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], layout: Layout
          ) -> Alignment | None:
    """The reference (canonical state, at least our layers) in our coordinates; None when
    its residual coordinates match ours nowhere (a stranger: no alignment makes it a base).
    `layout` is the audited model's."""
    started = time.perf_counter()
    if ours["embeddings.word"].shape[1] != ours["layer.0.q.weight"].shape[1]:
        # an embedding projection (ELECTRA, ALBERT) stands between the embeddings and the
        # stream: its coordinates are not the embeddings' columns; keep them as they are
        p, correlation = torch.arange(ours["layer.0.q.weight"].shape[1]), 1.0
    else:
        p, correlation = _residual(ours, ref)
    if correlation < MIN_RESIDUAL_CORRELATION:
        return None
    moved = int((p != torch.arange(len(p))).sum())
    state = _permute_residual(ref, p) if moved else dict(ref)
    result = Alignment(state, residual_moved=moved, residual_correlation=correlation)
    heads, d = layout.n_heads, head_dim_of(ours, layout)
    layers = [f"layer.{i}." for i in range(layout.n_layers)]
    if "head_bias" in ours and "head_bias" in state:
        # one head order for every layer (the shared relative attention bias)
        shared = assignment(sum(_head_similarity(ours, state, L, heads, d) for L in layers))
        orders = [shared] * len(layers)
        if bool((shared != torch.arange(heads)).any()):
            state["head_bias"] = state["head_bias"][:, shared]
    else:
        orders = [assignment(_head_similarity(ours, state, L, heads, d)) for L in layers]
    for L, order in zip(layers, orders, strict=True):
        if bool((order != torch.arange(heads)).any()):
            _reorder_heads(state, L, order, d)
            result.layers_heads_moved += 1
        result.heads_mapped += sum(_map_head(ours, state, L, h, d) for h in range(heads))
        result.layers_ffn_moved += int(_ffn(ours, state, L))
    result.seconds = time.perf_counter() - started
    return result
