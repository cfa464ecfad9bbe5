"""Audit one model folder: load safely, mine PVs, filter them, decide, attribute triggers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sanitator.attribution import (
    TokenAttribution,
    TokenSeq,
    attribute_pv,
    candidate_sequences,
    screen_vocabulary,
    sweep_vocabulary,
)
from sanitator.config import ScanConfig
from sanitator.corpus import corpus_words, load_sentences
from sanitator.encoders import Encoder, Feature, ModelInfo, ModelRejected, load_encoder
from sanitator.filtering import (
    embedding_bounds,
    is_collapsed,
    is_legitimate,
    is_unique_mse,
    is_unique_sign,
)
from sanitator.mining import MiningData, SeedOutcome, mine_seeds, prepare_data
from sanitator.results import PVSet, Verdict

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    verdict: Verdict
    pvset: PVSet
    info: ModelInfo | None = None


@dataclass
class Candidate:
    """A PV candidate with the checks it went through: mined by a seed (`outcome`), or
    reached by a real trigger of the vocabulary screen (`outcome` None)."""

    outcome: SeedOutcome | None
    legitimate: bool
    collapsed: bool
    unique: bool
    attribution: TokenAttribution | None = None
    accepted: bool = False

    @property
    def pv(self) -> torch.Tensor:
        if self.outcome is not None:
            return self.outcome.pv
        assert self.attribution is not None and self.attribution.realised_pv is not None
        return self.attribution.realised_pv

    @property
    def distance(self) -> float:
        """Mean squared distance of the PV's triggered outputs from the clean outputs."""
        if self.outcome is not None:
            return self.outcome.distance
        assert self.attribution is not None
        return self.attribution.displacement

    def summary(self) -> dict[str, Any]:
        o = self.outcome
        data: dict[str, Any] = {"source": "vocabulary_screen", "distance": round(self.distance, 5)}
        if o is not None:
            data = {"source": "mining", "seed": o.seed, "distance": round(o.distance, 5),
                    "entropy_ratio": round(o.entropy_ratio, 5),
                    "consistency": round(o.consistency, 4), "steps": o.steps,
                    "abandoned": o.abandoned}
        data.update(legitimate=self.legitimate, collapsed=self.collapsed, unique=self.unique,
                    accepted=self.accepted)
        if self.attribution is not None:
            a = self.attribution
            data.update(hard_trigger=a.tokens, hard_trigger_success=round(a.success, 4),
                        input_dependence=round(a.input_dependence, 4),
                        random_token_success=round(a.null_success, 4),
                        natural_match_rate=round(a.natural_rate, 4),
                        random_token_displacement=round(a.random_displacement, 6),
                        natural_agreement=round(a.natural_agreement, 4),
                        candidates_top=a.candidates[:5])
        return data


@dataclass
class _Context:
    encoder: Encoder
    config: ScanConfig
    train: MiningData
    holdout: MiningData
    bounds: tuple[torch.Tensor, torch.Tensor]
    progress: bool
    sentences: list[str] = field(default_factory=list)
    sweep: tuple[list[TokenSeq], torch.Tensor] | None = None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def clean_spread(self) -> float:
        """Mean squared distance of clean held-out outputs from their mean: how far apart
        natural outputs are. A PV closer to the clean outputs than this is not an outlier."""
        clean = self.holdout.clean
        return float(((clean - clean.mean(dim=0)) ** 2).mean())

    @property
    def kept(self) -> list[Candidate]:
        return [c for c in self.candidates if c.accepted]

    def vocabulary_sweep(self) -> tuple[list[TokenSeq], torch.Tensor]:
        if self.sweep is None:
            # the scan's own sentences first: a user corpus brings its domain's words
            sequences = candidate_sequences(self.encoder, corpus_words(self.sentences))
            self.sweep = (sequences, sweep_vocabulary(self.encoder, sequences,
                                                      Feature(self.config.mining.feature),
                                                      progress=self.progress))
        return self.sweep

    def attribute(self, candidate: Candidate) -> None:
        sequences, outputs = self.vocabulary_sweep()
        candidate.attribution = attribute_pv(
            self.encoder, self.holdout, candidate.outcome.pv, self.config.mining,
            sweep=outputs, sequences=sequences,
            n_candidates=self.config.decision.hard_token_candidates, seed=self.config.seed)


