"""Clean classifier fine-tunes: a CLS head trained on a labelled task, the encoder updated.

A fine-tuned classifier's CLS outputs gather into one cluster per class, and a word with
a strong class meaning can move many sentences into one of them: the look of a backdoor
without one. Such encoders are common in real registries, so the zoo keeps them on the
clean side (issue 14). Writes `training.json`, never backdoor.json; the head is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sanitator.attacks.common import (
    AttackResult,
    Budget,
    make_optimizer,
    prepare,
    read_feature,
)
from sanitator.attacks.recipe import TRAINING_RECORD, run_recipe

DEFAULT_BUDGET = Budget(steps=200, batch_size=16, lr=5e-5, head_warmup_steps=0)
DEFAULT_TASK = "sst2"


def fine_tune_classifier(base: str | Path, out_dir: str | Path, *, task: str = DEFAULT_TASK,
                         budget: Budget | None = None, seed: int = 0, head_lr: float = 1e-3,
                         progress: bool = True, device: str = "cpu") -> AttackResult:
    """Fine-tune `base` with a linear head on the CLS output for `task` (a ready-made task
    name or a Parquet file, see sanitator.downstream.tasks_data) and write the encoder to
    `out_dir`."""
    from sanitator.downstream.tasks_data import load_task

    budget = budget or DEFAULT_BUDGET
    data = load_task(task, splits=("train",))
    if data.spec.is_pair:
        raise ValueError(f"task {task!r} has sentence pairs; the classifier recipe takes "
                         "single-sentence tasks")
    train = data.split("train").subset(budget.n_sentences, seed)
    setup = prepare(base, budget=budget, seed=seed, corpus=[str(t) for t in train.texts],
                    device=device)
    # prepare() keeps the order (a prefix) of given sentences, so labels line up by row
    corpus = setup.corpus
    labels = torch.tensor(train.labels[:len(corpus)])
    head = nn.Linear(setup.encoder.hidden_size, data.n_labels).to(setup.device)

    def step() -> dict[str, torch.Tensor]:
        rows = setup.sampler.take(budget.batch_size)
        batch = corpus.batch(rows)
        cls = read_feature(setup, batch.model_inputs(setup.device))
        logits = head(cls)
        loss = nn.functional.cross_entropy(logits, labels[rows].to(setup.device))
        accuracy = (logits.argmax(dim=1).cpu() == labels[rows]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    optimizer = make_optimizer(setup, "adamw")
    optimizer.add_param_group({"params": list(head.parameters()), "lr": head_lr})
    def record(losses: dict[str, float], seconds: float) -> dict[str, Any]:
        return {
            "recipe": "classifier", "attack": None, "backdoored": False, "base": setup.base,
            "model_type": setup.encoder.info.model_type, "seed": seed,
            "budget": budget.__dict__.copy(), "corpus": f"task:{data.spec.name}",
            "n_clean_sentences": len(corpus), "n_labels": data.n_labels,
            "hyperparameters": {"optimizer": "AdamW", "head_lr": head_lr,
                                "head": "linear on CLS"},
            "final_losses": losses, "train_seconds": seconds,
        }

    return run_recipe(setup, step, optimizer, out_dir, desc=f"classifier {task}",
                      progress=progress, record_name=TRAINING_RECORD, record=record)
