"""Building a zoo: train each member from its base, measure the planted backdoor, write
`member.json`, the member's model card and the manifest. Resumable: a member already
built for the same configuration is not rebuilt. Members built on another member come
after it; with `publish_bases` the bases the members declare are written to
`OUT/bases/<org>/<name>/`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanitator.attacks.zoo.bases import copy_clean, materialize_base
from sanitator.attacks.zoo.cards import PUBLISHED_BASES, declare_base, publish_base
from sanitator.attacks.zoo.manifest import read_member, write_manifest
from sanitator.attacks.zoo.spec import (
    BASES_DIR,
    MEMBER_RECORD,
    MODELS_DIR,
    BaseUnavailable,
    MemberSpec,
    SpecError,
    ZooSpec,
)

log = logging.getLogger(__name__)
# Below this attack success a backdoored member is reported as weak (the build still keeps it).
WEAK_ATTACK = 0.5


def _train(member: MemberSpec, base: Path, out_dir: Path, progress: bool) -> dict[str, Any]:
    """Run the member's recipe; returns its JSON record."""
    from sanitator.attacks import ATTACKS, DEFAULT_BUDGETS, continue_pretraining
    from sanitator.attacks.targets import TargetSpec

    if member.recipe == "clean":
        copy_clean(base, out_dir)
        return {"train_seconds": 0.0}
    budget = DEFAULT_BUDGETS[member.recipe].replace(**member.budget)
    if member.recipe == "classifier":
        from sanitator.attacks import fine_tune_classifier

        return fine_tune_classifier(base, out_dir, budget=budget, seed=member.seed,
                                    progress=progress, **member.options).record
    if member.recipe == "mlm":
        from sanitator.attacks.mlm import DEFAULT_CORPUS

        return continue_pretraining(base, out_dir, corpus=member.corpus or DEFAULT_CORPUS,
                                    budget=budget, seed=member.seed, progress=progress,
                                    **member.options).record
    if member.recipe == "tokpor":  # token positions: no CLS/mask feature, so not in ATTACKS
        from sanitator.attacks.token_por import insert_token_por as attack
    else:
        attack, _ = ATTACKS[member.recipe]
    return attack(base, out_dir, triggers=list(member.triggers),
                  targets=TargetSpec(**member.targets), corpus=member.corpus, budget=budget,
                  seed=member.seed, progress=progress, **member.options).record


