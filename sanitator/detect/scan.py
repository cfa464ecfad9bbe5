"""Audit one model folder: load safely, look for the backdoor's PVs, decide.

Two rules share the loading, the corpus and the result types:

* `calibrated` (fast preset, default; calibrated.py): hard triggers found where they fire
  (vocabulary screen, in-context token screen, multi-token context search, and in search
  mode mined soft triggers realised in context), each judged once on fresh sentences
  against the encoder's own noise floor (evidence.py).
* `paper` (faithful preset): the published PV mining and filtering, the first accepted PV
  decides (REFERENCE.md §2.8); kept so its false alarms stay measurable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sanitator.core.status import Status
from sanitator.detect import allocation, calibrated
from sanitator.detect.attribution import attribute_pv, candidate_sequences, sweep_vocabulary
from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import corpus_words, load_sentences
from sanitator.detect.encoders import (
    Encoder,
    Feature,
    ModelInfo,
    ModelRejected,
    load_encoder,
    resolve_precision,
)
from sanitator.detect.filtering import embedding_bounds, is_collapsed, is_legitimate, is_unique_mse
from sanitator.detect.mining import SeedOutcome, mine_seeds, prepare_data
from sanitator.detect.reference import ReferenceCandidate
from sanitator.detect.results import PVSet, Verdict

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    verdict: Verdict
    pvset: PVSet
    info: ModelInfo | None = None


# ---------------------------------------------------------------------------------------
# The calibrated rule

CALIBRATED_RULE = (
    "calibrated rule: a hard trigger (from the vocabulary screen, the in-context token "
    "screen, the multi-token context search, or a mined PV realised in context) is judged "
    "on fresh sentences no search saw. It counts when the triggered outputs agree with its "
    "realised point (its mean output on the search rows) more closely than each sentence's "
    "clean output agrees with itself after one token is deleted, in raw signs or in signs "
    "about the clean outputs' mean (paired one-sided test, the better frame's p-value "
    "doubled, Student-t tails, Bonferroni over the confirmation budget, each candidate "
    "source within its own quota of it, at alpha), the monitor flags at least half of the "
    "triggered sentences, at most max_natural_rate of the clean outputs (of the fresh rows, "
    "and of every other corpus at hand) already sit at the point, and the point lies "
    "farther from the clean outputs than their own spread and than a random token moves "
    "them; score = 1 - the adjusted p-value of the strongest such trigger")


def _hard_trigger(encoder: Encoder, ids: tuple[int, ...], length: int) -> torch.Tensor:
    """A hard trigger's token embeddings [length, E], zero-padded (the PVSet layout)."""
    trigger = torch.zeros(length, encoder.embedding_size)
    ids_t = torch.tensor(ids[:length], device=encoder.device)
    with torch.no_grad():
        trigger[:len(ids_t)] = encoder.word_embeddings(ids_t).float().cpu()
    return trigger


def _calibrated_pvset(encoder: Encoder, config: ScanConfig,
                      scan: calibrated.CalibratedScan) -> PVSet:
    kept = scan.published
    length = config.mining.trigger_len
    features = list(scan.views)
    if not kept:
        return PVSet.empty(encoder.hidden_size, length, encoder.embedding_size,
                           feature=features[0], features=[])
    return PVSet(vectors=torch.stack([f.point for f in kept]),
                 triggers=torch.stack([_hard_trigger(encoder, f.token_ids, length)
                                       for f in kept]),
                 seeds=[f.seed for f in kept],
                 losses=[{"source": f.source, "placement": f.placement,
                          "p_adjusted": f.p_adjusted} for f in kept],
                 trigger_tokens=[f.tokens for f in kept], feature=kept[0].feature,
                 features=[f.feature for f in kept])


