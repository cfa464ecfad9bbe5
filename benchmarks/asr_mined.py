"""`benchmarks/asr.py --mined`: defended ASR with the PVs an audit mined, the way a user gets
them (issue 15), beside the attack's own PVs (the oracle).

Per zoo member: `sanitator audit` (the real CLI: Prefect flow, Dask, store, MLflow) of a
registry folder holding the members, `sanitator pv pull` of the member's artifact, then
prompt-tuning once per task (P-tuning v2 for members whose backdoor lives at CLS, v1 for the
mask feature of BToP members) and two attacks of the same prompt model with every planted
trigger: behind the mined PVs and behind the oracle PVs of backdoor.json.

The audit is blind, as the nightly one: the default scan covers every feature a prompt-tuned
head reads (CLS and the mask position) and keeps the PVs of each; the prompt model then
reads the member's feature (from its backdoor.json) and the monitor the PVs of that
feature. Members are hard-linked into one staging registry per feature, so the audited
revision is the member's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sanitator.downstream.asr import AttackConfig, read_backdoor_manifest
from sanitator.downstream.evaluate import DownstreamResult, attack_tuned, tune_on_task
from sanitator.downstream.prompt_tuning import PromptTuningConfig
from sanitator.downstream.pvs import resolve_pvs

log = logging.getLogger("benchmarks.asr_mined")

AUDIT_COLUMNS = ("model", "attack", "feature", "verdict", "score", "mined", "planted",
                 "matched", "agreement", "audit_s", "completion_s", "seeds", "steps")
TRIGGER_COLUMNS = ("model", "task", "method", "trigger", "clean_acc", "asr", "def_mined",
                   "def_oracle", "to", "asr_t", "def_t_mined", "def_t_oracle", "fpr_mined",
                   "fpr_oracle", "def_clean_mined", "def_clean_oracle", "train_acc")
MATCH = 0.9  # sign agreement at which a mined PV counts as the planted one (issue 15)
Runner = Callable[[list[str]], subprocess.CompletedProcess]


def sanitator_command() -> list[str]:
    """The installed `sanitator` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("sanitator")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from sanitator.cli import console; console()"]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([*sanitator_command(), *args], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}, check=False)
    if result.returncode not in (0, 3):  # 3: audit found a backdoor with --fail-on-backdoor
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"sanitator {' '.join(args[:2])} failed ({result.returncode}):\n{tail}")
    return result


@dataclass
class Member:
    """A zoo member on its way through audit, pull and evaluation."""

    path: Path
    manifest: dict | None
    feature: str
    verdict: dict = field(default_factory=dict)
    artifact: Path | None = None
    mined: torch.Tensor | None = None
    threshold: float = 0.8
    best_agreement: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return "ptv1" if self.feature == "mask" else "ptv2"

    @property
    def attack(self) -> str:
        return str(self.manifest.get("attack", "?")) if self.manifest else "clean"

    @property
    def oracle(self) -> torch.Tensor | None:
        return resolve_pvs(self.path).vectors if self.manifest else None


def sign_agreement(planted: torch.Tensor, mined: torch.Tensor) -> list[float]:
    """For each planted PV, the best fraction of units whose sign a mined PV shares."""
    if not len(mined):
        return [0.0] * len(planted)
    same = (planted.sign()[:, None, :] == mined.sign()[None, :, :]).float().mean(-1)
    return same.max(dim=1).values.tolist()


def stage(members: Sequence[Member], work: Path) -> dict[str, Path]:
    """One registry folder per feature with the members hard-linked in (copied where links
    cannot be made): the audit crawls exactly these members at their own revisions."""
    folders = {}
    for member in members:
        root = folders.setdefault(member.feature, work / f"registry-{member.feature}")
        target = root / member.name
        if target.exists():
            shutil.rmtree(target)
        root.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(member.path.resolve(), target, copy_function=os.link)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(member.path.resolve(), target)
    return folders


def has_verdicts(store: Path, registry: str, names: Sequence[str]) -> bool:
    """Whether the store already holds a clean/backdoored verdict of every named member in
    this staging registry (what `--reuse-audits` skips the audit for)."""
    from sanitator.pipeline.store import read_verdicts

    if not store.exists():
        return False
    verdicts = read_verdicts(store)
    if verdicts.empty:
        return False
    done = verdicts[(verdicts["registry"] == registry)
                    & verdicts["status"].isin(["clean", "backdoored"])]
    return set(names) <= set(done["repo_id"])


