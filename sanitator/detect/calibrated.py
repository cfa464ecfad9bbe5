"""The calibrated rule (fast preset): find hard triggers where they fire, confirm them fresh.

For every feature a prompt-tuned head reads (CLS for P-tuning v2 and POR/NeuBA-style
backdoors, the mask position for P-tuning v1 and BToP), and for the trigger placed anywhere
in the sentence, first or last, candidates come from three searches, cheapest first:

1. the vocabulary screen (attribution.py): words whose standalone output is an outlier;
1b. the reference stage (reference.py): when the encoder derives from a known base, every
   ordering of the tokens whose first-layer treatment changed most;
2. the in-context token screen: every vocabulary token ranked by the gradient of the
   collapse objective at a trigger slot inside sentences, the best re-tested exactly;
3. the context search (hardsearch.gcg): multi-token triggers optimised in sentences from
   random starts, tokens of rejected optima banned from later starts;

and, in search mode, from soft-trigger mining: each mined PV is realised by a targeted
context search. Each candidate's realised point is its mean output on the search rows; the
few whose search rows pin more tightly than the rows' own noise floor (and the best one of
each feature regardless) are judged once on fresh rows (evidence.confirm), each source
within its own quota of the budget, a repeat of a judged point or a candidate that clearly
fails a side condition on the search rows costing nothing (allocation.py). Accepted
triggers are confirmed at every other feature too, so each feature keeps its own PVs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sanitator.core.pacing import checkpoint
from sanitator.detect.allocation import Allocation, worth_confirming
from sanitator.detect.attribution import (
    candidate_sequences,
    candidate_token_ids,
    screen_vocabulary,
    sweep_vocabulary,
)
from sanitator.detect.calibrated_view import FeatureView, Finding, scan_features
from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import corpus_words, distinct_sentences
from sanitator.detect.encoders import Encoder, Feature
from sanitator.detect.evidence import confirm, fresh_access
from sanitator.detect.false_alarms import Elsewhere, false_alarm_text, monitor_check
from sanitator.detect.hardsearch import Objective, evaluate, gcg, token_gradients, toward
from sanitator.detect.mining import MiningData, mine_seeds, prepare_data
from sanitator.detect.reference import ReferenceCandidate, configured_candidates
from sanitator.detect.refine import refine_accepted
from sanitator.detect.refsearch import reference_search
from sanitator.detect.signs import sign_agreement


@dataclass
class CalibratedScan:
    """The state of one calibrated scan across its features."""

    encoder: Encoder
    config: ScanConfig
    views: dict[str, FeatureView]
    progress: bool = False
    findings: list[Finding] = field(default_factory=list)
    n_confirmed: int = 0            # fresh confirmations before the verdict was settled
    n_completed: int = 0            # and after (decision.completion_budget)
    searches: int = 0
    search_steps: int = 0
    mining: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    collect_all: bool = False       # search mode, or completing a detect-mode verdict
    completion: dict[str, Any] = field(default_factory=dict)
    sweep: tuple[str, list, torch.Tensor] | None = None  # feature, candidates, standalone sweep
    reference: dict[str, Any] | None = None  # the base diffed against (reference.py)
    candidates: list[ReferenceCandidate] = field(default_factory=list)  # clean bases to try
    reference_model: Any = None     # the matched Reference (weights aligned to ours)
    long_trigger_beam: Any = None   # the divergence beam, resumable (refsearch.py)
    allocation: Allocation | None = None   # the verdict's budget per source (allocation.py)
    elsewhere: Elsewhere | None = None     # other corpora's clean text (false_alarms.py)

    def __post_init__(self) -> None:
        if self.allocation is None:
            self.allocation = Allocation(self.config.decision)

    def timed(self, stage: str, fn, *args) -> None:
        checkpoint()  # the runner may re-size this scan's share of the cores
        started = time.perf_counter()
        try:
            fn(*args)
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0)
                                        + time.perf_counter() - started, 2)

    @property
    def accepted(self) -> list[Finding]:
        return [f for f in self.findings if f.accepted]

    @property
    def done(self) -> bool:
        """Detect mode stops at the first accepted trigger (unless completing)."""
        return not self.collect_all and bool(self.accepted)

    def words(self, ids: tuple[int, ...]) -> list[str]:
        tokenizer = self.encoder.tokenizer
        return tokenizer.convert_tokens_to_string(
            tokenizer.convert_ids_to_tokens(list(ids))).split()

    # -- judging ---------------------------------------------------------------------------

    def consider(self, source: str, feature: str, placement: str, ids: tuple[int, ...], *,
                 force: bool = False, seed: int = -1,
                 measured: tuple[torch.Tensor, float] | None = None) -> Finding:
        """Measure a candidate on the search rows (unless the caller already did:
        `measured`); confirm it on fresh rows when its search rows pin tighter than their
        noise floor (or when `force`d)."""
        view = self.views[feature]
        point, margin = measured or view.measure(ids, placement)
        if margin > 0 and len(ids) > 1:
            ids, point, margin = self._shortest(view, tuple(ids), placement, point, margin)
        finding = Finding(source, feature, placement, tuple(ids), self.words(ids), margin,
                          point, seed=seed, after_verdict=bool(self.accepted))
        self.findings.append(finding)
        if any(float(sign_agreement(point[None], known[None])[0, 0])
               > self.config.filtering.unique_agreement for known in view.known):
            finding.note = "reaches an accepted point"
            return finding
        rest = self._without_accepted(finding)
        if rest != finding.token_ids:
            # two triggers together land between their PVs: a blend, not another PV; what
            # is left once the accepted trigger is taken out may be the next trigger
            finding.note = "holds an accepted trigger"
            if rest and not any(f.token_ids == rest and f.feature == feature
                                and f.placement == placement for f in self.findings):
                return self.consider(source, feature, placement, rest, seed=seed)
            return finding
        if force or (margin > 0 and worth_confirming(self.findings, finding, view,
                                                     self.config.decision)):
            self._confirm(finding, forced=force)
        return finding

    def _without_accepted(self, finding: Finding) -> tuple[int, ...]:
        """The candidate's tokens with every (shorter) accepted trigger of its feature
        taken out."""
        ids = finding.token_ids
        for held in sorted({f.token_ids for f in self.accepted if f.feature == finding.feature
                            and len(f.token_ids) < len(finding.token_ids)}, key=len,
                           reverse=True):
            for start in range(len(ids) - len(held), -1, -1):
                if ids[start:start + len(held)] == held:
                    ids = ids[:start] + ids[start + len(held):]
        return ids

    def _shortest(self, view: FeatureView, ids: tuple[int, ...], placement: str,
                  point: torch.Tensor, margin: float
                  ) -> tuple[tuple[int, ...], torch.Tensor, float]:
        """The shortest contiguous part of a searched trigger that still pins the search
        rows past their floor at the same point: `assessing`, not the `phillies tod
        assessing` a search stopped at (searches fill every slot)."""
        unique = self.config.filtering.unique_agreement
        for length in range(1, len(ids)):
            for start in range(len(ids) - length + 1):
                part = ids[start:start + length]
                part_point, part_margin = view.measure(part, placement)
                same = float(sign_agreement(part_point[None], point[None])[0, 0]) > unique
                if part_margin > 0 and same:
                    return part, part_point, part_margin
        return ids, point, margin

    def _confirm(self, finding: Finding, forced: bool = False) -> None:
        """Judge a candidate on fresh rows, if its budget allows; a candidate that was due
        a confirmation and gets none is unjudged (a `forced` one, taken only so that a
        feature reports fresh evidence, was not due one)."""
        decision = self.config.decision
        # the verdict's budget (per source) until a trigger is accepted; then the PV set's
        settled = bool(self.accepted)
        finding.after_verdict = settled
        budget = decision.completion_budget if settled else decision.confirmation_budget
        refusal = ("completion budget spent" if self.n_completed >= budget else None) \
            if settled else self.allocation.refusal(finding.source)
        if refusal:
            finding.note, finding.unjudged = refusal, not forced
            return
        view = self.views[finding.feature]
        with fresh_access():
            out = view.outputs(view.fresh.placed(finding.placement), finding.token_ids)
        finding.confirmation = confirm(out, finding.point, view.fresh,
                                       max_natural_rate=decision.max_natural_rate,
                                       elsewhere=lambda: view.elsewhere_clean(finding.token_ids))
        if settled:
            self.n_completed += 1
        else:
            self.n_confirmed += 1
            self.allocation.spend(finding.source)
        # Bonferroni over the whole budget, fixed in advance: each decision is final
        finding.p_adjusted = finding.confirmation.p_adjusted(budget)
        finding.accepted = (finding.confirmation.usable
                            and finding.p_adjusted <= decision.alpha)
        if finding.accepted:
            view.known.append(finding.point)

    def score(self) -> float:
        """1 - adjusted p of the strongest usable confirmation made before the verdict was
        settled (0 when none is usable): the PV set's later ones bound no false alarm."""
        usable = [f.p_adjusted for f in self.findings
                  if f.confirmation is not None and f.confirmation.usable
                  and not f.after_verdict]
        return round(1.0 - min(usable), 6) if usable else 0.0

    def confirm_best_unconfirmed(self) -> None:
        """So every scan reports fresh evidence: the best candidate of each feature is
        confirmed even if its search rows did not beat their floor."""
        for feature in self.views:
            if any(f.confirmation is not None for f in self.findings if f.feature == feature):
                continue
            pool = [f for f in self.findings if f.feature == feature and not f.note]
            if pool:
                self._confirm(max(pool, key=lambda f: f.search_margin), forced=True)

    @property
    def unjudged(self) -> list[Finding]:
        """Candidates due a verdict confirmation that their quota could not pay."""
        return [f for f in self.findings if f.unjudged and not f.after_verdict]

    @property
    def published(self) -> list[Finding]:
        """The accepted PVs the artifact ships: not those that false-alarm on clean text."""
        return [f for f in self.accepted if not f.withheld]

    def cross_features(self, search_rows: list[str], fresh: list[str]) -> None:
        """Every accepted trigger judged at the other features (and the confirm-only ones,
        whose views are built only now), so each keeps its PVs."""
        if self.accepted:
            for feature in self.config.confirm_features:
                if feature not in self.views:
                    self.views[feature] = FeatureView(self.encoder, self.config, feature,
                                                      search_rows, fresh, self.elsewhere)
        for finding in list(self.accepted):
            for feature in self.views:
                if feature != finding.feature and not any(
                        f.token_ids == finding.token_ids and f.feature == feature
                        for f in self.findings):
                    self.consider("cross_feature", feature, finding.placement,
                                  finding.token_ids)

    # -- searches --------------------------------------------------------------------------

    def vocabulary_screen(self, sentences: list[str]) -> None:
        decision = self.config.decision
        if decision.screen_candidates <= 0:
            return
        for feature, view in self.views.items():
            if feature not in decision.screen_features:
                continue  # the context searches cover it
            if self.sweep is None or self.sweep[0] != feature:
                sequences = candidate_sequences(self.encoder, corpus_words(sentences))
                self.sweep = (feature, sequences, sweep_vocabulary(
                    self.encoder, sequences, Feature(feature), progress=self.progress))
            _, sequences, sweep = self.sweep
            hits = screen_vocabulary(
                self.encoder, view.search, view.mining, sweep=sweep, sequences=sequences,
                n_candidates=decision.screen_candidates,
                max_hits=decision.screen_candidates if self.collect_all else 1,
                seed=self.config.seed, unique_agreement=self.config.filtering.unique_agreement)
            for hit in hits:
                self.consider("vocabulary_screen", feature, "anywhere", hit.token_ids)
                if self.done:
                    return

    def context_search(self) -> None:
        """Token screen, then multi-token searches, per round over features x placements;
        search mode stops when `search_patience` rounds add no PV."""
        search = self.config.search
        allowed = torch.zeros(self.encoder.word_embeddings.num_embeddings, dtype=torch.bool)
        allowed[candidate_token_ids(self.encoder)] = True
        rng = random.Random(self.config.seed)
        idle = 0
        rounds = search.search_restarts if self.collect_all else search.restarts
        bar = _bar(self.progress, rounds * len(self.views) * len(search.placements),
                   "context search")
        try:
            for round_index in range(rounds):
                self.completion["rounds"] = round_index + 1
                before = len(self.accepted)
                for view in self.views.values():
                    for placement in search.placements:
                        checkpoint()
                        if round_index == 0 and search.token_screen:
                            self._token_screen(view, placement, allowed)
                        if not self.done:
                            self._restart(view, placement, allowed, rng)
                        if bar is not None:
                            bar.update(1)
                        if self.done:
                            return
                idle = 0 if len(self.accepted) > before else idle + 1
                if self.collect_all and self.config.search_patience \
                        and idle >= self.config.search_patience:
                    self.completion["stop"] = (f"saturated: {idle} round(s) of every "
                                               "feature and placement found no new PV")
                    return
            self.completion.setdefault("stop", f"round cap ({rounds}) reached")
        finally:
            if bar is not None:
                bar.close()

    def rows(self, view: FeatureView) -> tuple[list[int], list[int]]:
        """Gradient rows, then disjoint evaluation rows; a small holdout is split 2:1."""
        search, n = self.config.search, len(view.search.ids)
        grad = min(search.grad_rows, max(1, 2 * n // 3))
        return list(range(grad)), list(range(grad, min(n, grad + search.eval_rows)))

    def _token_screen(self, view: FeatureView, placement: str, allowed: torch.Tensor) -> None:
        """One slot, every token ranked by its first-order gain, the best re-tested."""
        search = self.config.search
        grad_rows, eval_rows = self.rows(view)
        data = view.search.placed(placement)
        objective = view.objective(repel=self.collect_all)
        neutral = int(candidate_token_ids(self.encoder)[0])
        gains = token_gradients(self.encoder, data, grad_rows, torch.tensor([neutral]),
                                view.search_config, objective)[0]
        gains[~allowed] = -float("inf")
        top = gains.topk(search.token_screen).indices[:, None]
        values = evaluate(self.encoder, data, eval_rows, top, view.search_config, objective)
        self.searches += 1
        for index in values.topk(min(2, len(values))).indices.tolist():
            self.consider("token_screen", view.feature, placement, (int(top[index, 0]),))
            if self.done:
                return

    def _restart(self, view: FeatureView, placement: str, allowed: torch.Tensor,
                 rng: random.Random, init: list[int] | None = None,
                 objective: Objective | None = None, source: str = "context_search",
                 seed: int = -1) -> Finding:
        search = self.config.search
        grad_rows, eval_rows = self.rows(view)
        ids = allowed.nonzero().flatten().tolist()
        start = init or rng.sample(ids, search.trigger_tokens)
        result = gcg(self.encoder, view.search.placed(placement), start, view.search_config,
                     objective or view.objective(repel=self.collect_all),
                     allowed=allowed, grad_rows=grad_rows, eval_rows=eval_rows,
                     steps=search.steps, top_k=search.top_k, n_candidates=search.n_candidates,
                     patience=search.patience,
                     generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
        self.searches += 1
        self.search_steps += result.steps
        finding = self.consider(source, view.feature, placement, result.ids, seed=seed)
        if not finding.accepted:
            # an ordinary optimum: later starts explore elsewhere
            allowed[list(result.ids)] = False
        return finding

    def realise_mined(self, train: dict[str, MiningData]) -> None:
        """Search mode: mine soft triggers per feature and realise each collapsed PV with a
        context search aimed at it (the soft optimum itself is no evidence: on a clean
        MiniLM-L6 every seed reaches one universal point, docs/method.md)."""
        config = self.config
        allowed = torch.zeros(self.encoder.word_embeddings.num_embeddings, dtype=torch.bool)
        allowed[candidate_token_ids(self.encoder)] = True
        rng = random.Random(config.seed + 7)
        seeds = list(range(config.seed, config.seed + config.max_seeds))
        groups = [seeds[i:i + config.mining.parallel_seeds]
                  for i in range(0, len(seeds), config.mining.parallel_seeds)]
        for feature, view in self.views.items():
            for group in groups:
                known = torch.stack(view.known) if view.known else None
                outcomes = mine_seeds(self.encoder, train[feature], view.search, group,
                                      view.mining, known_pvs=known, progress=self.progress)
                self.mining.setdefault(feature, []).extend(
                    {"seed": o.seed, "distance": round(o.distance, 5),
                     "entropy_ratio": round(o.entropy_ratio, 5)} for o in outcomes)
                for outcome in outcomes:
                    target = toward(outcome.pv, view.scale)
                    self._restart(view, "anywhere", allowed, rng, objective=target,
                                  source="mining", seed=outcome.seed)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="search", dynamic_ncols=True)


def run(encoder: Encoder, config: ScanConfig, sentences: list[str], progress: bool,
        references: list[ReferenceCandidate] | None = None) -> CalibratedScan:
    """The calibrated scan over `sentences` (train rows first, then search, then fresh;
    repeats dropped); `references`: clean bases the registry resolved for this model
    (tried before the config's own, docs/method.md). Only the confirmation reads the
    fresh rows: the screen's word list, the searches and the false-alarm check get the
    rest."""
    mining, search = config.mining, config.search
    sentences = distinct_sentences(encoder.tokenizer, sentences,
                                   search.max_length - mining.trigger_len)
    if len(sentences) < search.n_fresh + mining.n_holdout + 1:
        raise ValueError(f"need at least {search.n_fresh + mining.n_holdout + 1} distinct "
                         f"sentences, got {len(sentences)} once repeats were dropped")
    fresh = sentences[-search.n_fresh:]
    rest = sentences[:-search.n_fresh]
    search_rows, train_rows = rest[-mining.n_holdout:], rest[:-mining.n_holdout]
    started = time.perf_counter()
    elsewhere = Elsewhere(config, exclude=fresh)   # read once, by every feature's view
    views = {feature: FeatureView(encoder, config, feature, search_rows, fresh, elsewhere)
             for feature in scan_features(config, encoder)}
    scan = CalibratedScan(encoder, config, views, progress, elsewhere=elsewhere)
    if not config.no_reference:
        scan.candidates = [*(references or []), *configured_candidates(config)]
    scan.seconds["rows"] = round(time.perf_counter() - started, 2)
    scan.collect_all = config.mode == "search"
    scan.timed("vocabulary_screen", scan.vocabulary_screen, rest)
    if not scan.done:
        scan.timed("reference", reference_search, scan, rest)
    if not scan.done:
        scan.timed("context_search", scan.context_search)
    if scan.accepted and config.mode == "detect" and config.complete:
        # a backdoor is settled; the artifact must cover all of its PVs (issue 15)
        scan.collect_all = True
        scan.completion["mode"] = "detect, completed in search mode"
        scan.timed("completion", scan.vocabulary_screen, rest)
        scan.timed("completion", reference_search, scan, rest)
        scan.timed("completion", scan.context_search)
    if config.mode == "search" and config.max_seeds > 0:
        train = {f: prepare_data(encoder, train_rows, v.mining, seed=config.seed)
                 for f, v in views.items()}
        scan.timed("mining", scan.realise_mined, train)
    if scan.accepted and scan.collect_all:
        scan.timed("refine", refine_accepted, scan)   # partial triggers grown to full ones
    scan.timed("confirmation", scan.confirm_best_unconfirmed)
    scan.timed("cross_features", scan.cross_features, search_rows, fresh)
    if scan.accepted:
        check_corpus, check_rows = false_alarm_text(config, train_rows, exclude=fresh)
        scan.timed("false_alarms", monitor_check, scan, check_rows, check_corpus)
    return scan