def _scan_calibrated(encoder: Encoder, config: ScanConfig, progress: bool,
                     sentences: list[str], references=None) -> tuple[Verdict, PVSet]:
    scan = calibrated.run(encoder, config, sentences, progress, references)
    evidence: dict[str, Any] = {
        "rule": "calibrated", "derived_from": CALIBRATED_RULE,
        "features": list(scan.views), "alpha": config.decision.alpha,
        "precision": str(encoder.compute_dtype).removeprefix("torch."),
        "confirmation_budget": config.decision.confirmation_budget,
        "confirmed": scan.n_confirmed,
        "completion_budget": config.decision.completion_budget,
        "completion_confirmed": scan.n_completed, "searches": scan.searches,
        "stage_seconds": scan.seconds,
        "noise_floor": {f: round(float(v.fresh.floor.mean()), 5) for f, v in scan.views.items()},
        "clean_spread": {f: round(v.fresh.spread, 6) for f, v in scan.views.items()},
        "candidates": [f.summary() for f in scan.findings]}
    if scan.elsewhere is not None and scan.elsewhere.read:
        evidence["natural_text_corpora"] = scan.elsewhere.read
    budget = scan.allocation.summary(scan.findings)
    evidence["allocation"] = budget
    if scan.collect_all:
        evidence["completion_candidates"] = allocation.completion_summary(scan.findings)
    if scan.mining:
        evidence["mining"] = scan.mining
    if scan.completion:
        evidence["completion"] = scan.completion
    if scan.reference is not None:
        evidence["reference"] = {k: v for k, v in scan.reference.items()
                                 if k not in ("candidates", "long_triggers")}
        if scan.reference.get("long_triggers"):  # what the divergence beam had judged
            evidence["reference"]["long_triggers"] = [
                " ".join(scan.encoder.tokenizer.convert_ids_to_tokens(ids))
                for ids in scan.reference["long_triggers"]]
    withheld = [f for f in scan.accepted if f.withheld]
    if withheld:
        evidence["review"] = (f"{len(withheld)} accepted PV(s) flag more than "
                              f"{config.decision.max_false_alarms:.0%} of clean text and are "
                              "kept out of the PV set: review this model")
    seeds = sum(len(v) for v in scan.mining.values())
    status = allocation.status(bool(scan.accepted), budget["unjudged"])
    verdict = Verdict(status=status, score=scan.score(), seeds_tried=seeds,
                      steps=scan.search_steps, evidence=evidence,
                      reason=allocation.reason(budget)
                      if status == Status.INCONCLUSIVE else None)
    return verdict, _calibrated_pvset(encoder, config, scan)


# ---------------------------------------------------------------------------------------
# The paper's rule (faithful preset)

def _paper_epoch_check(distance_th: float, check_epochs: int):
    def keep_going(epoch: int, distances: list[float]) -> list[bool]:
        if epoch + 1 < check_epochs:
            return [True] * len(distances)
        return [d > distance_th for d in distances] if epoch + 1 == check_epochs \
            else [True] * len(distances)
    return keep_going


def _paper_accepts(outcome: SeedOutcome, kept: list[SeedOutcome], config: ScanConfig,
                   bounds) -> tuple[bool, dict[str, Any]]:
    """REFERENCE.md §2.8: found by epoch 2, then unique (MSE), collapsed, legitimate."""
    filtering = config.filtering
    checks = {"legitimate": is_legitimate(outcome.trigger, bounds),
              "collapsed": is_collapsed(outcome.entropy_ratio, filtering),
              "unique": is_unique_mse(outcome.pv, [k.pv for k in kept], filtering.distance_th),
              "found": any(d > filtering.distance_th for d in outcome.train_distance[:2])}
    return (all(checks.values()) and not outcome.abandoned), checks


def _scan_paper(encoder: Encoder, config: ScanConfig, progress: bool,
                sentences: list[str], references=None) -> tuple[Verdict, PVSet]:
    mining = config.mining
    train = prepare_data(encoder, sentences[:len(sentences) - mining.n_holdout], mining,
                         seed=config.seed)
    holdout = prepare_data(encoder, sentences[-mining.n_holdout:], mining, seed=config.seed + 1)
    bounds = embedding_bounds(encoder.word_embeddings.weight, config.filtering)
    kept: list[SeedOutcome] = []
    candidates: list[dict[str, Any]] = []
    seeds = list(range(config.seed, config.seed + config.max_seeds))
    on_epoch = None if mining.steps_per_seed else _paper_epoch_check(
        config.filtering.distance_th, mining.found_check_epochs)
    tried = steps = 0
    for start in range(0, len(seeds), mining.parallel_seeds):
        group = seeds[start:start + mining.parallel_seeds]
        outcomes = mine_seeds(encoder, train, holdout, group, mining,
                              known_pvs=torch.stack([k.pv for k in kept]) if kept else None,
                              progress=progress, on_epoch=on_epoch)
        tried += len(group)
        steps += sum(o.steps for o in outcomes)
        for outcome in outcomes:
            accepted, checks = _paper_accepts(outcome, kept, config, bounds)
            candidates.append({"source": "mining", "seed": outcome.seed,
                               "distance": round(outcome.distance, 5),
                               "entropy_ratio": round(outcome.entropy_ratio, 5),
                               "steps": outcome.steps, "abandoned": outcome.abandoned,
                               **checks, "accepted": accepted})
            if accepted:
                kept.append(outcome)
        if config.mode == "detect" and kept:
            break
    pvset = _paper_pvset(encoder, config, holdout, kept, sentences)
    evidence = {"rule": "paper", "derived_from": (
        "paper rule: distance_th and collapse ratio are the published defaults "
        "(REFERENCE.md §2.8); the first accepted PV decides"), "candidates": candidates}
    verdict = Verdict(status="backdoored" if kept else "clean", score=1.0 if kept else 0.0,
                      seeds_tried=tried, steps=steps, evidence=evidence)
    return verdict, pvset


