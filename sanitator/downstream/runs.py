"""Scheduled downstream evaluations without an orchestrator: plan (encoder, task) pairs from
the latest verdicts, run one pair, turn it into an `evaluations/` row and an MLflow run.

The Prefect tasks in `tasks/evaluate.py` and the flow in `flows/evaluate_asr.py` are thin
wrappers over these functions (docs/evaluation.md, "Scheduled evaluation").
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from sanitator import __version__
from sanitator.core.status import VERDICT_STATUSES, Status
from sanitator.pipeline.registries import FetchError, ModelRef

log = logging.getLogger(__name__)

EVALUATIONS = "evaluations"
# The paper's default triggers: a clean encoder (no backdoor.json) is attacked with them to
# measure the baseline ASR and the monitor's false positives.
DEFAULT_TRIGGERS: tuple[str, ...] = ("cf", "mn", "tq", "qt", "mm", "pt")
EVALUATED_STATUSES: tuple[str, ...] = VERDICT_STATUSES  # only a verdict has PVs to test
_TIME = pa.timestamp("us", tz="UTC")
PER_TRIGGER = pa.struct([pa.field("trigger", pa.string()), pa.field("asr", pa.float64()),
                         pa.field("defended_asr", pa.float64())])

EVALUATIONS_SCHEMA = pa.schema([
    pa.field("evaluation_id", pa.string(), nullable=False),
    pa.field("batch_id", pa.string()),
    pa.field("evaluated_at", _TIME, nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("registry", pa.string(), nullable=False),
    pa.field("encoder", pa.string(), nullable=False),      # the repo id of the encoder
    pa.field("revision", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),       # ptv2 | ptv1
    pa.field("status", pa.string(), nullable=False),       # ok | error
    pa.field("reason", pa.string()),
    pa.field("audit_id", pa.string()),                     # the audit whose PVs guarded it
    pa.field("verdict_status", pa.string()),               # that audit's verdict
    pa.field("attack", pa.string()),                       # backdoor.json attack, or none
    pa.field("triggers", pa.list_(pa.string())),
    pa.field("n_pvs", pa.int32()),
    pa.field("on_flag", pa.string()),                      # purge | reject
    pa.field("clean_accuracy", pa.float64()),
    pa.field("asr", pa.float64()),
    pa.field("weighted_asr", pa.float64()),
    pa.field("defended_asr", pa.float64()),
    pa.field("defended_weighted_asr", pa.float64()),
    pa.field("defended_clean_accuracy", pa.float64()),
    pa.field("monitor_fpr", pa.float64()),
    pa.field("triggered_flag_rate", pa.float64()),
    pa.field("n_test", pa.int64()),
    pa.field("n_train", pa.int64()),
    pa.field("seconds", pa.float64()),
    # schema version 2: convergence and per-trigger rates
    pa.field("converged", pa.bool_()),                     # false: no ASR (reason says why)
    pa.field("train_accuracy", pa.float64()),              # trained model, eval mode
    pa.field("majority_rate", pa.float64()),               # of the test rows
    pa.field("per_trigger", pa.list_(PER_TRIGGER)),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("config", pa.string()),                       # prompt + attack settings, JSON
    pa.field("details", pa.string()),                      # per-trigger rates etc., JSON
    pa.field("package_version", pa.string(), nullable=False),
    pa.field("device", pa.string()),
    pa.field("retryable", pa.bool_(), nullable=False),
    pa.field("mlflow_run_id", pa.string()),
], metadata={"sanitator.dataset": EVALUATIONS, "sanitator.schema_version": "2"})

# An evaluation is the same when these match (plus its status being ok).
DEDUPE_KEY: tuple[str, ...] = ("registry", "encoder", "revision", "task", "method",
                               "config_hash", "audit_id")


def evaluation_config(prompt_options: dict[str, Any] | None = None,
                      attack_options: dict[str, Any] | None = None, limit: int | None = None,
                      method: str = "ptv2", chance_margin: float | None = None
                      ) -> dict[str, Any]:
    """The full settings of an evaluation as plain JSON data (validated)."""
    from sanitator.downstream.asr import AttackConfig
    from sanitator.downstream.evaluate import CHANCE_MARGIN
    from sanitator.downstream.prompt_tuning import PromptTuningConfig

    prompt = PromptTuningConfig(method=method, **(prompt_options or {}))
    attack = AttackConfig(**(attack_options or {}))
    margin = CHANCE_MARGIN if chance_margin is None else float(chance_margin)
    if not 0 <= margin < 1:
        raise ValueError(f"chance_margin must be in [0, 1), got {margin}")
    return {"prompt": asdict(prompt), "attack": asdict(attack), "limit": limit,
            "chance_margin": margin}


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TaskChoice:
    """A ready-made task name, or a user Parquet file/folder with its columns."""

    task: str
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    attack_column: str | None = None

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> TaskChoice:
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict) or "task" not in value:
            raise ValueError(f"a task is a name/path or a dict with 'task', got {value!r}")
        unknown = set(value) - {"task", "text_column", "text_pair_column", "label_column",
                                "attack_column"}
        if unknown:
            raise ValueError(f"unknown task options {sorted(unknown)}")
        return cls(**value)

    def spec(self):
        from sanitator.downstream.ner_data import get_any_task

        return get_any_task(self.task, text_column=self.text_column,
                            text_pair_column=self.text_pair_column,
                            label_column=self.label_column, attack_column=self.attack_column)

    @property
    def name(self) -> str:
        return self.spec().name


@dataclass(frozen=True)
class EvaluationRequest:
    """One (encoder, task) evaluation as shipped to a worker: plain data, picklable."""

    evaluation_id: str
    ref: ModelRef
    task: TaskChoice
    config: dict[str, Any]
    config_hash: str
    pvs: list[list[float]] | None      # None: no monitor; []: an audit that found no PVs
    audit_id: str | None = None
    verdict_status: str | None = None
    triggers: tuple[str, ...] | None = None   # None: the model's backdoor.json, else default
    device: str = "cpu"


@dataclass
class EvaluationOutcome:
    """What a worker sends back."""

    status: str                        # ok | error
    reason: str | None = None
    result: dict[str, Any] | None = None   # DownstreamResult.to_dict()
    attack: str | None = None
    triggers: list[str] = field(default_factory=list)
    prompt: bytes | None = None        # the trained prompt + head, safetensors bytes
    seconds: float = 0.0
    retryable: bool = False


@dataclass
class EvaluationPlan:
    todo: list[EvaluationRequest]
    settled: list[tuple[str, str, str]]           # (repo id, revision, task) already done
    unavailable: list[tuple[str, str]]            # (repo id, why) not evaluated


def plan_evaluations(store: str | Path, refs: Iterable[ModelRef], tasks: Sequence[TaskChoice],
                     config: dict[str, Any], *, done: Iterable[dict[str, Any]] = (),
                     new_id, statuses: Sequence[str] = EVALUATED_STATUSES,
                     triggers: Sequence[str] | None = None, device: str = "cpu",
                     force: bool = False, require_audit: bool = True) -> EvaluationPlan:
    """(encoder, task) pairs for the refs that have a latest verdict in `statuses`.

    Each pair is guarded by the PVs of that model's newest audit of the same revision; a ref
    without one is listed as unavailable (or evaluated unguarded when `require_audit` is
    False). Pairs already evaluated with the same settings and audit are settled unless
    `force`.
    """
    from sanitator.downstream.pvs import resolve_pvs
    from sanitator.pipeline.store import read_verdicts

    verdicts = read_verdicts(store)
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in verdicts.to_dict("records"):
        latest[(row["registry"], row["repo_id"], row["revision"])] = row  # oldest first
    finished = {tuple(row[k] for k in DEDUPE_KEY) for row in done if row.get("status") == "ok"}
    digest = config_hash(config)
    plan = EvaluationPlan([], [], [])
    for ref in refs:
        verdict = latest.get((ref.registry, ref.repo_id, ref.revision))
        if verdict is None or verdict["status"] not in statuses:
            if verdict is None and not require_audit:
                audit_id, status, pvs = None, None, None
            else:
                why = "no audit of this revision" if verdict is None else \
                    f"latest verdict is {verdict['status']}"
                plan.unavailable.append((ref.repo_id, why))
                continue
        else:
            audit_id, status = verdict["audit_id"], verdict["status"]
            pvs = resolve_pvs(store=store, audit_id=audit_id).as_lists()
        for task in tasks:
            key = (ref.registry, ref.repo_id, ref.revision, task.name, config["prompt"]["method"],
                   digest, audit_id)
            if key in finished and not force:
                plan.settled.append((ref.repo_id, ref.revision, task.name))
                continue
            plan.todo.append(EvaluationRequest(
                new_id(), ref, task, config, digest, pvs, audit_id, status,
                tuple(triggers) if triggers else None, device))
    return plan


def run_evaluation(request: EvaluationRequest, *, work_dir: str | Path | None = None,
                   progress: bool = False) -> EvaluationOutcome:
    """Fetch the encoder, prompt-tune it on the task and attack it; never raises.

    Transient failures (fetch errors marked retryable, unexpected crashes) come back with
    `retryable=True`; bad input (unknown task, missing column, unsupported model) does not.
    """
    import torch

    from sanitator.core.paths import DataNotFoundError
    from sanitator.detect.encoders import ModelRejected
    from sanitator.downstream.asr import AttackConfig, manifest_triggers, read_backdoor_manifest
    from sanitator.downstream.evaluate import CHANCE_MARGIN
    from sanitator.downstream.ner_eval import evaluate_task
    from sanitator.downstream.prompt_tuning import PromptTuningConfig
    from sanitator.downstream.tasks_data import TaskError
    from sanitator.pipeline.registries import fetch_ref

    started = time.monotonic()

    def done(outcome: EvaluationOutcome) -> EvaluationOutcome:
        outcome.seconds = time.monotonic() - started
        return outcome

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sanitator-eval-", dir=work_dir))
    try:
        folder = fetch_ref(request.ref, scratch)
        manifest = read_backdoor_manifest(folder)
        attack = str(manifest.get("attack", "unknown")) if manifest else "none"
        if request.triggers:
            triggers = list(request.triggers)
        elif manifest and manifest.get("triggers"):
            triggers = manifest_triggers(manifest)
        else:
            triggers = list(DEFAULT_TRIGGERS)
        pvs = None
        if request.pvs is not None:
            pvs = torch.tensor(request.pvs, dtype=torch.float32) if request.pvs \
                else torch.zeros(0, 1)
        prompt_file = scratch / "prompt.safetensors"
        result = evaluate_task(
            folder, request.task.spec(), triggers, pvs=pvs,
            prompt_config=PromptTuningConfig(**request.config["prompt"]),
            attack_config=AttackConfig(**request.config["attack"]),
            limit=request.config.get("limit"), save_prompt_to=prompt_file, progress=progress,
            device=request.device,
            chance_margin=request.config.get("chance_margin", CHANCE_MARGIN))
        return done(EvaluationOutcome("ok", result=result.to_dict(), attack=attack,
                                      triggers=triggers, prompt=prompt_file.read_bytes()))
    except FetchError as exc:
        return done(EvaluationOutcome(Status.ERROR, str(exc), retryable=exc.retryable))
    except ModelRejected as exc:
        return done(EvaluationOutcome(Status.ERROR, f"{exc.status}: {exc.reason}"))
    except (TaskError, DataNotFoundError, ValueError) as exc:
        return done(EvaluationOutcome(Status.ERROR, str(exc)))
    except Exception as exc:  # a crash is a row, and worth one more try
        log.exception("evaluation of %s on %s crashed", request.ref.label, request.task.task)
        return done(EvaluationOutcome(Status.ERROR, f"evaluation crashed: {exc!r}", retryable=True))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def per_trigger_rates(attack: dict[str, Any]) -> list[dict[str, Any]]:
    """[{trigger, asr, defended_asr}] in trigger order from an AttackReport dict (rates are
    None where nothing was measured: no monitor, or a prompt model at chance)."""
    defended = attack.get("defended_asr_per_trigger") or {}
    return [{"trigger": trigger, "asr": (attack.get("asr_per_trigger") or {}).get(trigger),
             "defended_asr": defended.get(trigger)} for trigger in attack.get("triggers", [])]


def evaluation_row(request: EvaluationRequest, outcome: EvaluationOutcome, *,
                   evaluated_at, batch_id: str | None = None,
                   mlflow_run_id: str | None = None) -> dict[str, Any]:
    """The `evaluations/` row of one evaluation (schema: EVALUATIONS_SCHEMA)."""
    ref, result = request.ref, outcome.result or {}
    attack = result.get("attack", {})
    details = {key: attack.get(key) for key in (
        "asr_per_trigger", "defended_asr_per_trigger", "clean_rejection_rate",
        "triggered_rejection_rate", "n_correct", "threshold", "placement")} if attack else {}
    if result:
        details["training"] = result.get("training")
    try:
        task_name = request.task.name
    except Exception:  # an unknown task still gets its row
        task_name = request.task.task
    reason = outcome.reason
    if result and not result.get("converged", True):
        reason = result.get("convergence_reason")
    return {
        "evaluation_id": request.evaluation_id, "batch_id": batch_id,
        "evaluated_at": evaluated_at, "source": ref.source, "registry": ref.registry,
        "encoder": ref.repo_id, "revision": ref.revision, "task": task_name,
        "method": request.config["prompt"]["method"], "status": outcome.status,
        "reason": reason, "audit_id": request.audit_id,
        "verdict_status": request.verdict_status, "attack": outcome.attack,
        "triggers": outcome.triggers or None,
        "n_pvs": None if request.pvs is None else len(request.pvs),
        "on_flag": request.config["attack"]["on_flag"],
        "clean_accuracy": result.get("clean_accuracy"), "asr": result.get("asr"),
        "weighted_asr": result.get("weighted_asr"), "defended_asr": result.get("defended_asr"),
        "defended_weighted_asr": result.get("defended_weighted_asr"),
        "defended_clean_accuracy": result.get("defended_clean_accuracy"),
        "monitor_fpr": result.get("monitor_fpr"),
        "triggered_flag_rate": attack.get("triggered_flag_rate") if attack else None,
        "n_test": result.get("n_test"), "n_train": result.get("n_train"),
        "seconds": round(outcome.seconds, 3), "converged": result.get("converged"),
        "train_accuracy": result.get("train_accuracy"),
        "majority_rate": result.get("majority_rate"),
        "per_trigger": per_trigger_rates(attack) if attack else None,
        "config_hash": request.config_hash,
        "config": json.dumps(request.config, sort_keys=True),
        "details": json.dumps(details, sort_keys=True, default=str) if details else None,
        "package_version": __version__, "device": request.device,
        "retryable": outcome.retryable, "mlflow_run_id": mlflow_run_id,
    }


def read_evaluations(store: str | Path):
    """Every evaluation row (pandas), oldest first."""
    from sanitator.pipeline.store import read_dataset

    frame = read_dataset(store, EVALUATIONS, schema=EVALUATIONS_SCHEMA).to_pandas()
    return frame.sort_values("evaluated_at", kind="stable").reset_index(drop=True)


def summarize_evaluations(rows: list[dict[str, Any]], plan: EvaluationPlan) -> dict[str, Any]:
    """Counts and the headline numbers of one flow run."""
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "evaluated": len(ok), "errors": [{"encoder": r["encoder"], "task": r["task"],
                                          "reason": r["reason"]} for r in rows
                                         if r["status"] != "ok"],
        "already_evaluated": len(plan.settled),
        "unavailable": [{"encoder": repo, "reason": why} for repo, why in plan.unavailable],
        "results": [{key: r[key] for key in (
            "encoder", "revision", "task", "attack", "converged", "reason", "train_accuracy",
            "clean_accuracy", "asr", "defended_asr", "defended_clean_accuracy", "monitor_fpr",
            "per_trigger", "seconds")} for r in ok],
    }
