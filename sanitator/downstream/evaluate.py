"""One downstream evaluation: prompt-tune a frozen encoder on a task, then attack it.

This is the unit the `sanitator evaluate` command, the scheduled flow and the ASR benchmark
share: load the task, prompt-tune (encoder frozen), measure clean accuracy and ASR with and
without the PV monitor, and return everything that was measured and how.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sanitator.downstream.asr import AttackConfig, AttackReport, evaluate_attack
from sanitator.downstream.prompt_tuning import (
    CALIBRATION_ROWS,
    PromptModel,
    PromptTuningConfig,
    TrainingStats,
    build_prompt_model,
    save_prompt,
    train_prompt_model,
)
from sanitator.downstream.tasks_data import (
    Examples,
    TaskData,
    TaskError,
    TaskSpec,
    get_task,
    load_task,
)
from sanitator.guard.monitor import SignMonitor

log = logging.getLogger(__name__)

# Summary fields every caller reports (the `--json` object, the evaluations/ rows).
SUMMARY_FIELDS = ("clean_accuracy", "asr", "defended_asr", "defended_clean_accuracy",
                  "monitor_fpr", "n_test", "seconds", "converged", "convergence_reason")
# A prompt model whose accuracy is within this many points of always answering the majority
# class has learnt nothing: its attack success says nothing about the backdoor (issue 15).
CHANCE_MARGIN = 0.10


def majority_rate(labels: Sequence[int]) -> float:
    """The accuracy of always answering the most frequent label."""
    return max(Counter(int(y) for y in labels).values()) / len(labels) if labels else 0.0


@dataclass
class Convergence:
    """Whether prompt-tuning learnt the task: train accuracy (the last epoch's, as trained)
    and clean test accuracy both more than `margin` above their majority-class rates."""

    converged: bool
    reason: str | None
    train_accuracy: float
    train_majority: float
    clean_accuracy: float
    test_majority: float
    margin: float

    def to_dict(self) -> dict:
        return asdict(self)


def _near_chance(what: str, accuracy: float, majority: float, margin: float) -> str | None:
    if accuracy >= majority + margin:
        return None
    return (f"{what} accuracy {accuracy:.3f} is within {100 * margin:.0f} points of the "
            f"majority-class rate {majority:.3f}")


def check_convergence(train_accuracy: float, train_labels: Sequence[int], clean_accuracy: float,
                      test_labels: Sequence[int], margin: float = CHANCE_MARGIN) -> Convergence:
    """Near chance on either side means the prompt model did not converge."""
    train_majority, test_majority = majority_rate(train_labels), majority_rate(test_labels)
    problems = [p for p in (_near_chance("train", train_accuracy, train_majority, margin),
                            _near_chance("clean test", clean_accuracy, test_majority, margin))
                if p]
    reason = None
    if problems:
        reason = ("prompt-tuning did not converge: " + "; ".join(problems)
                  + "; no attack success measured")
    return Convergence(not problems, reason, train_accuracy, train_majority, clean_accuracy,
                       test_majority, margin)


@dataclass
class DownstreamResult:
    """A prompt-tuned model's clean accuracy and attack success, with the settings used."""

    encoder: str
    task: str
    method: str
    feature: str
    training: TrainingStats
    attack: AttackReport
    convergence: Convergence
    seconds: float
    prompt_path: str | None = None

    def summary(self) -> dict:
        attack = self.attack
        return {"encoder": self.encoder, "task": self.task, "method": self.method,
                "converged": self.convergence.converged,
                "convergence_reason": self.convergence.reason,
                "clean_accuracy": attack.clean_accuracy,
                "train_accuracy": self.training.train_accuracy,
                "majority_rate": self.convergence.test_majority, "asr": attack.asr,
                "weighted_asr": attack.weighted_asr, "defended_asr": attack.defended_asr,
                "defended_weighted_asr": attack.defended_weighted_asr,
                "defended_clean_accuracy": attack.defended_clean_accuracy,
                "monitor_fpr": attack.monitor_fpr, "n_test": attack.n_test,
                "n_train": self.training.n_train, "seconds": self.seconds}

    def to_dict(self) -> dict:
        return {**self.summary(), "feature": self.feature, "prompt_path": self.prompt_path,
                "convergence": self.convergence.to_dict(),
                "training": self.training.to_dict(), "attack": self.attack.to_dict()}


def _verbalizer(data: TaskData) -> tuple[str, ...]:
    if data.spec.verbalizer:
        return data.spec.verbalizer
    if all(name.isalpha() for name in data.label_names):
        return data.label_names
    raise TaskError(f"task {data.spec.name!r}: ptv1 needs verbaliser words; its labels "
                    f"{list(data.label_names)} are not words")


@dataclass
class TunedModel:
    """A prompt model trained on a task, with the rows it was trained and is tested on."""

    model_dir: str
    spec: TaskSpec
    config: PromptTuningConfig
    model: PromptModel
    train: Examples
    test: Examples
    training: TrainingStats
    started: float

    @property
    def feature(self) -> str:
        return "cls" if self.config.method == "ptv2" else "mask"

    @property
    def scored_train_labels(self) -> list[int]:
        """The labels of the training rows `training.train_accuracy` was measured on."""
        return self.train.labels[:CALIBRATION_ROWS]


def tune_on_task(model_dir: str | Path, task: TaskSpec | str, *,
                 prompt_config: PromptTuningConfig | None = None, limit: int | None = None,
                 test_seed: int = 0, progress: bool = True, allow_pickle: bool = False,
                 device: str = "cpu") -> TunedModel:
    """Prompt-tune `model_dir` on `task` (encoder frozen). `limit` caps the test rows (a
    sample seeded with `test_seed`); `prompt_config.train_size` caps the training rows."""
    start = time.perf_counter()
    spec = get_task(task) if isinstance(task, str) else task
    config = prompt_config or PromptTuningConfig()
    if config.max_length is None:
        config = replace(config, max_length=spec.max_length)
    data = load_task(spec, ("train", "test"))
    train = data.split("train").subset(config.train_size, config.seed)
    test = data.split("test").subset(limit, test_seed)
    verbalizer = _verbalizer(data) if config.method == "ptv1" else None
    model = build_prompt_model(model_dir, data.n_labels, config, verbalizer=verbalizer,
                               allow_pickle=allow_pickle, device=device)
    log.info("prompt-tuning %s on %s (%d rows, %s)", model_dir, spec.name, len(train),
             config.method)
    training = train_prompt_model(model, train.texts, train.labels, progress=progress)
    return TunedModel(str(model_dir), spec, config, model, train, test, training, start)


def attack_tuned(tuned: TunedModel, triggers: list[str], *, pvs: torch.Tensor | None = None,
                 attack_config: AttackConfig | None = None,
                 chance_margin: float = CHANCE_MARGIN) -> DownstreamResult:
    """Attack a tuned model's test rows with `triggers`, behind a monitor of `pvs` when
    given. A model at chance (`check_convergence`) is not attacked: its ASR fields are None
    and the result says why."""
    start = time.perf_counter()
    attack_config = attack_config or AttackConfig()
    monitor = None if pvs is None else SignMonitor(pvs, threshold=attack_config.threshold)

    def gate(clean_accuracy: float) -> str | None:
        return check_convergence(tuned.training.train_accuracy, tuned.scored_train_labels,
                                 clean_accuracy, tuned.test.labels, chance_margin).reason

    model = tuned.model
    report = evaluate_attack(model, model.tokenizer, tuned.test.texts, tuned.test.labels,
                             triggers, monitor=monitor, attack_field=tuned.spec.attack_field,
                             max_length=tuned.config.max_length, config=attack_config,
                             hidden_size=model.encoder_info.hidden_size, gate=gate)
    convergence = check_convergence(tuned.training.train_accuracy, tuned.scored_train_labels,
                                    report.clean_accuracy, tuned.test.labels, chance_margin)
    seconds = tuned.training.seconds + time.perf_counter() - start
    return DownstreamResult(tuned.model_dir, tuned.spec.name, tuned.config.method,
                            tuned.feature, tuned.training, report, convergence, seconds)


def evaluate_downstream(model_dir: str | Path, task: TaskSpec | str, triggers: list[str], *,
                        pvs: torch.Tensor | None = None,
                        prompt_config: PromptTuningConfig | None = None,
                        attack_config: AttackConfig | None = None, limit: int | None = None,
                        save_prompt_to: str | Path | None = None, progress: bool = True,
                        allow_pickle: bool = False, device: str = "cpu",
                        chance_margin: float = CHANCE_MARGIN) -> DownstreamResult:
    """Prompt-tune `model_dir` on `task` and measure ASR of `triggers` (defended when `pvs`).

    `limit` caps the test rows (a seeded sample); the training rows are capped by
    `prompt_config.train_size`. A prompt model at chance reports no ASR (`converged` false).
    """
    attack_config = attack_config or AttackConfig()
    tuned = tune_on_task(model_dir, task, prompt_config=prompt_config, limit=limit,
                         test_seed=attack_config.seed, progress=progress,
                         allow_pickle=allow_pickle, device=device)
    result = attack_tuned(tuned, triggers, pvs=pvs, attack_config=attack_config,
                          chance_margin=chance_margin)
    if save_prompt_to is not None:
        result.prompt_path = str(save_prompt(tuned.model, save_prompt_to, encoder_path=model_dir,
                                             extra={"task": tuned.spec.name}))
    result.seconds = time.perf_counter() - tuned.started
    return result