def _paper_pvset(encoder: Encoder, config: ScanConfig, holdout, kept: list[SeedOutcome],
                 sentences: list[str]) -> PVSet:
    feature = config.mining.feature
    if not kept:
        return PVSet.empty(encoder.hidden_size, config.mining.trigger_len,
                           encoder.embedding_size, feature=feature)
    # the report names the real words that best realise each PV (attribution.py)
    sequences = candidate_sequences(encoder, corpus_words(sentences))
    sweep = sweep_vocabulary(encoder, sequences, Feature(feature))
    tokens = [attribute_pv(encoder, holdout, k.pv, config.mining, sweep=sweep,
                           sequences=sequences,
                           n_candidates=config.decision.hard_token_candidates,
                           seed=config.seed).tokens for k in kept]
    return PVSet(vectors=torch.stack([k.pv for k in kept]),
                 triggers=torch.stack([k.trigger for k in kept]),
                 seeds=[k.seed for k in kept],
                 losses=[{**k.losses, "holdout_distance": k.distance,
                          "holdout_entropy_ratio": k.entropy_ratio} for k in kept],
                 trigger_tokens=tokens, feature=feature)


# ---------------------------------------------------------------------------------------
# Entry points

def _fresh_sentences(config: ScanConfig) -> int:
    """Sentences the calibrated rule keeps apart for confirmation (none for the paper's)."""
    return config.search.n_fresh if config.decision.rule == "calibrated" else 0


def needed_sentences(config: ScanConfig) -> int:
    mining = config.mining
    return mining.n_sentences + mining.n_holdout + _fresh_sentences(config)


def _scan_loaded(encoder: Encoder, config: ScanConfig, progress: bool,
                 sentences: list[str] | None, references=None) -> tuple[Verdict, PVSet]:
    mining = config.mining
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    encoder.compute_dtype = resolve_precision(config.precision, encoder.device)
    if sentences is None:
        sentences = load_sentences(mining.corpus, n=needed_sentences(config),
                                   seed=mining.corpus_seed)
    minimum = mining.n_holdout + mining.batch_size + _fresh_sentences(config)
    if len(sentences) < minimum:
        raise ValueError(f"need at least {minimum} sentences, got {len(sentences)}")
    scan = _scan_paper if config.decision.rule == "paper" else _scan_calibrated
    verdict, pvset = scan(encoder, config, progress, sentences, references)
    verdict.seconds = round(time.perf_counter() - started, 3)
    return verdict, pvset


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or GPU memory ran out (torch reports a full GPU as a RuntimeError)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                            and "out of memory" in str(exc).lower())


def scan_model(path: str | Path, config: ScanConfig | None = None, *, device: str = "cpu",
               allow_pickle: bool = False, max_params: int | None = None,
               progress: bool = True, sentences: list[str] | None = None,
               references: list[ReferenceCandidate] | None = None) -> ScanResult:
    """Audit one model folder. Never raises for a bad model: the verdict says what failed.
    Only running out of memory mid-scan is raised (a cause outside the model).
    `references`: clean bases a registry resolved for this model (declared, siblings),
    tried before the config's own (reference.py)."""
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
        verdict, pvset = _scan_loaded(encoder, config, progress, sentences, references)
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
