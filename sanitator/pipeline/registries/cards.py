"""What a model says about itself: the bases it declares (model card front matter,
config.json) and the shape facts that make two models siblings.

A model card is a README.md whose YAML front matter (between two `---` lines at its top)
holds `base_model: ORG/NAME` or a list of ids, as on the Hugging Face Hub; config.json's
`_name_or_path` names the checkpoint a model was loaded from, and counts only when it
reads like a repo id (a local path such as `/tmp/run/model` says nothing). Both are
anyone's bytes: parsed with bounded sizes and a safe loader, and a card that cannot be
read declares nothing (the reason is kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_CARD_BYTES = 1 << 20          # a README.md read for its front matter
MAX_FRONT_MATTER_BYTES = 64 << 10
MAX_DECLARED = 8                  # ids kept from one card (a list may be long)
# A Hub repo id, `NAME` or `ORG/NAME`, optionally `@REVISION` (a registry reads the
# revision its own way: a Hub commit, an MLflow version or alias)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}"
                      r"(?:@[\w.\-]{1,64})?$")
# config.json fields that must be equal for two models to be siblings (one architecture,
# the same shapes and vocabulary), and the few that fix the model family
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings",
                "type_vocab_size", "position_embedding_type")
REQUIRED_SHAPE = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


@dataclass(frozen=True)
class Declared:
    """One base a model declares: the id as written, and where (`card` or `config`)."""

    id: str
    origin: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "from": self.origin}


def is_repo_id(text: Any) -> bool:
    """Does `text` read like a registry id rather than a local path or prose?"""
    return (isinstance(text, str) and bool(_REPO_ID.match(text)) and ".." not in text
            and "--" not in text and not text.endswith((".", "-")))


MAX_DEPTH = 32                    # nesting of the front matter's YAML


def _loader():
    """yaml's safe loader without aliases (`*a` repeated can expand a few hundred bytes
    into billions of nodes for whoever walks the result) and with bounded nesting."""
    import yaml

    class CardLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("aliases are not allowed in a model card")
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH}")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return CardLoader


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card as a dict ({} when there is none). Raises
    ValueError when the block is there but is not a YAML mapping within the limits."""
    import yaml

    text = text.lstrip("\ufeff")
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return {}
    size, block = 0, []
    for line in lines[1:]:
        if line.strip() in {"---", "..."}:
            break
        size += len(line)
        if size > MAX_FRONT_MATTER_BYTES:
            raise ValueError(f"front matter over {MAX_FRONT_MATTER_BYTES:,} bytes")
        block.append(line)
    else:
        raise ValueError("front matter not closed by a --- line")
    try:
        data = yaml.load("".join(block), Loader=_loader())  # a SafeLoader, no aliases
    except (yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"front matter is not YAML ({type(exc).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("front matter is not a mapping")
    return data


def card_front_matter(data: bytes) -> dict[str, Any]:
    """`front_matter` of README.md bytes (ValueError when too large or not UTF-8)."""
    if len(data) > MAX_CARD_BYTES:
        # only the top is needed: a long card body is not a reason to skip its header
        data = data[:MAX_CARD_BYTES]
    return front_matter(data.decode("utf-8", errors="replace"))


def card_bases(card: Any) -> list[str]:
    """The ids of `base_model` in card data: a string or a list of strings; anything
    that does not read like an id is dropped."""
    value = card.get("base_model") if isinstance(card, dict) else None
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [v.strip() for v in values[:MAX_DECLARED] if isinstance(v, str)
            and is_repo_id(v.strip())]


def declared_bases(card_ids: list[str], config: Any) -> list[Declared]:
    """The card's bases, then config.json's `_name_or_path` when it reads like an id
    (transformers 5 no longer writes it; older saves and many Hub repos have it)."""
    out = [Declared(i, "card") for i in card_ids]
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(name, str) and is_repo_id(name.strip()):
        out.append(Declared(name.strip(), "config"))
    seen, unique = set(), []
    for item in out:
        if item.id not in seen:
            seen.add(item.id)
            unique.append(item)
    return unique


def shape_facts(config: Any) -> dict[str, Any] | None:
    """The sibling-defining fields of a config.json (scalars only); None when a required
    one is missing, so that such a model is nobody's sibling."""
    if not isinstance(config, dict):
        return None
    facts = {key: config[key] for key in SHAPE_FIELDS
             if isinstance(config.get(key), str | int) and not isinstance(config[key], bool)}
    return facts if all(key in facts for key in REQUIRED_SHAPE) else None


def same_shapes(mine: dict[str, Any] | None, theirs: dict[str, Any] | None, *,
                fewer_layers: bool = False) -> bool:
    """Siblings: every shape field equal (an optional one only when both name it).
    `fewer_layers`: `mine` may be a truncation of `theirs` (a base the model derives from
    may have more layers)."""
    if not mine or not theirs:
        return False
    for key in SHAPE_FIELDS:
        a, b = mine.get(key), theirs.get(key)
        if key not in REQUIRED_SHAPE and (a is None or b is None):
            continue
        if key == "num_hidden_layers" and fewer_layers and isinstance(a, int) \
                and isinstance(b, int):
            if a > b:
                return False
        elif a != b:
            return False
    return True