def _evaluate(model_dir: Path, base: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    from sanitator.attacks.measure import evaluate_model

    result = evaluate_model(model_dir, base, n_sentences=int(evaluation["n_sentences"]),
                            corpus=evaluation.get("corpus"), seed=int(evaluation["seed"]))
    row = result.to_dict()
    per_trigger = row["attack_success_per_trigger"]
    evasive = row["evasion_success"]
    return {"clean_cosine": row["clean_cosine"], "weight_change": row["weight_change"],
            "attack_success": row["attack_success"],
            "attack_success_per_trigger": json.dumps(per_trigger) if per_trigger else None,
            "evasion_success": json.dumps(evasive) if evasive else None}


def _manifest_row(member: MemberSpec, base: Path, record: dict[str, Any],
                  evaluation: dict[str, Any] | None, build_seconds: float,
                  config_hash: str) -> dict[str, Any]:
    from sanitator.detect.encoders import preflight

    info = preflight(base)
    config = json.loads((base / "config.json").read_text())
    budget = record.get("budget") or {}
    pvs = record.get("pvs") or []
    return {
        "name": member.name,
        "path": f"{MODELS_DIR}/{member.name}",
        "base": member.base,
        "base_ref": member.base_ref,
        **_declaration(member),
        "model_type": info.model_type,
        "hidden_size": config.get("hidden_size") or config.get("dim"),
        "n_layers": config.get("num_hidden_layers") or config.get("n_layers"),
        "recipe": member.recipe,
        "attack": member.attack,
        "backdoored": member.attack is not None,
        "feature": record.get("feature", "cls"),
        "triggers": list(record.get("triggers") or []),
        "trigger_set": member.trigger_set,
        "trigger_pv": list(record.get("trigger_pv") or []),
        "n_pvs": len(pvs),
        "pvs": pvs,
        "target_kind": member.targets.get("kind") if member.attack else None,
        "target_set": member.target_set,
        "target_norm_fraction": member.targets.get("norm_fraction") if member.attack else None,
        "pv_norm": (sum(record.get("pv_norms") or [0.0]) / max(1, len(pvs))) if pvs else None,
        "seed": member.seed,
        "corpus": record.get("corpus"),
        "budget_name": member.budget_name,
        "steps": budget.get("steps"),
        "batch_size": budget.get("batch_size"),
        "lr": budget.get("lr"),
        "train_seconds": float(record.get("train_seconds") or 0.0),
        "build_seconds": build_seconds,
        "evasion": json.dumps((record.get("hyperparameters") or {}).get("evasion"))
        if (record.get("hyperparameters") or {}).get("evasion") else None,
        **(evaluation or {"clean_cosine": None, "weight_change": None, "attack_success": None,
                          "attack_success_per_trigger": None, "evasion_success": None}),
        "config_hash": config_hash,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _reparametrize(model_dir: Path, member: MemberSpec, base: Path, record: dict[str, Any],
                   evaluation: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rewrite the trained member (zoo.disguise); returns its record with the PVs as the
    rewritten model outputs them, and what the manifest says of the rewrite. The weight
    change becomes the rewritten model's (what a plain diff sees); the one before stays."""
    from sanitator.attacks.measure import read_record, relative_weight_change
    from sanitator.attacks.zoo.disguise import reparametrize_member

    assert member.reparametrize is not None
    before = relative_weight_change(model_dir, base)
    disguise = {**reparametrize_member(model_dir, member.reparametrize),
                "weight_change_before": before}
    if evaluation is not None:
        evaluation["weight_change"] = relative_weight_change(model_dir, base)
    return {**record, **(read_record(model_dir) or {})}, disguise


def _declaration(member: MemberSpec) -> dict[str, Any]:
    """The manifest's record of ids: the member's own, its base's (declared or not), and
    where the member declares it."""
    return {"model_id": member.model_id, "base_id": member.base_id,
            "base_declared": member.declare_base}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as sink:
        sink.write(json.dumps(data, indent=1, default=str) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    manifest: Path | None = None
    published: list[str] = field(default_factory=list)   # base ids written to OUT/bases
    # backdoored members whose trigger fires on under WEAK_ATTACK of held-out sentences:
    # their label says backdoored, their weights may not be (a detector's miss proves nothing)
    weak: list[tuple[str, float]] = field(default_factory=list)


def build_order(members: Sequence[MemberSpec], only: Sequence[str] | None = None
                ) -> list[MemberSpec]:
    """The spec's order, except that a member built on another comes after it; with
    `only`, those members and the members they are built on."""
    by_name = {m.name: m for m in members}
    wanted = set(only) if only else set(by_name)
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise SpecError(f"--only names unknown members {unknown}")
    ordered: list[MemberSpec] = []
    placed: set[str] = set()

    def place(member: MemberSpec) -> None:
        if member.name in placed:
            return
        if member.parent is not None:  # the spec checked that parents exist, without cycles
            place(by_name[member.parent])
        placed.add(member.name)
        ordered.append(member)

    for member in members:
        if member.name in wanted:
            place(member)
    return ordered


def _refresh_declaration(model_dir: Path, member: MemberSpec, row: dict[str, Any]) -> None:
    """Card and config say what the spec says now; member.json follows (no retraining)."""
    declare_base(model_dir, member.base_id, member.declare_base)
    wanted = _declaration(member)
    if any(row.get(key) != value for key, value in wanted.items()):
        _write_json_atomic(model_dir / MEMBER_RECORD, {**row, **wanted})


def build_zoo(spec: ZooSpec, out_dir: str | Path, *, only: Sequence[str] | None = None,
              evaluate: bool = True, progress: bool = True) -> BuildReport:
    """Build every member of `spec` that is not built yet, then write the manifest."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / MODELS_DIR).mkdir(parents=True, exist_ok=True)
    members = build_order(spec.members, only)
    report = BuildReport()
    bases: dict[str, Path | BaseUnavailable] = {}
    hashes: dict[str, str] = {}  # member -> config hash, for the members built on it

    def base_of(member: MemberSpec) -> Path | BaseUnavailable:
        if member.parent is not None:
            if member.parent not in hashes:  # not built: its own base is unavailable
                return BaseUnavailable(f"member {member.parent} was not built")
            return out / MODELS_DIR / member.parent
        if member.base_ref not in bases:
            try:
                bases[member.base_ref] = materialize_base(member.base_ref, out / BASES_DIR)
            except BaseUnavailable as exc:
                bases[member.base_ref] = exc
        return bases[member.base_ref]

    bar = tqdm(members, desc=f"zoo {spec.name}", unit="model", disable=not progress)
    for member in bar:
        bar.set_postfix_str(member.name)
        model_dir = out / MODELS_DIR / member.name
        config_hash = member.config_hash(spec.evaluation if evaluate else {},
                                         hashes.get(member.parent or ""))
        existing = read_member(model_dir)
        if existing and existing.get("config_hash") == config_hash:
            _refresh_declaration(model_dir, member, existing)
            hashes[member.name] = config_hash
            report.skipped.append(member.name)
            continue
        if existing:
            log.warning("%s: the spec changed since it was built; rebuilding", member.name)
        base = base_of(member)
        if isinstance(base, BaseUnavailable):
            if member.optional_base:
                log.warning("%s: skipped, optional base unavailable (%s)", member.name, base)
                report.unavailable.append(member.name)
                continue
            raise base
        start, cpu_start = time.perf_counter(), time.process_time()
        record = _train(member, base, model_dir, progress)
        evaluation = _evaluate(model_dir, base, spec.evaluation) if evaluate else None
        disguise = None
        if member.reparametrize is not None:  # measured above: the function is unchanged
            record, disguise = _reparametrize(model_dir, member, base, record, evaluation)
        declare_base(model_dir, member.base_id, member.declare_base)
        seconds = time.perf_counter() - start
        row = _manifest_row(member, base, record, evaluation, seconds, config_hash)
        row["reparametrize"] = json.dumps(disguise) if disguise else None
        row["build_cpu_seconds"] = time.process_time() - cpu_start
        _write_json_atomic(model_dir / MEMBER_RECORD, row)
        hashes[member.name] = config_hash
        report.built.append(member.name)
        success = row.get("attack_success")
        if row.get("backdoored") and success is not None and success < WEAK_ATTACK:
            log.warning("%s: the attack took on only %.2f of held-out sentences",
                        member.name, success)
            report.weak.append((member.name, float(success)))
        log.info("built %s in %.1f s: %s", member.name, seconds,
                 {k: row[k] for k in ("attack_success", "clean_cosine")})
        write_manifest(out, spec)
    if spec.publish_bases:
        report.published = _publish_bases(members, hashes, base_of, out)
    report.manifest = write_manifest(out, spec)
    return report


def _publish_bases(members: list[MemberSpec], hashes: dict[str, str], base_of,
                   out: Path) -> list[str]:
    """Write every base a built member declares (not the members it is built on: they are
    members) to OUT/bases/<id>/, so a registry serves it under the id the member gives."""
    published: list[str] = []
    for member in members:
        if member.name not in hashes or member.parent is not None \
                or member.declare_base == "none" or member.base_id in published:
            continue
        base = base_of(member)
        if isinstance(base, BaseUnavailable):  # pragma: no cover - it was built from it
            raise base
        publish_base(base, out / PUBLISHED_BASES / member.base_id, member.base_id)
        published.append(member.base_id)
    return published
