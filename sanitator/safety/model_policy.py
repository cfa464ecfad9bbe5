"""What an audited model may be, decided without loading it: one source for every rule.

The planner applies these rules to a registry's listing before any download
(`sanitator.pipeline.audit.rejection_from_listing`), the preflight to the fetched folder
(`sanitator.safety.preflight`), the crawlers to the config.json they peek into, and the revision
digest of folders to the files the scan reads. Everything an audited repo holds is
attacker-controlled: nothing here trusts a type, a size or a path it did not check, and
every refusal is a `ModelRejected` with a plain reason (stdlib only; no torch import).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanitator.core.status import Status

# model_type (config.json) -> family; every one has a fast tokenizer and accepts inputs_embeds.
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({
    "bert", "roberta", "xlm-roberta", "albert", "deberta-v2", "electra", "distilbert", "mpnet",
})
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files a fast tokenizer is built from (one is needed), and the ones that configure it.
TOKENIZER_SOURCES = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "spiece.model",
                     "sentencepiece.bpe.model")
TOKENIZER_FILES = (*TOKENIZER_SOURCES, "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# Every file the scan reads: what a fetch downloads and what a folder's revision digests.
SCAN_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", *TOKENIZER_FILES, "*.spm", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json",
)
PICKLE_FILE_PATTERNS: tuple[str, ...] = (
    "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
)

# Byte limits on what is parsed in memory (real files are far smaller: a config is a few
# KB, the largest multilingual tokenizer.json tens of MB).
MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000   # the safetensors reference implementation's own limit
MAX_TOKENIZER_BYTES = 512 << 20
# Config sizes beyond these are refused before anything is built (ALBERT shares its layer
# weights, so only this bound stops `num_hidden_layers: 1000000` there).
SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 4_000_000), "hidden_size": (1, 65_536),
    "num_hidden_layers": (1, 256), "num_attention_heads": (1, 1_024),
    "intermediate_size": (1, 1_048_576), "max_position_embeddings": (1, 1_048_576),
    "type_vocab_size": (0, 1_024), "embedding_size": (1, 65_536),
    "num_hidden_groups": (1, 256), "inner_group_num": (1, 256),
    "dim": (1, 65_536), "n_layers": (1, 256), "n_heads": (1, 1_024),
    "hidden_dim": (1, 1_048_576),
}
FLOAT_DTYPE_NAMES = frozenset({"float32", "float16", "bfloat16", "float64", "auto"})


class ModelRejected(Exception):
    """The model cannot be audited. `status` is `unsupported`, `error` or `skipped`;
    `reason` says why in plain words."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # two parsers that keep different duplicates would see different files
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_json(data: bytes | str, what: str) -> Any:
    """JSON from untrusted bytes; any failure (bad UTF-8, syntax, duplicate keys, NaN,
    nesting deep enough to exhaust the parser's recursion) is a ModelRejected error."""
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_constant=refuse_constant)
    except RecursionError:
        raise ModelRejected(Status.ERROR, f"{what} is nested too deeply to parse") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelRejected(Status.ERROR, f"{what} is not valid JSON ({short(exc)})") from None


def read_json_file(path: Path, what: str, max_bytes: int) -> Any:
    """Parse a JSON file of at most `max_bytes` (checked before reading it)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelRejected(Status.ERROR, f"{what} is {size:,} bytes, over the limit of "
                            f"{max_bytes:,}")
    return parse_json(path.read_bytes(), what)


def short(value: Any, limit: int = 300) -> str:
    """A value for a reason string: printable, one line, bounded."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)


# --- config.json ------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigFacts:
    """The fields of config.json that decide what the audit does, type-checked."""

    model_type: str | None
    architectures: tuple[str, ...]


def config_facts(config: Any, what: str = "config.json") -> ConfigFacts:
    """model_type and architectures, or a ModelRejected error naming the bad field."""
    if not isinstance(config, dict):
        raise ModelRejected(Status.ERROR, f"{what} is {type_name(config)}, not a JSON object")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelRejected(Status.ERROR, f"{what}: model_type is {type_name(model_type)} "
                            f"({short(model_type, 60)}), not a string")
    architectures = config.get("architectures")
    if architectures is None:
        architectures = []
    if not isinstance(architectures, list) or not all(isinstance(a, str)
                                                      for a in architectures):
        raise ModelRejected(Status.ERROR, f"{what}: architectures must be a list of strings, got "
                            f"{type_name(architectures)} ({short(architectures, 60)})")
    return ConfigFacts(model_type or None, tuple(architectures))


