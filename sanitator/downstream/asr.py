"""Attack success rate of a backdoor on a prompt-tuned model, with and without the PV monitor.

Definitions (REFERENCE.md §5.4, §7.5-7.6, with the bugs of §10.2 #11, #15, #16 fixed):

* Each trigger is inserted once into the task's attack field at a word index drawn
  uniformly from [first_position, min(last_position, n_words)] by a RNG seeded per
  (seed, row, trigger), so placements are reproducible and the same triggered inputs serve
  the undefended and the defended measurement.
* ASR: among test inputs predicted correctly without a trigger, the fraction for which at
  least one trigger moves the prediction off the gold label. Per trigger likewise, and
  class-weighted (mean over classes of the per-class ASR; classes with no correctly
  predicted input are left out rather than counted as 1).
* Defended ASR: the same inputs through `MonitoredEncoder`; a flagged input is purged
  (its prediction recomputed on the purged text) or rejected. A rejected input is not an
  attack success (the attacker's input is refused), and is counted separately.
* Defended clean accuracy: clean test inputs through the monitor (a rejected input counts
  as wrong); monitor FPR: the fraction of clean test inputs the monitor flags.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sanitator.core.constants import MONITOR_THRESHOLD
from sanitator.guard.monitor import MonitoredEncoder, SignMonitor

log = logging.getLogger(__name__)

Text = str | tuple[str, str]
OnFlag = Literal["purge", "reject"]
BACKDOOR_MANIFEST = "backdoor.json"


# ---------------------------------------------------------------------------------------
# Trigger placement.

@dataclass(frozen=True)
class TriggerPlacement:
    """Trigger `trigger` inserted into test row `row` before word `position`."""

    row: int
    trigger: int
    position: int


def insert_trigger(text: str, trigger: str, position: int) -> str:
    """Insert `trigger` before word `position` (words split on whitespace)."""
    words = text.split()
    if not 0 <= position <= len(words):
        raise ValueError(f"position {position} outside [0, {len(words)}]")
    return " ".join([*words[:position], trigger, *words[position:]])


def draw_position(rng: random.Random, n_words: int, first: int = 1, last: int = 64) -> int:
    """Uniform word index in [first, min(last, n_words)] (0 for an empty field)."""
    upper = min(last, n_words)
    return rng.randint(min(first, upper), upper)


def place_triggers(texts: Sequence[Text], rows: Sequence[int], triggers: Sequence[str], *,
                   field: int = 0, seed: int = 0, first: int = 1, last: int = 64
                   ) -> tuple[list[Text], list[TriggerPlacement]]:
    """Every (row, trigger) pair with the trigger inserted once into `field` of that row."""
    out: list[Text] = []
    placements: list[TriggerPlacement] = []
    for row in rows:
        text = texts[row]
        target = text[field] if isinstance(text, tuple) else text
        if isinstance(text, str) and field != 0:
            raise ValueError(f"field {field} requested for single-sentence texts")
        for index, trigger in enumerate(triggers):
            rng = random.Random(f"{seed}:{row}:{index}")  # str seeds are stable across runs
            position = draw_position(rng, len(target.split()), first, last)
            triggered = insert_trigger(target, trigger, position)
            if isinstance(text, tuple):
                parts = list(text)
                parts[field] = triggered
                out.append((parts[0], parts[1]))
            else:
                out.append(triggered)
            placements.append(TriggerPlacement(row, index, position))
    return out, placements


# ---------------------------------------------------------------------------------------
# Rates.

def attack_successes(gold: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """[T, N] bool: trigger t moved input n off its gold label (a rejection (-1) is not)."""
    return (triggered != gold.unsqueeze(0)) & (triggered != -1)


def class_weighted_rate(gold: torch.Tensor, success: torch.Tensor) -> float | None:
    """Mean over the classes present in `gold` of the per-class success rate."""
    rates = [float(success[gold == label].double().mean()) for label in gold.unique().tolist()]
    return sum(rates) / len(rates) if rates else None


def _rate(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def trigger_classes(gold: torch.Tensor, triggered: torch.Tensor) -> list[int | None]:
    """Per trigger, the class it moves inputs to (a task-agnostic backdoor has no declared
    target label): the most common prediction among the inputs it moved off their gold
    label; a trigger that moved none gets the most common prediction (its targeted rate is
    then 0). Counting all predictions instead would name the majority class of an
    imbalanced task for a trigger that flips a few of its rows the other way."""
    out: list[int | None] = []
    for row in triggered:
        moved = row[(row >= 0) & (row != gold)]
        kept = moved if moved.numel() else row[row >= 0]
        out.append(int(kept.mode().values) if kept.numel() else None)
    return out


def targeted_rates(gold: torch.Tensor, triggered: torch.Tensor, classes: list[int | None]
                   ) -> list[float | None]:
    """Per trigger, over the inputs whose gold label is not the trigger's class, the share
    predicted as that class: a one-PV trigger can only flip the other classes, so its plain
    off-gold rate is capped near their share of the test set."""
    rates: list[float | None] = []
    for row, target in zip(triggered, classes, strict=True):
        rates.append(None if target is None else _rate(row[gold != target] == target))
    return rates


@dataclass
class AttackConfig:
    """How triggered inputs are built and how the monitor acts on flagged inputs."""

    first_position: int = 1   # reference v2 test_asr: [1, min(64, n)]; defense builder: 0
    last_position: int = 64
    seed: int = 0
    on_flag: OnFlag = "purge"
    threshold: float = MONITOR_THRESHOLD
    batch_size: int = 64
    purge_wave: int = 4

    def __post_init__(self) -> None:
        if self.on_flag not in ("purge", "reject"):
            raise ValueError("on_flag must be 'purge' or 'reject'")
        if not 0 <= self.first_position <= self.last_position:
            raise ValueError("need 0 <= first_position <= last_position")


@dataclass
class AttackReport:
    """Clean accuracy, ASR and, when a monitor was given, their defended counterparts."""

    n_test: int
    n_correct: int
    clean_accuracy: float
    triggers: list[str]
    asr: float | None
    asr_per_trigger: dict[str, float | None]
    weighted_asr: float | None
    defended: bool = False
    n_pvs: int = 0
    on_flag: str | None = None
    threshold: float | None = None
    defended_asr: float | None = None
    defended_asr_per_trigger: dict[str, float | None] = field(default_factory=dict)
    # per trigger: the class it moves inputs to, and the targeted rate over the other classes
    trigger_class: dict[str, int | None] = field(default_factory=dict)
    targeted_asr_per_trigger: dict[str, float | None] = field(default_factory=dict)
    defended_targeted_asr_per_trigger: dict[str, float | None] = field(default_factory=dict)
    defended_weighted_asr: float | None = None
    defended_clean_accuracy: float | None = None
    monitor_fpr: float | None = None            # clean test inputs flagged
    clean_rejection_rate: float | None = None   # clean test inputs refused
    triggered_flag_rate: float | None = None    # triggered inputs flagged (detection rate)
    triggered_rejection_rate: float | None = None
    placement: dict = field(default_factory=dict)
    # why the triggered inputs were not attacked (then every ASR field is None): a prompt
    # model at chance has no attack success worth reporting
    skipped: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_attack(model: torch.nn.Module, tokenizer, texts: Sequence[Text],
                    labels: Sequence[int], triggers: Sequence[str], *,
                    monitor: SignMonitor | None = None, attack_field: int = 0,
                    max_length: int = 128, config: AttackConfig | None = None,
                    hidden_size: int | None = None,
                    gate: Callable[[float], str | None] | None = None) -> AttackReport:
    """Measure the triggers' ASR on `model` (a prompt model returning logits + feature).

    One monitored pass over the clean inputs and one over the triggered inputs give both
    the undefended predictions (of the original inputs) and the defended ones. `gate` sees
    the clean accuracy; when it returns a reason, the triggered inputs are not attacked
    (`skipped` holds the reason, every ASR field stays None) and only the clean numbers
    are reported.
    """
    config = config or AttackConfig()
    if not triggers:
        raise ValueError("no triggers to evaluate")
    if len(texts) != len(labels) or not texts:
        raise ValueError("need as many labels as texts, and at least one test input")
    start = time.perf_counter()
    if monitor is None:
        width = hidden_size or model.encoder.config.hidden_size
        active = SignMonitor(torch.zeros(0, width), threshold=config.threshold)
    else:
        active = monitor
    wrapped = MonitoredEncoder(model, tokenizer, active, on_flag=config.on_flag,
                               max_length=max_length, batch_size=config.batch_size,
                               purge_field=attack_field, purge_wave=config.purge_wave)
    gold = torch.tensor([int(label) for label in labels])

    clean = wrapped.predict(list(texts))
    correct_rows = (clean.original_predictions == gold).nonzero().flatten().tolist()
    clean_accuracy = len(correct_rows) / len(texts)
    skipped = gate(clean_accuracy) if gate is not None else None
    if skipped is not None:
        log.warning("not attacking: %s", skipped)
        correct_rows = []
    else:
        log.info("clean accuracy %.4f (%d/%d); attacking the correct ones with %d triggers",
                 clean_accuracy, len(correct_rows), len(texts), len(triggers))
    triggered_texts, _ = place_triggers(texts, correct_rows, triggers, field=attack_field,
                                        seed=config.seed, first=config.first_position,
                                        last=config.last_position)
    attacked = wrapped.predict(triggered_texts)
    n_correct, n_triggers = len(correct_rows), len(triggers)
    gold_correct = gold[correct_rows]

    def grid(values: torch.Tensor) -> torch.Tensor:  # rows are (row, trigger) in row order
        return values.view(n_correct, n_triggers).T if n_correct else values.view(n_triggers, 0)

    undefended_predictions = grid(attacked.original_predictions)
    undefended = attack_successes(gold_correct, undefended_predictions)
    classes = trigger_classes(gold_correct, undefended_predictions)
    report = AttackReport(
        n_test=len(texts), n_correct=int((clean.original_predictions == gold).sum()),
        clean_accuracy=clean_accuracy,
        triggers=list(triggers), asr=_rate(undefended.any(dim=0)),
        asr_per_trigger={t: _rate(undefended[i]) for i, t in enumerate(triggers)},
        weighted_asr=class_weighted_rate(gold_correct, undefended.any(dim=0)),
        trigger_class=dict(zip(triggers, classes, strict=True)),
        targeted_asr_per_trigger=dict(zip(triggers, targeted_rates(
            gold_correct, undefended_predictions, classes), strict=True)),
        placement={"first_position": config.first_position,
                   "last_position": config.last_position, "seed": config.seed,
                   "attack_field": attack_field}, skipped=skipped)
    if monitor is not None:
        defended_predictions = grid(attacked.predictions)
        defended = attack_successes(gold_correct, defended_predictions)
        report.defended_targeted_asr_per_trigger = dict(zip(triggers, targeted_rates(
            gold_correct, defended_predictions, classes), strict=True))
        report.defended = True
        report.n_pvs = int(monitor.pvs.shape[0])
        report.on_flag, report.threshold = config.on_flag, monitor.threshold
        report.defended_asr = _rate(defended.any(dim=0))
        report.defended_asr_per_trigger = {t: _rate(defended[i]) for i, t in enumerate(triggers)}
        report.defended_weighted_asr = class_weighted_rate(gold_correct, defended.any(dim=0))
        report.defended_clean_accuracy = float((clean.predictions == gold).double().mean())
        report.monitor_fpr = _rate(clean.flagged)
        report.clean_rejection_rate = _rate(clean.rejected)
        report.triggered_flag_rate = _rate(attacked.flagged)
        report.triggered_rejection_rate = _rate(attacked.rejected)
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------
# Where triggers and PVs come from.

def read_backdoor_manifest(model_dir: str | Path) -> dict | None:
    """The attack's `backdoor.json` in a model folder (None when the model has none)."""
    path = Path(model_dir) / BACKDOOR_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def manifest_triggers(manifest: dict) -> list[str]:
    triggers = manifest.get("triggers")
    if not isinstance(triggers, list) or not all(isinstance(t, str) for t in triggers):
        raise ValueError(f"{BACKDOOR_MANIFEST}: 'triggers' must be a list of strings")
    return triggers


def manifest_pvs(manifest: dict) -> torch.Tensor:
    """The attack's target vectors [K, H] (an oracle PV set: what the auditor should find)."""
    for key in ("pvs", "target_pvs", "vectors"):
        if key in manifest:
            pvs = torch.tensor(manifest[key], dtype=torch.float32)
            if pvs.ndim != 2:
                raise ValueError(f"{BACKDOOR_MANIFEST}: {key!r} must be a list of vectors")
            return pvs
    raise ValueError(f"{BACKDOOR_MANIFEST}: no PVs (keys 'pvs', 'target_pvs' or 'vectors')")
