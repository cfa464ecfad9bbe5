"""The ending every recipe shares: train with the recipe's step, then write a standard
Hugging Face folder (safetensors, config, tokenizer) plus its JSON record, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sanitator.attacks.common import (
    AttackResult,
    AttackSetup,
    train_loop,
    trainable_parameters,
)
from sanitator.detect.encoders import Feature

RECORD_FORMAT = 1
BACKDOOR_RECORD = "backdoor.json"
TRAINING_RECORD = "training.json"


def run_recipe(setup: AttackSetup, step: Callable[[], dict[str, torch.Tensor]], optimizer,
               out_dir: str | Path, *, desc: str, progress: bool, record_name: str,
               record: Callable[[dict[str, float], float], dict[str, Any]]) -> AttackResult:
    """Train for the setup's budget, build the record from the final losses and the training
    time, write the model: what POR, NeuBA, BToP, MLM and the classifier all end with."""
    budget = setup.budget
    losses, seconds = timed(lambda: train_loop(step, trainable_parameters(setup), optimizer,
                                               budget.steps, desc=desc, progress=progress,
                                               lr_decay=budget.lr_decay))
    content = record(losses, seconds)
    path = write_model(setup, out_dir, content, record_name)
    return AttackResult(path, content, seconds)


def _package_version() -> str:
    from sanitator import __version__

    return __version__


def write_model(setup: AttackSetup, out_dir: str | Path, record: dict[str, Any],
                record_name: str) -> Path:
    """Save the encoder (safetensors), tokenizer and JSON record; atomic: a folder at
    `out_dir` is always complete."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a zoo is meant to be shared
    try:
        model = setup.model
        model.requires_grad_(False)
        model.save_pretrained(staging, safe_serialization=True)
        setup.tokenizer.save_pretrained(staging)
        full = {"format": RECORD_FORMAT, **record, "sanitator_version": _package_version()}
        (staging / record_name).write_text(json.dumps(full, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def backdoor_record(setup: AttackSetup, attack: str, feature: Feature, losses: dict[str, float],
                    seconds: float, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The backdoor.json content: everything needed to check or rebuild the backdoor."""
    return {
        "attack": attack,
        "backdoored": True,
        "base": setup.base,
        "model_type": setup.encoder.info.model_type,
        "feature": str(feature),
        "triggers": setup.triggers,
        "trigger_token_ids": [setup.trigger_tokens.ids[i, :int(n)].tolist()
                              for i, n in enumerate(setup.trigger_tokens.lengths)],
        "trigger_pv": setup.trigger_pv.tolist(),
        "n_pvs": int(setup.pvs.shape[0]),
        "pvs": setup.pvs.cpu().tolist(),
        "pv_norms": setup.pvs.norm(dim=1).cpu().tolist(),
        "targets": setup.targets,
        "seed": setup.seed,
        "budget": asdict(setup.budget),
        "corpus": setup.corpus_name,
        "n_clean_sentences": len(setup.corpus),
        "hyperparameters": hyperparameters,
        "final_losses": losses,
        "train_seconds": seconds,
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