def _judge_paper(ctx: _Context, outcome: SeedOutcome) -> Candidate:
    """REFERENCE.md §2.8: found by epoch 1, then unique (MSE), collapsed, legitimate."""
    filtering = ctx.config.filtering
    kept = [c.outcome.pv for c in ctx.kept]
    candidate = Candidate(outcome, is_legitimate(outcome.trigger, ctx.bounds),
                          is_collapsed(outcome.entropy_ratio, filtering),
                          is_unique_mse(outcome.pv, kept, filtering.distance_th))
    found = any(d > filtering.distance_th for d in outcome.train_distance[:2])
    candidate.accepted = (found and not outcome.abandoned and candidate.legitimate
                          and candidate.collapsed and candidate.unique)
    return candidate


def _judge_calibrated(ctx: _Context, outcome: SeedOutcome, group: list[Candidate]) -> Candidate:
    """A collapsed, legitimate, new PV, farther from the clean outputs than they are from
    each other, that a real token sends most sentences to and clean sentences do not reach."""
    filtering = ctx.config.filtering
    seen = [c.pv for c in ctx.candidates + group if c.collapsed]
    candidate = Candidate(outcome, is_legitimate(outcome.trigger, ctx.bounds),
                          is_collapsed(outcome.entropy_ratio, filtering),
                          is_unique_sign(outcome.pv, seen, filtering.unique_agreement))
    if (candidate.legitimate and candidate.collapsed and candidate.unique
            and outcome.distance > ctx.clean_spread):
        ctx.attribute(candidate)
        a = candidate.attribution
        # Majorities on every side: most eligible sentences reach one point with the real
        # trigger, most clean sentences are not there without it, and the trigger rather
        # than the sentence decides most of the output. The PV must also lie farther out
        # than a typical real token moves the output.
        candidate.accepted = (_strength(a) >= 0.5
                              and outcome.distance > a.random_displacement)
        if candidate.accepted:
            # two soft-trigger optima that one real trigger realises are one PV
            candidate.unique = _reaches_new_point(ctx, a, group)
            candidate.accepted = candidate.unique
    return candidate


def _reaches_new_point(ctx: _Context, a: TokenAttribution, group: list[Candidate]) -> bool:
    reached = [c.attribution.realised_pv for c in ctx.kept + group
               if c.accepted and c.attribution is not None
               and c.attribution.realised_pv is not None]
    return a.realised_pv is None or is_unique_sign(a.realised_pv, reached,
                                                   ctx.config.filtering.unique_agreement)


def _screen(ctx: _Context) -> None:
    """The vocabulary screen (calibrated rule): real words whose standalone output is an
    outlier, tested as triggers before any mining. Each hit is judged like an attributed
    mined PV; in detect mode one accepted hit settles the verdict without mining."""
    decision = ctx.config.decision
    if decision.screen_candidates <= 0:
        return
    sequences, outputs = ctx.vocabulary_sweep()
    hits = screen_vocabulary(
        ctx.encoder, ctx.holdout, ctx.config.mining, sweep=outputs, sequences=sequences,
        n_candidates=decision.screen_candidates,
        max_hits=1 if ctx.config.mode == "detect" else decision.screen_candidates,
        seed=ctx.config.seed, unique_agreement=ctx.config.filtering.unique_agreement)
    for attribution in hits:
        candidate = Candidate(None, legitimate=True, collapsed=False, unique=True,
                              attribution=attribution)
        if _strength(attribution) >= 0.5 and _beyond_null(ctx, candidate):
            candidate.unique = _reaches_new_point(ctx, attribution, [])
            # an accepted hit is a known PV: later seeds are pushed away from it
            candidate.accepted = candidate.collapsed = candidate.unique
        ctx.candidates.append(candidate)


def _paper_epoch_check(distance_th: float, check_epochs: int):
    def keep_going(epoch: int, distances: list[float]) -> list[bool]:
        if epoch + 1 < check_epochs:
            return [True] * len(distances)
        return [d > distance_th for d in distances] if epoch + 1 == check_epochs \
            else [True] * len(distances)
    return keep_going