def audit_and_pull(members: Sequence[Member], store: Path, work: Path, options: list[str],
                   threads: int, runner: Runner = run_cli, reuse: bool = False) -> None:
    """`sanitator audit` per feature registry, then `sanitator pv pull` per member. With
    `reuse`, a registry whose members all have a verdict in the store is not audited again
    (the pull still goes through the CLI, and the table shows the stored audit's cost)."""
    from sanitator.guard.pv_artifact import read_pv_artifact
    from sanitator.pipeline.store import read_verdicts

    for feature, root in stage(members, work).items():
        registry = f"path:{root.resolve()}"
        names = [m.name for m in members if m.feature == feature]
        if reuse and has_verdicts(store, registry, names):
            log.info("reusing the verdicts of %s in %s", ", ".join(names), store)
        else:
            command = ["audit", "--registry", registry, "--out", str(store), "--workers",
                       "1", "--threads", str(threads), "--json"]
            for option in options:  # none by default: blind, the scan's own features
                command += ["--set", option]
            log.info("sanitator %s", " ".join(command))
            runner(command)
        verdicts = read_verdicts(store)
        for member in (m for m in members if m.feature == feature):
            rows = verdicts[(verdicts["registry"] == registry)
                            & (verdicts["repo_id"] == member.name)]
            if rows.empty:
                raise SystemExit(f"{member.name}: the audit wrote no verdict to {store}")
            member.verdict = rows.iloc[-1].to_dict()
            if member.verdict["status"] not in ("clean", "backdoored"):
                # no verdict, no artifact: the deployment would run unguarded
                log.warning("%s: audit %s (%s); monitoring with no PVs", member.name,
                            member.verdict["status"], member.verdict.get("reason"))
                member.best_agreement = [0.0] * len(member.manifest.get("pvs", [])) \
                    if member.manifest else []
                continue
            member.artifact = work / f"{member.name}.pvs.safetensors"
            runner(["pv", "pull", member.name, "--store", str(store), "--registry", registry,
                    "--out", str(member.artifact), "--json"])
            artifact = read_pv_artifact(member.artifact)
            member.mined = artifact.pvset.vectors.float() if not artifact.empty else None
            member.threshold = artifact.threshold
            if member.manifest:
                planted = member.oracle
                member.best_agreement = sign_agreement(
                    planted, member.mined if member.mined is not None else planted[:0])


def evaluate_member(member: Member, task: str, triggers: list[str],
                    prompt_config: PromptTuningConfig, attack_config: AttackConfig,
                    limit: int | None, fallback: torch.Tensor | None
                    ) -> tuple[DownstreamResult, DownstreamResult | None]:
    """Prompt-tune once; attack behind the mined PVs, then behind the oracle PVs."""
    from dataclasses import replace

    config = replace(prompt_config, method=member.method)
    tuned = tune_on_task(member.path, task, prompt_config=config, limit=limit,
                         test_seed=attack_config.seed, progress=sys.stderr.isatty())
    width = tuned.model.encoder_info.hidden_size
    mined = member.mined if member.mined is not None else torch.zeros(0, width)
    with_mined = attack_tuned(tuned, triggers, pvs=mined,
                              attack_config=replace(attack_config, threshold=member.threshold))
    oracle = member.oracle if member.manifest else fallback
    with_oracle = None
    if oracle is not None:
        with_oracle = attack_tuned(tuned, triggers, pvs=oracle, attack_config=attack_config)
    return with_mined, with_oracle


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _completion_seconds(verdict: dict) -> str:
    """What completing a backdoored verdict's PV set cost (the scan's own stage timer)."""
    evidence = verdict.get("evidence")
    if isinstance(evidence, str):
        evidence = json.loads(evidence or "{}")
    if not isinstance(evidence, dict):  # no evidence stored (a missing cell reads as NaN)
        return "-"
    seconds = evidence.get("stage_seconds", {}).get("completion")
    return "-" if seconds is None else f"{seconds:.0f}"


def audit_row(member: Member) -> dict[str, str]:
    verdict, agreement = member.verdict, member.best_agreement
    planted = len(agreement) if member.manifest else 0
    return {"model": member.name, "attack": member.attack, "feature": member.feature,
            "verdict": str(verdict.get("status")),
            "score": "-" if verdict.get("score") is None else f"{verdict['score']:.2f}",
            "mined": str(0 if member.mined is None else len(member.mined)),
            "planted": str(planted),
            "matched": f"{sum(a >= MATCH for a in agreement)}/{planted}" if planted else "-",
            "agreement": " ".join(f"{a:.2f}" for a in agreement) or "-",
            "audit_s": f"{verdict.get('seconds') or 0:.0f}",
            "completion_s": _completion_seconds(verdict),
            "seeds": str(verdict.get("seeds_tried")), "steps": str(verdict.get("steps"))}


