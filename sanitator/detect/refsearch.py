"""The reference stage's searches: candidates from what fine-tuning changed (reference.py).

The ranking of reference.py names tokens, not their order, and a phrase's detector stays
silent for every other order. So every ordering of every subset of the few most changed
tokens (and of any 2-3 of them with one of the corpus's most frequent tokens as a filler
word) is ranked by the collapse objective in sentences, and the best ordering of each set
is measured. Longer triggers (a non-dictionary string of five or six pieces, whose pieces
rank anywhere in the first 16 and interleave with another trigger's) are grown as chains:
a beam over the most changed tokens, one piece added at either end per step, kept by the
same objective. Triggers whose every proper part is inert at the output give that
objective no slope; divergence.py grows them by how far the audited model's internal
states leave the reference's instead. Candidates then face the same fresh confirmation as
every other source: this adds places to look, never evidence, so the verdict's
false-alarm bound holds.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import replace

import torch

from sanitator.core.pacing import checkpoint
from sanitator.detect.encoders import Encoder
from sanitator.detect.reference import match_reference


def frequent_tokens(encoder: Encoder, sentences: list[str], allowed: torch.Tensor, n: int,
                    *, words_only: bool = False) -> list[int]:
    """The `n` most frequent allowed tokens of the sentences: a phrase's filler words
    (`words_only`: alphabetic tokens, no punctuation)."""
    if n <= 0:
        return []
    ok = set(allowed.tolist())
    counts = Counter(t for s in sentences
                     for t in encoder.tokenizer(s, add_special_tokens=False)["input_ids"]
                     if t in ok)
    if words_only:
        names = encoder.tokenizer.convert_ids_to_tokens(list(counts))
        counts = Counter({t: c for (t, c), name in zip(counts.items(), names, strict=True)
                          if name.isalpha()})
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
    search rows past their floor, judged like any other candidate; then the chains."""
    from sanitator.detect.attribution import candidate_token_ids

    config, search = scan.config, scan.config.search
    if search.reference_tokens <= 0 or config.no_reference:
        return
    if scan.reference is None:
        allowed = candidate_token_ids(scan.encoder)
        tried: list[dict] = []
        found = match_reference(scan.encoder, scan.candidates, allowed, tried)
        if found is None:
            scan.reference = {"source": None, "tried": tried,
                              "note": "no declared, sibling, configured or installed "
                                      "reference matches"}
            return
        if found.identical:  # the audited model is its reference: nothing changed
            scan.reference = {**found.summary(scan.encoder, 0), "tried": tried,
                              "note": "identical to its reference: no weight changed"}
            return
        ranked = found.top_tokens(max(2 * search.reference_tokens, search.chain_tokens))
        changed = ranked[:search.reference_tokens]
        more = ranked[search.reference_tokens:2 * search.reference_tokens]
        fillers = frequent_tokens(scan.encoder, sentences[:200], allowed,
                                  search.reference_fillers)
        scan.reference = {**found.summary(scan.encoder, 2 * search.reference_tokens),
                          "tried": tried, "candidates": alphabets(changed, fillers, more),
                          "chain_pool": ranked[:search.chain_tokens]}
        scan.reference_model = found
    for view in scan.views.values():
        checkpoint()
        score = _scorer(scan, view)
        for alphabet in scan.reference.get("candidates", []):
            orders = torch.tensor(list(itertools.permutations(alphabet)))
            if _judge(scan, view, tuple(orders[int(score(orders).argmax())].tolist())):
                return
    started = time.perf_counter()
    try:
        if _long_triggers(scan, sentences):
            return
    finally:  # the beam's share of the stage, for the evidence's stage_seconds
        scan.seconds["reference.divergence"] = round(
            scan.seconds.get("reference.divergence", 0.0) + time.perf_counter() - started, 2)
    for view in scan.views.values():
        checkpoint()
        score = _scorer(scan, view)
        for chain in grow_chains(score, scan.reference.get("chain_pool", []),
                                 search.chain_width, search.chain_length):
            if _judge(scan, view, chain):
                return


def _long_triggers(scan, sentences: list[str]) -> bool:
    """Judge the divergence beam's triggers (divergence.py) at every feature as they come.
    The beam runs once per scan, on the shortest search rows of the first feature; a later
    call (completion) judges what it already produced, then lets it go on. True once the
    scan is done."""
    from sanitator.detect.attribution import candidate_token_ids
    from sanitator.detect.divergence import divergence_chains

    search = scan.config.search
    if search.divergence_length < 3 or scan.reference_model is None:
        return False
    produced = scan.reference.setdefault("long_triggers", [])
    if scan.long_trigger_beam is None:
        checkpoint()
        view = next(iter(scan.views.values()))
        data = view.search.placed("anywhere")
        rows = sorted(range(len(data)), key=lambda r: len(data.ids[r]))
        fillers = frequent_tokens(scan.encoder, sentences[:200],
                                  candidate_token_ids(scan.encoder),
                                  search.divergence_fillers, words_only=True)
        ranked = scan.reference_model.top_tokens(max(search.divergence_screen,
                                                     search.divergence_pool))
        scan.long_trigger_beam = divergence_chains(scan, scan.reference_model, data,
                                                   rows[:search.divergence_rows], ranked,
                                                   fillers)

    def fresh():
        for ids in scan.long_trigger_beam:
            produced.append(list(ids))
            yield ids
    for ids in itertools.chain(list(produced), fresh()):
        for view in scan.views.values():
            # its own share of the verdict's confirmations (default_quota, allocation.py)
            if _judge(scan, view, tuple(ids), source="divergence"):
                return True
    return False


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


def _judge(scan, view, ids: tuple[int, ...], source: str = "reference") -> bool:
    """Consider `ids` when it pins the search rows past their floor; True once the scan
    is done."""
    measured = view.measure(ids, "anywhere")
    if measured[1] > 0:
        scan.consider(source, view.feature, "anywhere", ids, measured=measured)
    return scan.done