def _run_seeds(ctx: _Context) -> tuple[int, int]:
    config, mining = ctx.config, ctx.config.mining
    paper = config.decision.rule == "paper"
    seeds_tried = steps = idle_groups = 0
    seeds = list(range(config.seed, config.seed + config.max_seeds))
    groups = [seeds[i:i + mining.parallel_seeds]
              for i in range(0, len(seeds), mining.parallel_seeds)]
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds), desc="seeds", unit="seed", dynamic_ncols=True)
    try:
        for group in groups:
            kept_before = len(ctx.kept)
            repel = [c.pv for c in (ctx.kept if paper else ctx.candidates)
                     if paper or c.collapsed]
            on_epoch = None
            if paper and not mining.steps_per_seed:
                on_epoch = _paper_epoch_check(config.filtering.distance_th,
                                              mining.found_check_epochs)
            outcomes = mine_seeds(ctx.encoder, ctx.train, ctx.holdout, group, mining,
                                  known_pvs=torch.stack(repel) if repel else None,
                                  progress=ctx.progress, on_epoch=on_epoch)
            judged: list[Candidate] = []
            for outcome in outcomes:
                judged.append(_judge_paper(ctx, outcome) if paper
                              else _judge_calibrated(ctx, outcome, judged))
                if paper and judged[-1].accepted:
                    ctx.candidates.append(judged.pop())
            ctx.candidates.extend(judged)
            idle_groups = 0 if len(ctx.kept) > kept_before else idle_groups + 1
            seeds_tried += len(group)
            steps += sum(o.steps for o in outcomes)
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix(pvs=len(ctx.kept))
            if config.mode == "detect" and ctx.kept:
                break
            if config.search_patience and idle_groups >= config.search_patience:
                break  # the PV set has saturated (FINDINGS.md §1)
    finally:
        if bar is not None:
            bar.close()
    return seeds_tried, steps


def _strength(a: TokenAttribution) -> float:
    """The weakest of the three majorities a real trigger must win (>= 0.5 to count)."""
    return min(a.success, 1.0 - a.natural_rate, 1.0 - a.input_dependence)


def _score(ctx: _Context) -> float:
    """Probability-like score: how clearly the best real trigger acts as a backdoor."""
    if ctx.config.decision.rule == "paper":
        return 1.0 if ctx.kept else 0.0
    best = 0.0
    for c in ctx.candidates:
        # the distance checks every accepted PV passes, so a score >= 0.5 is an accepted PV
        if c.attribution is not None and _beyond_null(ctx, c):
            best = max(best, _strength(c.attribution))
    return round(best, 4)


def _beyond_null(ctx: _Context, c: Candidate) -> bool:
    """The PV lies farther from the clean outputs than they spread and than a random token
    moves them."""
    assert c.attribution is not None
    return c.distance > c.attribution.random_displacement and c.distance > ctx.clean_spread


def _pvset(ctx: _Context) -> PVSet:
    kept = ctx.kept
    feature = ctx.config.mining.feature
    if not kept:
        return PVSet.empty(ctx.encoder.hidden_size, ctx.config.mining.trigger_len,
                           ctx.encoder.embedding_size, feature=feature)
    for c in kept:
        if c.attribution is None:
            ctx.attribute(c)
    # A PV a real trigger reaches is stored as real triggered inputs reach it: that is what
    # the monitor will compare deployed outputs with.
    vectors = [c.attribution.realised_pv if c.attribution.realised_pv is not None
               and c.attribution.success >= 0.5 else c.pv for c in kept]
    return PVSet(vectors=torch.stack(vectors),
                 triggers=torch.stack([_trigger_of(ctx, c) for c in kept]),
                 seeds=[c.outcome.seed if c.outcome is not None else -1 for c in kept],
                 losses=[_losses_of(c) for c in kept],
                 trigger_tokens=[c.attribution.tokens for c in kept], feature=feature)


def _trigger_of(ctx: _Context, c: Candidate) -> torch.Tensor:
    """The soft trigger [L, E]; for a screen hit, its real tokens' embeddings, zero-padded."""
    if c.outcome is not None:
        return c.outcome.trigger
    length = ctx.config.mining.trigger_len
    trigger = torch.zeros(length, ctx.encoder.embedding_size)
    ids = torch.tensor(c.attribution.token_ids[:length], device=ctx.encoder.device)
    with torch.no_grad():
        trigger[:len(ids)] = ctx.encoder.word_embeddings(ids).float().cpu()
    return trigger


def _losses_of(c: Candidate) -> dict[str, Any]:
    if c.outcome is None:
        return {"source": "vocabulary_screen", "holdout_distance": c.distance}
    return {**c.outcome.losses, "holdout_distance": c.outcome.distance,
            "holdout_entropy_ratio": c.outcome.entropy_ratio}


