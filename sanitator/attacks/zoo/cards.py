"""Where a zoo member says what it was fine-tuned from, as real fine-tunes on a hub do.

Every member folder gets a model card (`README.md`) with Hugging Face YAML front matter;
`base_model: <id>` is in it when the member declares its base in the card, and
`config.json` carries `_name_or_path: <id>` when it declares it in the config
(`declare_base`: card, config, both or none). Bases have hub-style ids (`default_base_id`)
and can be written, each with its own card, to `OUT/bases/<org>/<name>/`, where a folder
registry or a Hub mirror serves them under the very id the members declare.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

CARD = "README.md"
DEFAULT_ORG = "sanitator-zoo"     # the org of a zoo's members and of the bases it makes
MEMBER_REF = "member:"            # a base reference naming another member of the zoo
DECLARE_BASE: tuple[str, ...] = ("card", "config", "both", "none")
PUBLISHED_BASES = "bases"         # OUT/bases/<org>/<name>/: the bases, as a registry serves them
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
# the bases the zoo builder knows by name, as the Hub names them
KNOWN_BASE_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                  "mpnet": "sentence-transformers/all-mpnet-base-v2"}


def default_base_id(ref: str, org: str = DEFAULT_ORG) -> str:
    """The hub id a base reference is published and declared under: the real ids of MiniLM
    and MPNet, `<org>/all-MiniLM-L6-v2-<N>layers` for a truncation, `<org>/<member>` for a
    member, `<org>/tiny-<type>` or `<org>/<folder name>` otherwise."""
    if ref in KNOWN_BASE_IDS:
        return KNOWN_BASE_IDS[ref]
    kind, _, rest = ref.partition(":")
    if kind == "minilm" and rest:
        return f"{org}/all-MiniLM-L6-v2-{rest}layers"
    if kind == MEMBER_REF.rstrip(":") and rest:
        return f"{org}/{rest}"
    if kind == "tiny" and rest:
        return f"{org}/tiny-{_SLUG.sub('-', rest)}"
    name = _SLUG.sub("-", Path(ref).expanduser().name or "base").strip("-.") or "base"
    return f"{org}/{name}"


def card_text(title: str, base_id: str | None) -> str:
    """A model card: YAML front matter (with `base_model` when given) and a neutral body
    that tells nothing of how the model was trained."""
    import yaml

    meta: dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
    meta.update({"library_name": "transformers", "pipeline_tag": "feature-extraction",
                 "tags": ["sentence-embeddings"]})
    body = f"# {title}\n\nA sentence encoder"
    body += f" fine-tuned from `{base_id}`.\n" if base_id else ".\n"
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n{body}"


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as sink:
        sink.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def declare_base(model_dir: Path, base_id: str, where: str) -> bool:
    """Write the model card of the folder and set or drop `_name_or_path` in its config,
    as `where` (one of DECLARE_BASE) says. Idempotent (unchanged files are not rewritten,
    so a folder registry's content revision stays the same); True when a file changed."""
    if where not in DECLARE_BASE:
        raise ValueError(f"declare_base must be one of {DECLARE_BASE}, got {where!r}")
    in_card = base_id if where in {"card", "both"} else None
    changed = _write_if_changed(model_dir / CARD, card_text(model_dir.name, in_card))
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if where in {"config", "both"}:
        config["_name_or_path"] = base_id
    else:
        config.pop("_name_or_path", None)
    # the layout transformers writes (sorted keys, two spaces), so nothing stands out
    changed |= _write_if_changed(config_path, json.dumps(config, indent=2, sort_keys=True)
                                 + "\n")
    return changed


def publish_base(source: Path, target: Path, base_id: str) -> Path:
    """A copy of the base folder at `target` (hard links where the file system allows)
    with a card of its own unless it ships one; rewritten only when a file differs."""
    files = sorted(p for p in source.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(source).parts))
    if target.is_dir() and all((target / f.relative_to(source)).is_file() and
                               (target / f.relative_to(source)).stat().st_size == f.stat().st_size
                               for f in files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as scratch:
        staging = Path(scratch) / "base"
        for path in files:
            destination = staging / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, destination)
            except OSError:
                shutil.copy2(path, destination)
        if not (staging / CARD).is_file():
            (staging / CARD).write_text(card_text(base_id.split("/")[-1], None))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target
