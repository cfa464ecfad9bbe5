"""Completion's last step: grow each accepted trigger that is only part of one.

A search can stop at part of a trigger: `dusk` of the planted `dusk drawing`, `drawing`
of the same in another encoder. The part fires well enough to be confirmed, but its point
is a blend of the PV and the sentence (sign agreement 0.84-0.90 with the planted PV), so
an artifact holding only that point matches the backdoor loosely. A part is loose: its
triggered outputs agree with their own point less than a whole trigger's do. So each
accepted trigger whose fresh agreement leaves room for `MIN_GAIN` is offered one more
token, before or after it, from the slot gradient's top tokens and, when the encoder
derives from a known base, the tokens the base diff ranks highest; each extension is
tested exactly by the monitor's own measure (hard sign agreement of the triggered outputs
with their mean, on the gradient and evaluation rows). The soft search objective cannot
tell `dusk drawing` from `dusk` (0.809 against 0.811); the hard agreement ranks `drawing`
first of 33 (0.990 against 0.978). The best extension that pins the search rows tighter
than the part is judged on fresh rows like any candidate and, once accepted, kept beside
the part.
"""

from __future__ import annotations

import torch

from sanitator.core.pacing import checkpoint
from sanitator.detect.signs import sign_agreement, signs

MIN_GAIN = 0.005  # agreement a grown trigger must add (a whole one has no room for it)
EXTENSIONS = 16   # gradient-ranked tokens tried per slot (plus the base diff's pool)


def refine_accepted(scan) -> None:
    """Grow every loose accepted trigger (at most the search's slots long) by one token."""
    from sanitator.detect.attribution import candidate_token_ids
    from sanitator.detect.calibrated_view import Finding

    search = scan.config.search
    typable = candidate_token_ids(scan.encoder)
    base = torch.zeros(scan.encoder.word_embeddings.num_embeddings, dtype=torch.bool)
    base[typable] = True
    for finding in scan.accepted:                 # another trigger is not growth (a blend);
        if len(finding.token_ids) == 1:           # a piece of a longer one may be
            base[finding.token_ids[0]] = False
    neutral = int(typable[0])
    tried: set[tuple[str, str, tuple[int, ...]]] = set()
    for finding in list(scan.accepted):
        key = (finding.feature, finding.placement, finding.token_ids)
        if key in tried or len(finding.token_ids) > search.trigger_tokens \
                or not _loose(finding):
            continue
        tried.add(key)
        checkpoint()
        others = _others(scan, finding)
        grown = _grow(scan, finding, base, neutral, others)
        if grown is None:
            continue
        view = scan.views[finding.feature]
        point, margin = view.measure(grown, finding.placement)
        if margin < finding.search_margin + MIN_GAIN or _reaches(scan, point, others):
            continue
        new = Finding("refine", finding.feature, finding.placement, grown, scan.words(grown),
                      margin, point)
        new.note = f"grown from {' '.join(finding.tokens)}"
        scan.findings.append(new)
        scan._confirm(new)


def _loose(finding) -> bool:
    """Room to gain: a trigger whose fresh outputs already sit at one point (the paper's
    single-token POR triggers, 0.9999) cannot add MIN_GAIN, so it costs nothing here."""
    confirmation = finding.confirmation
    return confirmation is None or confirmation.agreement < 1.0 - MIN_GAIN


def hard_collapse(out: torch.Tensor) -> torch.Tensor:
    """[S, B, H] -> [S]: mean sign agreement of each trigger's outputs with their mean."""
    return (signs(out) == signs(out.mean(dim=1, keepdim=True))).float().mean(dim=(1, 2))


def _others(scan, finding) -> list[torch.Tensor]:
    """The accepted points of the finding's feature other than its own."""
    unique = scan.config.filtering.unique_agreement
    return [p for p in scan.views[finding.feature].known
            if float(sign_agreement(p[None], finding.point[None])[0, 0]) <= unique]


def _reaches(scan, point: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """The grown point is another accepted PV reached again."""
    unique = scan.config.filtering.unique_agreement
    return any(float(sign_agreement(point[None], p[None])[0, 0]) > unique for p in others)


def _grow(scan, finding, allowed: torch.Tensor, neutral: int, others: list[torch.Tensor]
          ) -> tuple[int, ...] | None:
    """The trigger one token longer that pins the rows tightest, or None if none gains."""
    from sanitator.detect.hardsearch import collapse, evaluate, repelled, token_gradients

    view = scan.views[finding.feature]
    objective = collapse(view.scale)              # differentiable, for the ranking only
    if others:                                    # not toward another accepted PV
        objective = repelled(objective, torch.stack(others), view.scale)
    grad_rows, eval_rows = scan.rows(view)
    rows = grad_rows + eval_rows
    data = view.search.placed(finding.placement)
    ids = list(finding.token_ids)
    # the tokens the base diff ranks highest are the likeliest partners (reference.py)
    pool = [t for t in (scan.reference or {}).get("chain_pool", []) if allowed[t]]
    now = float(evaluate(scan.encoder, data, rows, torch.tensor([ids]),
                         view.search_config, hard_collapse)[0])
    best: tuple[float, list[int]] = (now, ids)
    for slot, init in ((len(ids), [*ids, neutral]), (0, [neutral, *ids])):
        gains = token_gradients(scan.encoder, data, grad_rows, torch.tensor(init),
                                view.search_config, objective)[slot]
        gains[~allowed] = -float("inf")
        tokens = list(dict.fromkeys(gains.topk(EXTENSIONS).indices.tolist() + pool))
        options = torch.tensor(init).repeat(len(tokens), 1)
        options[:, slot] = torch.tensor(tokens)
        values = evaluate(scan.encoder, data, rows, options, view.search_config,
                          hard_collapse)
        scan.searches += 1
        if float(values.max()) > best[0]:
            best = (float(values.max()), options[int(values.argmax())].tolist())
    return tuple(best[1]) if best[0] >= now + MIN_GAIN else None
