"""Downstream evaluation: prompt-tune tasks on a frozen encoder, check convergence, attack
with the backdoor's triggers, measure ASR with and without the monitor; the weekly
evaluation's rows (`runs`) and MLflow runs (`tracking`).
"""

from sanitator.core.lazy import lazy_exports

_EXPORTS = {
    "AttackConfig": "asr",
    "EvaluationOutcome": "runs",
    "EvaluationRequest": "runs",
    "PromptTuningConfig": "prompt_tuning",
    "TaskSpec": "tasks_data",
    "evaluate_attack": "asr",
    "evaluate_downstream": "evaluate",
    "get_task": "tasks_data",
    "load_task": "tasks_data",
    "plan_evaluations": "runs",
    "run_evaluation": "runs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
