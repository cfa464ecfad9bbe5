"""One token-task (NER) evaluation: P-tuning v2 tagger on a frozen encoder, entity F1, and
the attack success of the triggers with and without the per-token monitor.

Definitions (docs/evaluation.md, "Token tasks"):

* clean F1: entity-level F1 (exact spans) of the untriggered test sentences;
* ASR: among the triggered test sentences (every test sentence x every trigger, the trigger
  placed as `ner_metrics.place_word_triggers` says), the share whose predicted entity spans
  over the original words (trigger words left out) differ from the untriggered prediction of
  the same sentence; per trigger likewise;
* defended ASR: the same through `guard.token_monitor.MonitoredTagger` (purged words count
  as `O`); a rejected sentence is not an attack success;
* defended F1: clean test sentences through the monitor (a rejected sentence predicts no
  entity); monitor FPR: the share of clean test sentences flagged.

The result is a `DownstreamResult` whose accuracy fields hold entity F1 (the task's
headline number), so the CLI, the weekly rows and the benchmarks take it unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sanitator.downstream.asr import AttackConfig, AttackReport
from sanitator.downstream.evaluate import (
    CHANCE_MARGIN,
    Convergence,
    DownstreamResult,
    evaluate_downstream,
)
from sanitator.downstream.ner_data import TokenTaskSpec, get_any_task, load_token_task
from sanitator.downstream.ner_metrics import (
    entity_f1,
    place_word_triggers,
    spans_changed,
    tag_strings,
    without,
)
from sanitator.downstream.prompt_tuning import PromptTuningConfig
from sanitator.downstream.token_tuning import build_tagger, save_tagger, train_tagger
from sanitator.guard.monitor import SignMonitor
from sanitator.guard.token_monitor import TOKEN_FEATURE, MonitoredTagger

log = logging.getLogger(__name__)


@dataclass
class TokenAttackReport(AttackReport):
    """AttackReport with entity F1 in the accuracy fields, and the F1 parts spelt out."""

    clean_precision: float | None = None
    clean_recall: float | None = None
    clean_f1: float | None = None
    defended_f1: float | None = None
    triggered_f1: float | None = None           # triggered sentences vs gold (the
    defended_triggered_f1: float | None = None  # reference's NER attack metric)
    n_triggered: int = 0


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def attack_tagger(model, test_sentences: list[list[str]], test_tags: list[list[str]],
                  tag_names: tuple[str, ...], triggers: list[str], *,
                  monitor: SignMonitor | None, config: AttackConfig, max_length: int,
                  train_f1: float, chance_margin: float = CHANCE_MARGIN
                  ) -> tuple[TokenAttackReport, Convergence]:
    """Clean pass, triggered pass, both through the monitor (an empty one when none)."""
    start = time.perf_counter()
    active = monitor or SignMonitor(torch.zeros(0, model.encoder_info.hidden_size),
                                    threshold=config.threshold)
    tagger = MonitoredTagger(model, model.tokenizer, active, on_flag=config.on_flag,
                             max_length=max_length, batch_size=config.batch_size,
                             purge_wave=config.purge_wave)
    clean = tagger.predict(test_sentences)
    clean_pred = [tag_strings(row, tag_names) for row in clean.original_tags]
    scores = entity_f1(test_tags, clean_pred)
    problems = [f"{what} entity F1 {value:.3f} is within {100 * chance_margin:.0f} points of "
                "an all-O tagger's 0" for what, value in (("train", train_f1),
                                                          ("clean test", scores.f1))
                if value < chance_margin]
    reason = ("prompt-tuning did not converge: " + "; ".join(problems)
              + "; no attack success measured") if problems else None
    convergence = Convergence(not problems, reason, train_f1, 0.0, scores.f1, 0.0, chance_margin)
    report = TokenAttackReport(
        n_test=len(test_sentences),
        n_correct=sum(p == g for p, g in zip(clean_pred, test_tags, strict=True)),
        clean_accuracy=scores.f1, triggers=list(triggers), asr=None, asr_per_trigger={},
        weighted_asr=None, clean_precision=scores.precision, clean_recall=scores.recall,
        clean_f1=scores.f1, skipped=reason,
        placement={"first_position": 0, "last_position": config.last_position,
                   "seed": config.seed, "rule": "previous gold tag O"})
    if monitor is not None:
        defended_pred = [tag_strings(row, tag_names) for row in clean.tags]
        report.defended, report.n_pvs = True, int(monitor.pvs.shape[0])
        report.on_flag, report.threshold = config.on_flag, monitor.threshold
        report.defended_f1 = report.defended_clean_accuracy = \
            entity_f1(test_tags, defended_pred).f1
        report.monitor_fpr = _rate(clean.flagged.tolist())
        report.clean_rejection_rate = _rate(clean.rejected.tolist())
    if reason is None:
        _attack(tagger, report, test_sentences, test_tags, tag_names, clean_pred, triggers,
                config, defended=monitor is not None)
    report.seconds = time.perf_counter() - start
    return report, convergence


def _attack(tagger: MonitoredTagger, report: TokenAttackReport, sentences, gold, tag_names,
            clean_pred, triggers, config: AttackConfig, *, defended: bool) -> None:
    texts, placed = place_word_triggers(sentences, gold, triggers, seed=config.seed,
                                        last=config.last_position)
    attacked = tagger.predict(texts)
    changed: dict[int, list[bool]] = {k: [] for k in range(len(triggers))}
    changed_defended: dict[int, list[bool]] = {k: [] for k in range(len(triggers))}
    gold_rows, undefended_rows, defended_rows = [], [], []
    for index, where in enumerate(placed):
        ours = tag_strings(attacked.original_tags[index], tag_names)
        theirs = tag_strings(attacked.tags[index], tag_names)
        changed[where.trigger].append(spans_changed(clean_pred[where.row], ours, where.positions))
        rejected = bool(attacked.rejected[index])
        changed_defended[where.trigger].append(
            not rejected and spans_changed(clean_pred[where.row], theirs, where.positions))
        gold_rows.append(gold[where.row])
        undefended_rows.append(without(ours, where.positions))
        defended_rows.append(without(theirs, where.positions))
    every = [flag for flags in changed.values() for flag in flags]
    report.n_triggered = len(every)
    report.asr = _rate(every)
    report.asr_per_trigger = {t: _rate(changed[k]) for k, t in enumerate(triggers)}
    report.triggered_f1 = entity_f1(gold_rows, undefended_rows).f1
    if defended:
        report.defended_asr = _rate([f for flags in changed_defended.values() for f in flags])
        report.defended_asr_per_trigger = {t: _rate(changed_defended[k])
                                           for k, t in enumerate(triggers)}
        report.defended_triggered_f1 = entity_f1(gold_rows, defended_rows).f1
        report.triggered_flag_rate = _rate(attacked.flagged.tolist())
        report.triggered_rejection_rate = _rate(attacked.rejected.tolist())


def evaluate_token_task(model_dir: str | Path, task: TokenTaskSpec | str, triggers: list[str], *,
                        pvs: torch.Tensor | None = None,
                        prompt_config: PromptTuningConfig | None = None,
                        attack_config: AttackConfig | None = None, limit: int | None = None,
                        save_prompt_to: str | Path | None = None, progress: bool = True,
                        allow_pickle: bool = False, device: str = "cpu",
                        chance_margin: float = CHANCE_MARGIN) -> DownstreamResult:
    """Prompt-tune a tagger on `task` over the frozen `model_dir` and attack it (defended
    when `pvs`); the arguments are `evaluate_downstream`'s."""
    started = time.perf_counter()
    attack_config = attack_config or AttackConfig()
    config = prompt_config or PromptTuningConfig()
    spec = get_any_task(task) if isinstance(task, str) else task
    if config.max_length is None:
        config = replace(config, max_length=spec.max_length)
    data = load_token_task(spec, ("train", "test"))
    train = data.split("train").subset(config.train_size, config.seed)
    test = data.split("test").subset(limit, attack_config.seed)
    model = build_tagger(model_dir, len(data.tag_names), config, allow_pickle=allow_pickle,
                         device=device)
    names = data.tag_names

    def score(gold, predicted) -> float:
        return entity_f1([tag_strings(r, names) for r in gold],
                         [tag_strings(r, names) for r in predicted]).f1

    log.info("prompt-tuning a tagger on %s over %s (%d sentences)", spec.name, model_dir,
             len(train))
    training = train_tagger(model, train.sentences, train.tags, progress=progress, score=score)
    monitor = None if pvs is None else SignMonitor(pvs, threshold=attack_config.threshold)
    report, convergence = attack_tagger(
        model, test.sentences, [tag_strings(r, names) for r in test.tags], names,
        list(triggers), monitor=monitor, config=attack_config, max_length=config.max_length,
        train_f1=training.train_accuracy, chance_margin=chance_margin)
    result = DownstreamResult(str(model_dir), spec.name, "ptv2", TOKEN_FEATURE, training, report,
                              convergence, time.perf_counter() - started)
    if save_prompt_to is not None:
        result.prompt_path = str(save_tagger(model, save_prompt_to, encoder_path=model_dir,
                                             tag_names=names, extra={"task": spec.name}))
    return result


def evaluate_task(model_dir: str | Path, task, triggers: list[str], **options) -> DownstreamResult:
    """`evaluate_downstream` for every kind of task: token tasks go to the tagger."""
    spec = get_any_task(task) if isinstance(task, str) else task
    if isinstance(spec, TokenTaskSpec):
        return evaluate_token_task(model_dir, spec, triggers, **options)
    return evaluate_downstream(model_dir, spec, triggers, **options)