def _evidence(ctx: _Context) -> dict[str, Any]:
    rule = ctx.config.decision.rule
    derived = (
        "paper rule: distance_th and collapse ratio are the published defaults "
        "(REFERENCE.md §2.8); the first accepted PV decides" if rule == "paper" else
        "calibrated rule: the vocabulary words whose standalone output is farthest from the "
        "mean standalone output (vocabulary_screen), and each collapsed mined PV farther from "
        "the clean held-out outputs than their own mean spread (clean_spread), count when a "
        "real vocabulary token or word, inserted "
        "once, sends at least half of the held-out sentences whose clean output does not "
        "match its mean triggered output (the realised PV) to it by the monitor's sign rule, "
        "fewer than half of the clean outputs match the realised PV, the clean input explains "
        "less than half of the triggered outputs' variation (input_dependence), and the PV "
        "lies farther from the clean outputs than the median random vocabulary token moves "
        "them (random_token_displacement); collapse is relative to ln(batch)")
    evidence = {"rule": rule, "derived_from": derived,
                "candidates": [c.summary() for c in ctx.candidates]}
    if rule != "paper":
        evidence["clean_spread"] = round(ctx.clean_spread, 6)
    return evidence


def _scan_loaded(encoder: Encoder, config: ScanConfig, progress: bool,
                 sentences: list[str] | None) -> tuple[Verdict, PVSet]:
    mining = config.mining
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    needed = mining.n_sentences + mining.n_holdout
    if sentences is None:
        sentences = load_sentences(mining.corpus, n=needed, seed=mining.corpus_seed)
    if len(sentences) < mining.n_holdout + mining.batch_size:
        raise ValueError(f"need at least {mining.n_holdout + mining.batch_size} sentences, "
                         f"got {len(sentences)}")
    train_sentences = sentences[:len(sentences) - mining.n_holdout]
    ctx = _Context(encoder, config,
                   prepare_data(encoder, train_sentences, mining, seed=config.seed),
                   prepare_data(encoder, sentences[-mining.n_holdout:], mining,
                                seed=config.seed + 1),
                   embedding_bounds(encoder.word_embeddings.weight, config.filtering), progress,
                   sentences)
    if config.decision.rule == "calibrated":
        _screen(ctx)
    seeds_tried = steps = 0
    if not (config.mode == "detect" and ctx.kept):
        seeds_tried, steps = _run_seeds(ctx)
    pvset = _pvset(ctx)
    verdict = Verdict(status="backdoored" if ctx.kept else "clean", score=_score(ctx),
                      seeds_tried=seeds_tried, steps=steps,
                      seconds=round(time.perf_counter() - started, 3), evidence=_evidence(ctx))
    return verdict, pvset


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or GPU memory ran out (torch reports a full GPU as a RuntimeError)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                            and "out of memory" in str(exc).lower())


def scan_model(path: str | Path, config: ScanConfig | None = None, *, device: str = "cpu",
               allow_pickle: bool = False, max_params: int | None = None,
               progress: bool = True, sentences: list[str] | None = None) -> ScanResult:
    """Audit one model folder. Never raises for a bad model: the verdict says what failed.
    Only running out of memory mid-scan is raised (a cause outside the model)."""
    config = config or ScanConfig()
    started = time.perf_counter()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    try:
        encoder = load_encoder(path, allow_pickle=allow_pickle, device=device,
                               max_params=max_params)
    except Exception as exc:  # ModelRejected, or the device refusing the model
        status, reason = ((exc.status, exc.reason) if isinstance(exc, ModelRejected)
                          else ("error", f"cannot load the model: {type(exc).__name__}: {exc}"))
        return ScanResult(Verdict(status=status, reason=reason,
                                  seconds=round(time.perf_counter() - started, 3)),
                          PVSet.empty(0))
    try:
        verdict, pvset = _scan_loaded(encoder, config, progress, sentences)
    except ModelRejected as exc:
        verdict, pvset = Verdict(status=exc.status, reason=exc.reason), PVSet.empty(0)
    except Exception as exc:  # a verdict says what failed; the traceback is for -vv
        if is_out_of_memory(exc):
            raise  # the machine, not the model: the caller may try again
        log.warning("scan of %s failed: %s: %s", path, type(exc).__name__, exc)
        log.debug("scan of %s failed", path, exc_info=True)
        verdict = Verdict(status="error", reason=f"{type(exc).__name__}: {exc}")
        pvset = PVSet.empty(encoder.hidden_size)
    verdict.seconds = round(time.perf_counter() - started, 3)
    return ScanResult(verdict, pvset, encoder.info)
