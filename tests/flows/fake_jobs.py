"""A stand-in evaluation job for flow tests that need control over time: its runs do no
prompt-tuning. Importable by Dask workers (LocalCluster workers inherit the test's sys.path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sanitator.downstream.evaluation_job import EvaluationJob
from sanitator.downstream.runs import EvaluationOutcome


@dataclass
class InstantEvaluationJob(EvaluationJob):
    """An encoder whose repo id holds `stuck` never returns (one long uninterruptible sleep,
    like a stuck C call); any other gets an `ok` outcome at once."""

    def run(self, request, *, work_dir=None):
        if "stuck" in request.ref.repo_id:
            time.sleep(600)
        return EvaluationOutcome("ok", result={"clean_accuracy": 0.9, "n_test": 10},
                                 attack="none", triggers=["cf"])