def architecture_rejection(facts: ConfigFacts) -> tuple[str, str] | None:
    """`unsupported` for a model_type the scan does not handle."""
    if facts.model_type in SUPPORTED_MODEL_TYPES:
        return None
    arch = ",".join(facts.architectures) or "unknown architecture"
    named = f"model_type={short(facts.model_type, 60)!r}" if facts.model_type else \
        "no model_type in config.json"
    return (Status.UNSUPPORTED, f"unsupported architecture: {named} ({short(arch, 120)}); "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")


def check_config_fields(config: dict[str, Any]) -> None:
    """Types of the size fields, dtype and quantisation, before anything reads them (a
    wrong type is refused here, not deep inside transformers)."""
    if config.get("quantization_config") is not None:
        raise ModelRejected(Status.UNSUPPORTED, "quantized weights (config.json "
                            "quantization_config) are not supported")
    for name in SIZE_BOUNDS:
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelRejected(Status.ERROR, f"config.json: {name} is {type_name(value)} "
                                f"({short(value, 60)}), not an integer")
    for name in ("dtype", "torch_dtype"):
        value = config.get(name)
        if value is not None and not (isinstance(value, str) and value in FLOAT_DTYPE_NAMES):
            raise ModelRejected(Status.ERROR, f"config.json: {name} {short(value, 60)!r} is not "
                                f"one of {', '.join(sorted(FLOAT_DTYPE_NAMES))}")


def check_config_bounds(config: dict[str, Any]) -> None:
    """Sizes beyond SIZE_BOUNDS are refused before a model of that size is sketched
    (call after check_config_fields: the values are integers)."""
    for name, (low, high) in SIZE_BOUNDS.items():
        value = config.get(name)
        if isinstance(value, int) and not low <= value <= high:
            raise ModelRejected(Status.ERROR, f"config.json: {name}={value:,} is outside "
                                f"[{low:,}, {high:,}]")


def listing_config(raw: Any) -> dict[str, Any] | None:
    """What a crawler records of a repo's config.json (ModelRef.config): model_type and
    architectures when their types are right, else `invalid` with the reason."""
    if raw is None:
        return None
    try:
        facts = config_facts(raw)
    except ModelRejected as exc:
        return {"model_type": None, "architectures": None, "invalid": exc.reason}
    return {"model_type": facts.model_type, "architectures": list(facts.architectures)}


def read_listing_config(path: Path) -> dict[str, Any] | None:
    """`listing_config` of a config.json on disk; None when absent, `invalid` when bad."""
    try:
        if not path.is_file():
            return None
        return listing_config(read_json_file(path, "config.json", MAX_CONFIG_BYTES))
    except ModelRejected as exc:
        return {"model_type": None, "architectures": None, "invalid": exc.reason}
    except OSError as exc:
        return {"model_type": None, "architectures": None,
                "invalid": f"config.json cannot be read: {short(exc)}"}


# --- weights and size -------------------------------------------------------------------

def weights_format(names: Iterable[str]) -> str | None:
    """`safetensors`, `pickle` or None, from the file names of a model folder."""
    names = set(names)
    if any(name in names for name in SAFETENSORS_FILES):
        return "safetensors"
    if any(name in names for name in PICKLE_FILES):
        return "pickle"
    return None


def weights_rejection(names: Iterable[str], allow_pickle: bool) -> tuple[str, str] | None:
    """Missing weights, or pickle-only weights when pickle is not allowed."""
    found = weights_format(names)
    if found is None:
        return (Status.ERROR, "no weights (model.safetensors or pytorch_model.bin) in the folder")
    if found == "pickle" and not allow_pickle:
        return (Status.ERROR, "only pickle weights (pytorch_model.bin); refusing to unpickle an "
                "audited model. Convert it to safetensors, or allow pickle explicitly "
                "(--allow-pickle), which loads with torch.load(weights_only=True)")
    return None


def size_rejection(n_params: int | None, max_params: int | None) -> tuple[str, str] | None:
    if max_params is None or n_params is None or n_params <= max_params:
        return None
    return (Status.SKIPPED, f"{n_params:,} parameters exceed the size limit of {max_params:,}")


def listed_size_rejection(weight_bytes: int, max_params: int | None) -> tuple[str, str] | None:
    """The size limit from listed byte counts: at most 4 bytes per parameter (fp32), so
    bytes / 4 is a lower bound on the parameter count."""
    if max_params is None or weight_bytes // 4 <= max_params:
        return None
    return (Status.SKIPPED, f"weights of {weight_bytes:,} bytes hold more than {max_params:,} "
            "parameters (the size limit); not fetched")


def scan_file_patterns(allow_pickle: bool) -> list[str]:
    return list(SCAN_FILE_PATTERNS) + (list(PICKLE_FILE_PATTERNS) if allow_pickle else [])


def is_scan_file(name: str) -> bool:
    """Does the scan read a file of this name (pickle weights included)?"""
    return any(fnmatch.fnmatchcase(name, pattern)
               for pattern in (*SCAN_FILE_PATTERNS, *PICKLE_FILE_PATTERNS))