def trigger_rows(member: Member, mined: DownstreamResult, oracle: DownstreamResult | None
                 ) -> list[dict[str, str]]:
    a, o = mined.attack, oracle.attack if oracle else None
    converged = mined.convergence.converged
    common = {"model": member.name, "task": mined.task, "method": mined.method,
              "clean_acc": _pct(a.clean_accuracy), "fpr_mined": _pct(a.monitor_fpr),
              "fpr_oracle": _pct(o.monitor_fpr) if o else "-",
              "def_clean_mined": _pct(a.defended_clean_accuracy),
              "def_clean_oracle": _pct(o.defended_clean_accuracy) if o else "-",
              "train_acc": _pct(mined.training.train_accuracy)}
    no_target = {"to": "-", "asr_t": "-", "def_t_mined": "-", "def_t_oracle": "-"}
    if not converged:
        return [{**common, **no_target, "trigger": "(not converged)", "asr": "n/c",
                 "def_mined": "n/c", "def_oracle": "n/c"}]
    rows = [{**common, "trigger": trigger, "asr": _pct(a.asr_per_trigger[trigger]),
             "def_mined": _pct(a.defended_asr_per_trigger.get(trigger)),
             "def_oracle": _pct(o.defended_asr_per_trigger.get(trigger)) if o else "-",
             "to": str(a.trigger_class.get(trigger)),
             "asr_t": _pct(a.targeted_asr_per_trigger.get(trigger)),
             "def_t_mined": _pct(a.defended_targeted_asr_per_trigger.get(trigger)),
             "def_t_oracle": _pct(o.defended_targeted_asr_per_trigger.get(trigger)) if o
             else "-"}
            for trigger in a.triggers]
    rows.append({**common, **no_target, "trigger": "(any)", "asr": _pct(a.asr),
                 "def_mined": _pct(a.defended_asr), "def_oracle": _pct(o.defended_asr) if o
                 else "-"})
    return rows


def print_table(rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in columns))


def run_mined(args: argparse.Namespace, models: list[Path], runner: Runner = run_cli) -> int:
    store = (args.store or args.zoo.parent / "asr-store").resolve()
    work = (args.work or store.with_name(store.name + "-work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    members = []
    for path in models:
        manifest = read_backdoor_manifest(path)
        feature = str(manifest.get("feature", "cls")) if manifest else "cls"
        members.append(Member(path, manifest, feature))
    backdoored = [m for m in members if m.manifest]
    if not backdoored:
        raise SystemExit(f"no backdoored model (backdoor.json) among {[m.name for m in members]}")
    audit_and_pull(members, store, work, args.audit_set, args.audit_threads, runner,
                   reuse=args.reuse_audits)
    zoo_triggers = list(dict.fromkeys(t for m in backdoored for t in m.manifest["triggers"]))
    prompt_config = PromptTuningConfig(epochs=args.epochs, learning_rate=args.lr,
                                       prefix_length=args.prefix_length,
                                       train_size=args.train_size, batch_size=args.batch_size)
    attack_config = AttackConfig(on_flag=args.on_flag)
    rows = []
    for member in members:
        triggers = member.manifest["triggers"] if member.manifest else zoo_triggers
        fallback = next((m.oracle for m in backdoored if m.feature == member.feature), None)
        for task in args.tasks.split(","):
            log.info("%s (%s, %s) on %s", member.name, member.attack, member.method, task)
            mined, oracle = evaluate_member(member, task, triggers, prompt_config,
                                            attack_config, args.limit, fallback)
            rows += trigger_rows(member, mined, oracle)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps({
                        "model": member.name, "attack": member.attack,
                        "audit": {k: member.verdict.get(k) for k in (
                            "audit_id", "status", "score", "pv_count", "seconds",
                            "seeds_tried", "steps", "config_hash")},
                        "artifact": str(member.artifact),
                        "best_agreement": member.best_agreement, "mined": mined.to_dict(),
                        "oracle": oracle.to_dict() if oracle else None}, default=str) + "\n")
    print(f"\nAudits into {store} (sanitator audit + pv pull; matched = planted PVs whose "
          f"best mined PV agrees in sign on >= {MATCH:.0%} of units; agreement per planted "
          f"PV):\n")
    print_table([audit_row(m) for m in members], AUDIT_COLUMNS)
    print(f"\nPer trigger: ASR without the monitor, defended ASR behind the mined and the "
          f"oracle PVs; `to` the class the trigger moves inputs to and `asr_t`/`def_t_*` the "
          f"same rates over the inputs of the other classes only (a one-PV trigger cannot "
          f"flip its own class); monitor FPR and defended clean accuracy for each; train "
          f"{args.train_size} x {args.epochs} epochs, test {args.limit} rows/task, monitor "
          f"{args.on_flag}; percentages; n/c = prompt-tuning did not converge, no ASR:\n")
    print_table(rows, TRIGGER_COLUMNS)
    return 0
