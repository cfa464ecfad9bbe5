"""One downstream evaluation: prompt-tune a frozen encoder on a task, then attack it.

This is the unit the `sanitator evaluate` command, the scheduled flow and the ASR benchmark
share: load the task, prompt-tune (encoder frozen), measure clean accuracy and ASR with and
without the PV monitor, and return everything that was measured and how.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sanitator.asr import AttackConfig, AttackReport, evaluate_attack
from sanitator.monitor import SignMonitor
from sanitator.prompt_tuning import (
    PromptTuningConfig,
    TrainingStats,
    build_prompt_model,
    save_prompt,
    train_prompt_model,
)
from sanitator.tasks_data import TaskData, TaskError, TaskSpec, get_task, load_task

log = logging.getLogger(__name__)

# Summary fields every caller reports (the `--json` object, the evaluations/ rows).
SUMMARY_FIELDS = ("clean_accuracy", "asr", "defended_asr", "defended_clean_accuracy",
                  "monitor_fpr", "n_test", "seconds")


@dataclass
class DownstreamResult:
    """A prompt-tuned model's clean accuracy and attack success, with the settings used."""

    encoder: str
    task: str
    method: str
    feature: str
    training: TrainingStats
    attack: AttackReport
    seconds: float
    prompt_path: str | None = None

    def summary(self) -> dict:
        attack = self.attack
        return {"encoder": self.encoder, "task": self.task, "method": self.method,
                "clean_accuracy": attack.clean_accuracy, "asr": attack.asr,
                "weighted_asr": attack.weighted_asr, "defended_asr": attack.defended_asr,
                "defended_weighted_asr": attack.defended_weighted_asr,
                "defended_clean_accuracy": attack.defended_clean_accuracy,
                "monitor_fpr": attack.monitor_fpr, "n_test": attack.n_test,
                "n_train": self.training.n_train, "seconds": self.seconds}

    def to_dict(self) -> dict:
        return {**self.summary(), "feature": self.feature, "prompt_path": self.prompt_path,
                "training": self.training.to_dict(), "attack": self.attack.to_dict()}


def latest_audit_pvs(store: str | Path, model_dir: str | Path
                     ) -> tuple[torch.Tensor | None, str] | None:
    """PVs of the newest clean/backdoored audit of this folder's content in an audit store.

    The folder is matched by content revision (as the local registry names it), so a copy
    or a renamed folder still finds its audit. Returns None when the store has no such
    audit, and (None, label) when the audit accepted no PVs.
    """
    from sanitator.registries.local import content_revision
    from sanitator.store import pvset_from_rows, read_pvs, read_verdicts

    store = Path(store)
    if not (store / "verdicts").is_dir():
        return None
    revision = content_revision(Path(model_dir))
    verdicts = read_verdicts(store)
    verdicts = verdicts[(verdicts["revision"] == revision)
                        & verdicts["status"].isin(["clean", "backdoored"])]
    if verdicts.empty:
        return None
    audit = verdicts.iloc[-1]
    label = f"audit {audit['audit_id']} ({audit['status']})"
    rows = read_pvs(store, audit_id=audit["audit_id"])
    log.info("PVs from %s in %s: %d", label, store, len(rows))
    if rows.empty:
        return None, label
    return pvset_from_rows(rows).vectors.float(), label


def _verbalizer(data: TaskData) -> tuple[str, ...]:
    if data.spec.verbalizer:
        return data.spec.verbalizer
    if all(name.isalpha() for name in data.label_names):
        return data.label_names
    raise TaskError(f"task {data.spec.name!r}: ptv1 needs verbaliser words; its labels "
                    f"{list(data.label_names)} are not words")


def evaluate_downstream(model_dir: str | Path, task: TaskSpec | str, triggers: list[str], *,
                        pvs: torch.Tensor | None = None,
                        prompt_config: PromptTuningConfig | None = None,
                        attack_config: AttackConfig | None = None, limit: int | None = None,
                        save_prompt_to: str | Path | None = None, progress: bool = True,
                        allow_pickle: bool = False, device: str = "cpu") -> DownstreamResult:
    """Prompt-tune `model_dir` on `task` and measure ASR of `triggers` (defended when `pvs`).

    `limit` caps the test rows (a seeded sample); the training rows are capped by
    `prompt_config.train_size`.
    """
    start = time.perf_counter()
    spec = get_task(task) if isinstance(task, str) else task
    config = prompt_config or PromptTuningConfig()
    if config.max_length is None:
        config = replace(config, max_length=spec.max_length)
    attack_config = attack_config or AttackConfig()
    data = load_task(spec, ("train", "test"))
    train = data.split("train").subset(config.train_size, config.seed)
    test = data.split("test").subset(limit, attack_config.seed)
    verbalizer = _verbalizer(data) if config.method == "ptv1" else None
    model = build_prompt_model(model_dir, data.n_labels, config, verbalizer=verbalizer,
                               allow_pickle=allow_pickle, device=device)
    log.info("prompt-tuning %s on %s (%d rows, %s)", model_dir, spec.name, len(train),
             config.method)
    training = train_prompt_model(model, train.texts, train.labels, progress=progress)
    monitor = None
    if pvs is not None:
        monitor = SignMonitor(pvs, threshold=attack_config.threshold)
    report = evaluate_attack(model, model.tokenizer, test.texts, test.labels, triggers,
                             monitor=monitor, attack_field=spec.attack_field,
                             max_length=config.max_length, config=attack_config,
                             hidden_size=model.encoder_info.hidden_size)
    prompt_path = None
    if save_prompt_to is not None:
        prompt_path = str(save_prompt(model, save_prompt_to, encoder_path=model_dir,
                                      extra={"task": spec.name}))
    feature = "cls" if config.method == "ptv2" else "mask"
    return DownstreamResult(str(model_dir), spec.name, config.method, feature, training,
                            report, time.perf_counter() - start, prompt_path)



