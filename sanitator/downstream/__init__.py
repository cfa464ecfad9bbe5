"""Downstream evaluation: prompt-tune tasks on a frozen encoder, check convergence, attack
with the backdoor's triggers, measure ASR with and without the monitor; the weekly
evaluation's rows (`runs`), job (`evaluation_job`) and MLflow runs (`tracking`); where
the monitor's PVs come from (`pvs.resolve_pvs`).
"""

from sanitator.core.lazy import lazy_exports

_EXPORTS = {
    "AttackConfig": "asr",
    "EvaluationJob": "evaluation_job",
    "EvaluationOutcome": "runs",
    "EvaluationRequest": "runs",
    "PromptTuningConfig": "prompt_tuning",
    "ResolvedPVs": "pvs",
    "TaskSpec": "tasks_data",
    "evaluate_attack": "asr",
    "evaluate_downstream": "evaluate",
    "get_task": "tasks_data",
    "load_task": "tasks_data",
    "plan_evaluations": "runs",
    "resolve_pvs": "pvs",
    "run_evaluation": "runs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
