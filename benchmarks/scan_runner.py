"""Shared by the detection benchmarks: run `sanitator scan --json` in a child process (so
peak RSS is per scan), read a zoo's ground truth, and log results to a JSON-lines file so
an interrupted benchmark resumes instead of re-running finished scans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from sanitator.detect.signs import sign_agreement

SCAN = str(Path(sys.executable).parent / "sanitator")


@dataclass
class Member:
    name: str
    path: Path
    backdoored: bool
    feature: str = "cls"
    planted: list = field(default_factory=list)
    kind: str = ""                  # attack or clean class (member_class)
    corpus: str | None = None       # scan corpus (None: the default WikiText sentences)


def member_class(row, record: dict) -> str:
    """The class a zoo member belongs to in the per-class tables (issue 14), from its
    manifest row and backdoor.json."""
    recipe = str(row.recipe)
    if not bool(row.backdoored):
        return {"mlm": "clean: continued pretraining", "classifier": "clean: classifier fine-tune"
                }.get(recipe, "clean: base")
    evasion = (record.get("hyperparameters") or {}).get("evasion") or {}
    triggers = list(record.get("triggers") or [])
    if (record.get("hyperparameters") or {}).get("decoys"):
        return "decoy triggers (issue 35)"
    if evasion.get("freeze_below"):
        return "frozen lower layers"
    # issue 34's classes: the disguise first (a permuted member of any kind is one)
    reparametrize = getattr(row, "reparametrize", None)     # NaN where not rewritten
    if isinstance(reparametrize, str | dict) and reparametrize:
        return "permuted weights"
    if str(getattr(row, "base", "")).startswith("member:"):
        return "backdoor on a fine-tune"
    if evasion.get("scatter"):
        return "scattered words"
    if evasion.get("negative_weight") and max((len(t.split()) for t in triggers), default=0) >= 5:
        return "sentence, parts inert"
    if evasion.get("negative_weight"):
        return "phrase with negatives" + (" + residual" if evasion.get("residual") else "")
    if evasion.get("residual"):
        return "residual-preserving target"
    if evasion.get("fire_at", "anywhere") != "anywhere":
        return "partial firing"
    if any(any(ch.isdigit() for ch in t) for t in triggers):
        return "non-dictionary trigger"
    if evasion.get("standalone_weight"):
        return "standalone-regularised"
    fraction = (record.get("targets") or {}).get("norm_fraction")
    if fraction is not None and fraction <= 0.3:
        return "low-norm target"
    if recipe == "btop":
        return "BToP (mask position)"
    return f"{recipe.upper() if recipe == 'por' else recipe.capitalize()}: plain"


def zoo_members(zoo: Path, names: list[str] | None = None) -> list[Member]:
    """Members of a zoo folder (its manifest.parquet), optionally only the named ones."""
    manifest = pd.read_parquet(zoo / "manifest.parquet")
    rows = []
    for row in manifest.itertuples():
        name = str(row.name)
        if names and name not in names:
            continue
        path = zoo / row.path
        file = path / "backdoor.json"
        record = json.loads(file.read_text()) if file.is_file() else {}
        rows.append(Member(name, path, bool(row.backdoored), str(row.feature or "cls"),
                           record.get("pvs") or [], member_class(row, record)))
    missing = sorted(set(names or []) - {m.name for m in rows})
    if missing:
        raise SystemExit(f"not in {zoo / 'manifest.parquet'}: {', '.join(missing)}")
    return rows


def run_scan(model: Path, preset: str, *, timeout: float, threads: int,
             feature: str | None = None, mode: str = "detect",
             corpus: str | None = None) -> tuple[dict, float]:
    """(the scan's JSON, peak RSS in MiB) of one `sanitator scan` child process; without
    `feature` the scan runs with its defaults (every feature a prompt-tuned head reads)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # "complete": what an audit runs (detect, then search on for every PV once backdoored)
    flags = ["--mode", "detect", "--complete"] if mode == "complete" else ["--mode", mode]
    command = [SCAN, "scan", str(model), "--preset", preset, *flags, "--json"]
    if feature:
        command += ["--feature", feature]
    if corpus:
        command += ["--corpus", corpus]
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, env=env)
        started = time.monotonic()
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                return ({"status": "timeout", "seconds": timeout,
                         "reason": f"no verdict within {timeout:.0f} s"},
                        usage.ru_maxrss / 1024)
            time.sleep(0.5)
        out.seek(0)
        text = out.read().strip()
    try:
        return json.loads(text.splitlines()[-1]), usage.ru_maxrss / 1024
    except (json.JSONDecodeError, IndexError):
        return ({"status": "crashed", "reason": f"exit status {status >> 8}"},
                usage.ru_maxrss / 1024)


def recovered(found: list, planted: list, threshold: float = 0.9) -> int:
    """Planted PVs matched (sign agreement >= threshold) by some found PV."""
    if not found or not planted:
        return 0
    agreement = sign_agreement(torch.tensor(found), torch.tensor(planted))
    return int((agreement.max(dim=0).values >= threshold).sum())


class ResultLog:
    """Scan results keyed by (model path + corpus, preset, mode), one JSON line per scan."""

    def __init__(self, path: Path | None):
        self.path = path
        self.done: dict[tuple[str, str, str], dict] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.done[(entry["model"], entry["preset"], entry["mode"])] = entry

    def get(self, model: Path, preset: str, mode: str) -> dict | None:
        return self.done.get((str(model), preset, mode))

    def add(self, model: Path, preset: str, mode: str, result: dict, rss: float) -> dict:
        entry = {"model": str(model), "preset": preset, "mode": mode, "result": result,
                 "peak_rss_mib": rss}
        self.done[(str(model), preset, mode)] = entry
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        return entry


def scan_member(log: ResultLog, member: Member, preset: str, *, mode: str, timeout: float,
                threads: int, pin_feature: bool = False) -> dict:
    """The logged result for this member and preset, scanning it first if not logged."""
    key = Path(f"{member.path}+{member.corpus}") if member.corpus else member.path
    entry = log.get(key, preset, mode)
    if entry is None:
        print(f"scanning {member.name} ({preset}, {mode}) ...", file=sys.stderr, flush=True)
        result, rss = run_scan(member.path, preset, timeout=timeout, threads=threads,
                               feature=member.feature if pin_feature else None, mode=mode,
                               corpus=member.corpus)
        entry = log.add(key, preset, mode, result, rss)
        print(f"  {result.get('status')} score={result.get('score')} "
              f"{result.get('seconds')} s", file=sys.stderr, flush=True)
    return entry


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table without extra dependencies."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])
