"""Clean references for every audited model, resolved through the registry that served
it (docs/pipeline.md, "References"). The scan diffs a model against a clean base it
derives from (docs/method.md, 1b); this module finds those bases.

In the flow process, before the plan: `registries/describe.py` records each crawled
ref's declared bases and shape facts and adds the declared bases the listing lacks (they
are audited too); `resolve_catalog(entries)` pins the configured Hub bases
(`--reference hf:ORG/NAME`).

In the plan (`plan_references`, no I/O), per model to audit, candidates by source:
`declared` (a declared base audited clean earlier, or audited first in this flow: the
request then waits for the base's row), `sibling` (a sibling the store holds a clean
verdict for), `siblings` (the median of a few preselected siblings), `configured` (the
catalog), and a log of what was and was not used and why. `finalize` runs when the
request is dispatched, once the bases' rows are in: a declared base vouches only when it
was audited clean, since a backdoor shared by base and derivative would cancel out.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sanitator.core.status import Status
from sanitator.pipeline.registries import ModelRef
from sanitator.pipeline.registries.cards import same_shapes
from sanitator.pipeline.registries.describe import label, match_listed
from sanitator.safety.model_policy import short

log = logging.getLogger(__name__)

# Siblings fetched per model for the median (it needs MIN_SIBLINGS): a registry of 500
# fine-tunes of one base must not fetch 500 models per audit. Every model of a family
# gets the same ranking, so a machine fetches at most SIBLINGS_FETCHED + 1 per family.
SIBLINGS_FETCHED = 4
MIN_SIBLINGS = 3
SINGLE_SIBLINGS = 2        # clean-audited siblings, each its own candidate
SIZE_TOLERANCE = 0.01      # weight bytes of siblings (one dtype): within 1 %


@dataclass(frozen=True)
class PlannedReference:
    """A candidate as planned: plain data for the worker, which fetches `refs` (through
    the registry that served them), preflights them and hands the scan a
    `sanitator.detect.reference.ReferenceCandidate`."""

    source: str                      # declared | sibling | siblings | configured
    refs: tuple[ModelRef, ...]
    note: str = ""
    waits_for: str | None = None     # the request id of a base audited in this flow


@dataclass
class ReferencePlan:
    candidates: list[PlannedReference]
    waits_for: list[tuple[str, str, str]]   # ref keys of bases audited first in this flow
    log: dict[str, Any]


def key_text(key: tuple[str, str, str]) -> str:
    return "\0".join(key)


# --- planning ---------------------------------------------------------------------------

def _verdicts(history: Iterable[Mapping[str, Any]], config_hash: str
              ) -> tuple[dict[tuple, str], set[tuple]]:
    """(key -> status under this config, every key ever audited backdoored)."""
    same: dict[tuple, str] = {}
    backdoored: set[tuple] = set()
    for row in history:
        key = (row["source"], row["repo_id"], row["revision"])
        if row["status"] == Status.BACKDOORED:
            backdoored.add(key)
        if row["config_hash"] == config_hash and same.get(key) != Status.BACKDOORED:
            same[key] = row["status"]   # one backdoored row is enough to stop vouching
    return same, backdoored


def _weight_bytes(ref: ModelRef) -> int | None:
    sizes = [size for name, size in ref.files if name.endswith(".safetensors")]
    return sum(sizes) if sizes and None not in sizes else None


def _close_in_size(a: ModelRef, b: ModelRef) -> bool:
    x, y = _weight_bytes(a), _weight_bytes(b)
    return x is None or y is None or abs(x - y) <= SIZE_TOLERANCE * max(x, y)


def plan_references(todo: list[ModelRef], refs: list[ModelRef],
                    history: Iterable[Mapping[str, Any]], refused: Mapping[tuple, str],
                    config_hash: str, catalog: Iterable[ModelRef] = (),
                    catalog_problems: Mapping[str, str] | None = None
                    ) -> dict[tuple, ReferencePlan]:
    """The reference plan of every ref in `todo`, by ref key. `refs`: everything crawled
    (described); `refused`: key -> reason of the refs the plan settles without an audit."""
    clean_or_not, backdoored = _verdicts(history, config_hash)
    todo_keys = {ref.key for ref in todo}
    listed: dict[str, list[ModelRef]] = defaultdict(list)
    for ref in refs:
        listed[ref.registry].append(ref)
    # declared bases are fetched for their derivatives anyway: first among siblings
    bases = {base.key for ref in todo for item in ref.extra.get("declared") or ()
             if (base := match_listed(item["id"], listed[ref.registry])) is not None}
    state = _State(clean_or_not, backdoored, todo_keys, dict(refused), bases)
    catalog = list(catalog)
    plans = {ref.key: _plan_one(ref, listed[ref.registry], state, catalog,
                                dict(catalog_problems or {})) for ref in todo}
    _break_cycles(plans)
    return plans


def _break_cycles(plans: dict[tuple, ReferencePlan]) -> None:
    """Bases that declare each other (A's card names B, B's names A) cannot both come
    first: the wait that would close a cycle is dropped, and the base is not used."""
    accepted: dict[tuple, list[tuple]] = defaultdict(list)

    def reaches(start: tuple, goal: tuple) -> bool:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(accepted[node])
        return False

    for key, plan in plans.items():
        for base in list(plan.waits_for):
            if not reaches(base, key):
                accepted[key].append(base)
                continue
            plan.waits_for.remove(base)
            plan.candidates = [c for c in plan.candidates if c.waits_for != key_text(base)]
            for entry in plan.log["declared"]:
                if entry.get("revision") == base[2] and entry.get("status"):
                    del entry["status"]
                    entry["skipped"] = "the bases declare each other (a cycle)"


@dataclass
class _State:
    verdicts: dict[tuple, str]     # this config's settled statuses
    backdoored: set[tuple]         # audited backdoored under any config
    todo: set[tuple]
    refused: dict[tuple, str]
    bases: set[tuple]              # somebody's declared base


def _declared(ref: ModelRef, listed: list[ModelRef], state: _State
              ) -> tuple[list[PlannedReference], list[tuple], list[dict], bool]:
    """Declared candidates, the bases to wait for, the log, and whether a base vouches
    already (audited clean earlier)."""
    candidates, waits, entries, vouched = [], [], [], False
    shape = ref.extra.get("shape")
    for item in ref.extra.get("declared") or ():
        entry = dict(item)
        entries.append(entry)
        if "missing" in entry:
            entry["skipped"] = entry.pop("missing")
            continue
        base = match_listed(entry["id"], listed)
        if base is None:
            entry["skipped"] = f"not in {ref.registry}"
            continue
        entry["revision"] = base.revision
        if base.key == ref.key:
            entry["skipped"] = "names the audited model itself"
        elif not same_shapes(shape, base.extra.get("shape"), fewer_layers=True):
            entry["skipped"] = "not the same architecture and shapes (config.json)"
        elif base.key in state.refused:
            entry["skipped"] = f"the base was not audited: {state.refused[base.key]}"
        elif base.key in state.verdicts:
            status = state.verdicts[base.key]
            if status == Status.CLEAN:
                entry["status"] = "audited clean earlier"
                candidates.append(PlannedReference("declared", (base,), entry["from"]))
                vouched = True
            else:
                entry["skipped"] = f"the base was audited {status}"
        elif base.key in state.todo:
            entry["status"] = "audited first in this flow"
            # the job turns the key into the base's request id (audit_job.py)
            candidates.append(PlannedReference("declared", (base,), entry["from"],
                                               waits_for=key_text(base.key)))
            waits.append(base.key)
        else:
            entry["skipped"] = "the base has no verdict"
    return candidates, waits, entries, vouched


def _siblings(ref: ModelRef, listed: list[ModelRef], state: _State
              ) -> tuple[list[PlannedReference], dict[str, Any]]:
    shape = ref.extra.get("shape")
    if not shape:
        return [], {"skipped": "no shape facts (config.json unread or incomplete)"}
    pool = [o for o in listed if o.key != ref.key and not o.crawl_error
            and o.key not in state.refused
            and o.key not in state.backdoored and same_shapes(shape, o.extra.get("shape"))
            and _close_in_size(ref, o)]
    size = _weight_bytes(ref)

    def rank(o: ModelRef):
        other = _weight_bytes(o)
        return (state.verdicts.get(o.key) != Status.CLEAN, o.key not in state.bases,
                0 if size is None or other is None else abs(size - other), o.repo_id,
                o.revision)

    pool.sort(key=rank)
    clean = [o for o in pool if state.verdicts.get(o.key) == Status.CLEAN][:SINGLE_SIBLINGS]
    out = [PlannedReference("sibling", (o,), "audited clean earlier") for o in clean]
    median = pool[:SIBLINGS_FETCHED]
    entry: dict[str, Any] = {"compatible": len(pool), "clean": [label(o) for o in clean]}
    if len(median) >= MIN_SIBLINGS:
        out.append(PlannedReference("siblings", tuple(median),
                                    f"median of {len(median)} of {len(pool)} siblings"))
        entry["median_of"] = [label(o) for o in median]
    else:
        entry["median"] = f"{len(pool)} sibling(s), fewer than {MIN_SIBLINGS}"
    return out, entry


def _plan_one(ref: ModelRef, listed: list[ModelRef], state: _State,
              catalog: list[ModelRef], catalog_problems: dict[str, str]) -> ReferencePlan:
    declared, waits, entries, vouched = _declared(ref, listed, state)
    log_: dict[str, Any] = {"declared": entries}
    if ref.extra.get("describe_error"):
        log_["describe_error"] = ref.extra["describe_error"]
    candidates = list(declared)
    if vouched:
        log_["siblings"] = {"skipped": "a declared base vouches"}
    else:
        # planned even while a declared base is still being audited: `finalize` drops
        # them (unfetched) when the base comes back clean
        siblings, log_["siblings"] = _siblings(ref, listed, state)
        candidates += siblings
    configured = []
    for base in catalog:
        if same_shapes(ref.extra.get("shape"), base.extra.get("shape"), fewer_layers=True):
            candidates.append(PlannedReference("configured", (base,), "catalog"))
            configured.append({"id": base.repo_id, "revision": base.revision})
        else:
            configured.append({"id": base.repo_id, "revision": base.revision,
                               "skipped": "not the same architecture and shapes"})
    configured += [{"id": entry, "skipped": why} for entry, why in catalog_problems.items()]
    if configured:
        log_["configured"] = configured
    return ReferencePlan(candidates, waits, log_)


def finalize(candidates: tuple[PlannedReference, ...], log_: Mapping[str, Any],
             rows: Mapping[str, Mapping[str, Any] | None]
             ) -> tuple[tuple[PlannedReference, ...], dict[str, Any]]:
    """At dispatch: keep a declared base audited in this flow only when its row is clean;
    once a declared base vouches, the siblings are not fetched."""
    entries = [dict(e) for e in log_.get("declared", ())]
    kept = []
    for candidate in candidates:
        if candidate.waits_for is None:
            kept.append(candidate)
            continue
        row = rows.get(candidate.waits_for) or {}
        base = candidate.refs[0]
        entry = next((e for e in entries if e.get("revision") == base.revision
                      and match_listed(e["id"], [base]) is not None), {})
        entry.pop("status", None)
        status = row.get("status")
        if status == Status.CLEAN:
            kept.append(dataclasses.replace(candidate, waits_for=None))
            entry["status"] = "audited clean in this flow"
            continue
        why = f"the base was audited {status} in this flow" if status else \
            "the base's audit left no row"
        reason = row.get("reason")
        entry["skipped"] = why + (f" ({short(reason, 160)})" if reason else "")
    out = {**log_, "declared": entries}
    if any(c.source == "declared" for c in kept) and \
            any(c.source in {"sibling", "siblings"} for c in kept):
        kept = [c for c in kept if c.source not in {"sibling", "siblings"}]
        out["siblings"] = {**out.get("siblings", {}),
                           "not_fetched": "a declared base audited clean vouches"}
    # a base just audited backdoored is no sibling either
    bad = {(r["source"], r["repo_id"], r["revision"]) for r in rows.values()
           if r and r.get("status") == Status.BACKDOORED}
    if bad:
        kept = [_without(c, bad, out) for c in kept]
        kept = [c for c in kept if c is not None]
    return tuple(kept), out


def _without(candidate: PlannedReference, bad: set[tuple], log_: dict[str, Any]
             ) -> PlannedReference | None:
    if candidate.source not in {"sibling", "siblings"} or \
            not any(r.key in bad for r in candidate.refs):
        return candidate
    refs = tuple(r for r in candidate.refs if r.key not in bad)
    dropped = [label(r) for r in candidate.refs if r.key in bad]
    siblings = log_["siblings"] = dict(log_.get("siblings", {}))
    siblings["dropped"] = [*siblings.get("dropped", []), *dropped]
    if candidate.source == "sibling" or len(refs) < MIN_SIBLINGS:
        return None
    return dataclasses.replace(candidate, refs=refs,
                               note=f"median of {len(refs)} siblings")
