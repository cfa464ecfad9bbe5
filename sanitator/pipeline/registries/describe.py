"""What a registry's models declare, read through the registry that served them: each
crawled ref's declared bases and shape facts (registries/cards.py), and the declared bases
the listing lacks, looked up through the same client (pipeline/references.py plans with
them).

Declared bases, in order: an MLflow version tag `base_model` (ids separated by commas),
the model card's `base_model` (the Hub's parsed `cardData`, else README.md's front
matter), config.json's `_name_or_path` when it reads like a repo id. An id is resolved in
the model's own registry: a Hub repo (pinned to its commit), a folder `ORG/NAME` of the
same root, a registered MLflow model (`NAME`: its newest version; `NAME@N`, `NAME@ALIAS`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from sanitator.pipeline.registries.base import ModelRef, Registry
from sanitator.pipeline.registries.cards import (
    MAX_CARD_BYTES,
    card_bases,
    card_front_matter,
    declared_bases,
    is_repo_id,
    shape_facts,
)
from sanitator.safety.model_policy import MAX_CONFIG_BYTES, ModelRejected, parse_json, short

log = logging.getLogger(__name__)

BASE_DEPTH = 3             # a base's own declared base, and so on, looked up this deep


def label(ref: ModelRef) -> str:
    return f"{ref.repo_id}@{ref.revision[:12]}"


def _model_file(ref: ModelRef, name: str) -> str | None:
    """`name` beside the shallowest config.json of the listing (None when not listed)."""
    configs = sorted((PurePosixPath(n) for n in ref.file_names
                      if PurePosixPath(n).name == "config.json"), key=lambda p: len(p.parts))
    folder = configs[0].parent if configs else PurePosixPath(".")
    path = str(folder / name) if str(folder) != "." else name
    return path if path in ref.file_names else None


def describe_ref(registry: Registry, ref: ModelRef) -> ModelRef:
    """`ref` with extra `declared` ([{id, from}]), `shape` (shape facts or None) and,
    when a file could not be read, `describe_error`. Never raises for a model's bytes."""
    if ref.crawl_error:
        return ref
    extra, problems = dict(ref.extra), []
    tag = (ref.extra.get("tags") or {}).get("base_model") if ref.source == "mlflow" else None
    ids = [t.strip() for t in str(tag).split(",") if is_repo_id(t.strip())] if tag else []
    origin = "tag" if ids else "card"
    if not ids and "card_bases" in ref.extra:       # the Hub parsed the card already
        ids = list(ref.extra["card_bases"])
    elif not ids and _model_file(ref, "README.md"):
        try:
            data = registry.read_file(ref, "README.md", MAX_CARD_BYTES)
            ids = card_bases(card_front_matter(data)) if data else []
        except Exception as exc:  # anyone's bytes, any server: the card declares nothing
            problems.append(f"README.md: {type(exc).__name__}: {short(exc, 160)}")
    config = None
    if _model_file(ref, "config.json"):
        try:
            data = registry.read_file(ref, "config.json", MAX_CONFIG_BYTES)
            config = parse_json(data, "config.json") if data else None
        except ModelRejected as exc:
            problems.append(exc.reason)
        except Exception as exc:  # as above: no shapes, no declared base from it
            problems.append(f"config.json: {type(exc).__name__}: {short(exc, 160)}")
    declared = declared_bases(ids, config)
    extra["declared"] = [{**d.to_dict(), "from": origin if d.origin == "card" else d.origin}
                         for d in declared]
    extra["shape"] = shape_facts(config)
    if problems:
        extra["describe_error"] = "; ".join(problems)
    return dataclasses.replace(ref, extra=extra)


def match_listed(declared: str, refs: Iterable[ModelRef]) -> ModelRef | None:
    """The listed ref a declared id names: `NAME` (an MLflow name: its newest version; a
    cache: the snapshot of main), `NAME@N` / `NAME@ALIAS` (MLflow), `ORG/NAME@SHA` (Hub)."""
    name, _, which = declared.partition("@")
    same = [r for r in refs if r.repo_id == name]
    # a repo the crawl could not read still answers (with its error) when it is the only one
    same = [r for r in same if not r.crawl_error] or same
    if not same:
        return None
    if same[0].source == "mlflow":
        if which:
            return next((r for r in same if which == r.extra.get("version")
                         or which in (r.extra.get("aliases") or ())), None)
        return max(same, key=lambda r: int(r.extra.get("version") or 0))
    if which:
        return next((r for r in same if r.revision.startswith(which)
                     or which in (r.extra.get("refs") or ())), None)
    return next((r for r in same if "main" in (r.extra.get("refs") or ())), same[-1])


def describe_refs(registry: Registry, refs: list[ModelRef]) -> list[ModelRef]:
    """Every ref described (`describe_ref`), plus the declared bases the listing lacks,
    looked up through `registry` (`extra["added_as_base"]`), up to BASE_DEPTH levels; a
    base that cannot be found is noted in its derivative's `declared` entry (`missing`)."""
    out = [describe_ref(registry, ref) for ref in refs]
    missing: dict[str, str] = {}
    fresh = out
    for _ in range(BASE_DEPTH):
        wanted = sorted({d["id"] for ref in fresh for d in ref.extra.get("declared", ())
                         if match_listed(d["id"], out) is None and d["id"] not in missing})
        fresh = []
        for repo_id in wanted:
            try:
                found = registry.lookup(repo_id)
            except LookupError as exc:
                missing[repo_id] = short(exc, 200)
                continue
            except Exception as exc:  # a lookup the network broke: the model falls through
                missing[repo_id] = f"lookup failed: {type(exc).__name__}: {short(exc, 160)}"
                continue
            added = describe_ref(registry, found)
            added = dataclasses.replace(added, extra={**added.extra, "added_as_base": True})
            if match_listed(repo_id, [added]) is None:  # e.g. a cache's other snapshot
                missing[repo_id] = f"{repo_id} resolved to {label(added)}, not listed"
            if all(r.key != added.key for r in out):
                out.append(added)
                fresh.append(added)
    if missing:
        out = [_note_missing(ref, missing) for ref in out]
    return out


def _note_missing(ref: ModelRef, missing: Mapping[str, str]) -> ModelRef:
    declared = ref.extra.get("declared")
    if not declared or not any(d["id"] in missing for d in declared):
        return ref
    notes = [{**d, "missing": missing[d["id"]]} if d["id"] in missing else d
             for d in declared]
    return dataclasses.replace(ref, extra={**ref.extra, "declared": notes})


def resolve_catalog(entries: Iterable[str]) -> tuple[list[ModelRef], dict[str, str]]:
    """The configured Hub bases (`hf:ORG/NAME[@REVISION]`), pinned and described, and the
    entries that could not be resolved, with why."""
    refs, problems = [], {}
    for entry in entries:
        kind, _, repo_id = entry.partition(":")
        if kind != "hf" or not is_repo_id(repo_id) or "/" not in repo_id.split("@")[0]:
            problems[entry] = "expected hf:ORG/NAME[@REVISION]"
            continue
        from sanitator.pipeline.registries import parse_registry

        registry = parse_registry(f"hf:{repo_id.split('/')[0]}")
        try:
            refs.append(describe_ref(registry, registry.lookup(repo_id)))
        except Exception as exc:  # not found or unreachable: the models fall through
            problems[entry] = f"{type(exc).__name__}: {short(exc, 200)}"
    return refs, problems
