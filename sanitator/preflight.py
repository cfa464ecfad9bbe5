"""Preflight: everything checked in a fetched model folder before any model is built.

In order: config.json (type and bounds of every field the audit reads), the architecture,
the weight files (safetensors headers or the safe pickle loader, sharded indexes), the
tokenizer files, then the weights against the config (layer count, tensor names and
shapes, through a skeleton of the model on the `meta` device, which allocates nothing)
and the weight values (no NaN or infinity, not all zero). Every file it reads must be a
regular file inside the model folder (a Hugging Face cache snapshot may link into its
repo's blobs). Any surprise is a `ModelRejected`; nothing else escapes `preflight`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanitator.model_policy import (
    MAX_CONFIG_BYTES,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MAX_TOKENIZER_BYTES,
    PICKLE_FILES,
    SAFETENSORS_FILES,
    TOKENIZER_FILES,
    TOKENIZER_SOURCES,
    ModelRejected,
    architecture_rejection,
    check_config_bounds,
    check_config_fields,
    config_facts,
    parse_json,
    read_json_file,
    short,
    size_rejection,
    type_name,
    weights_rejection,
)

log = logging.getLogger(__name__)

# safetensors dtype -> bytes per element (the reference implementation's byte-sized types)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1,
               "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
               "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}
_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.")
_SHARD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ModelInfo:
    """What a preflight learns from a model folder without building the model."""

    path: Path
    model_type: str
    weights_format: str  # "safetensors" or "pickle"
    weight_bytes: int
    n_params: int | None  # exact: from the safetensors headers or the loaded state dict


@dataclass(frozen=True)
class Inspection:
    info: ModelInfo
    hf_config: Any                 # the transformers config built from the checked dict
    optional_prefixes: tuple[str, ...]  # tensors the checkpoint may lack (the pooler)


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    file: Path


def model_root(folder: Path) -> Path:
    """The folder every read file must resolve into: a cache snapshot links into the
    blobs of its `models--ORG--NAME` folder; any other model stays in its own folder."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def checked_file(folder: Path, name: str, root: Path, max_bytes: int | None = None
                 ) -> Path | None:
    """`folder/name` when it exists: a regular file inside `root`, at most `max_bytes`.
    Links out of the model folder, devices, pipes and folders are refused."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except (OSError, RuntimeError) as exc:
        raise ModelRejected("error", f"{name} cannot be read ({short(exc)})") from None
    if not resolved.is_relative_to(root):
        raise ModelRejected("error", f"{name} links outside the model folder "
                            f"(to {short(resolved, 120)}); refusing to read it")
    if not stat.S_ISREG(info.st_mode):
        raise ModelRejected("error", f"{name} is not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ModelRejected("error", f"{name} is {info.st_size:,} bytes, over the limit of "
                            f"{max_bytes:,}")
    return path


# --- safetensors and indexes ------------------------------------------------------------

def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ModelRejected("error", f"{where}: shape must be a list of at most 8 "
                            f"non-negative integers, got {short(value, 80)}")
    return tuple(value)


def read_safetensors_header(file: Path) -> dict[str, TensorSpec]:
    """Tensor name -> spec, after checking the header as the format defines it: a JSON
    object of {dtype, shape, data_offsets} entries whose byte ranges tile the data."""
    name = file.name
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelRejected("error", f"{name}: corrupt safetensors file (truncated)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ModelRejected("error", f"{name}: corrupt safetensors header (declares "
                                f"{header_len:,} header bytes in a {size:,}-byte file)")
        header = parse_json(handle.read(header_len), f"{name} header")
    if not isinstance(header, dict):
        raise ModelRejected("error", f"{name}: safetensors header is {type_name(header)}, "
                            "not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise ModelRejected("error", f"{name}: __metadata__ must map strings to strings")
    specs: dict[str, TensorSpec] = {}
    ranges: list[tuple[int, int, str]] = []
    for tensor, entry in header.items():
        where = f"{name}: tensor {short(tensor, 80)!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelRejected("error", f"{where} must have exactly dtype, shape and "
                                f"data_offsets, got {short(entry, 80)}")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ModelRejected("error", f"{where}: unknown dtype {short(dtype, 40)!r}")
        shape = _shape(entry["shape"], where)
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ModelRejected("error", f"{where}: data_offsets must be [begin, end] with "
                                f"0 <= begin <= end, got {short(offsets, 80)}")
        declared = math.prod(shape) * DTYPE_BYTES[dtype]  # Python ints: no overflow
        if declared != offsets[1] - offsets[0]:
            raise ModelRejected("error", f"{where}: shape {list(shape)} of {dtype} needs "
                                f"{declared:,} bytes but its offsets span "
                                f"{offsets[1] - offsets[0]:,}")
        specs[tensor] = TensorSpec(dtype, shape, file)
        ranges.append((offsets[0], offsets[1], tensor))
    end = 0
    for begin, stop, tensor in sorted(ranges):
        if begin != end:
            raise ModelRejected("error", f"{name}: tensor {short(tensor, 80)!r} starts at byte "
                                f"{begin:,}, expected {end:,} (overlapping or gapped data)")
        end = stop
    if end != size - 8 - header_len:
        raise ModelRejected("error", f"{name}: the tensors cover {end:,} data bytes but the "
                            f"file holds {size - 8 - header_len:,}")
    return specs


def read_index(path: Path, suffix: str) -> dict[str, str]:
    """Tensor name -> shard file name from a sharded checkpoint's index."""
    index = read_json_file(path, path.name, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelRejected("error", f"{path.name}: no weight_map object (a corrupt index)")
    for tensor, shard in weight_map.items():
        if not (isinstance(shard, str) and _SHARD.fullmatch(shard) and shard.endswith(suffix)
                and shard not in SAFETENSORS_FILES + PICKLE_FILES):
            raise ModelRejected("error", f"{path.name}: tensor {short(tensor, 80)!r} names "
                                f"shard {short(shard, 80)!r}, not a plain *{suffix} file "
                                "name in the model folder")
    return weight_map


def _safetensors_specs(folder: Path, root: Path) -> tuple[dict[str, TensorSpec], list[Path]]:
    single = checked_file(folder, "model.safetensors", root)
    if single is not None:
        return read_safetensors_header(single), [single]
    index_file = checked_file(folder, "model.safetensors.index.json", root)
    weight_map = read_index(index_file, ".safetensors")
    specs: dict[str, TensorSpec] = {}
    files = []
    for shard in sorted(set(weight_map.values())):
        path = checked_file(folder, shard, root)
        if path is None:
            raise ModelRejected("error", f"missing weight shard {shard!r} named by "
                                "model.safetensors.index.json")
        files.append(path)
        for tensor, spec in read_safetensors_header(path).items():
            if tensor in specs:
                raise ModelRejected("error", f"tensor {short(tensor, 80)!r} is in two shards")
            specs[tensor] = spec
    wrong = sorted(t for t in set(specs) | set(weight_map)
                   if t not in specs or weight_map.get(t) != specs[t].file.name)
    if wrong:
        raise ModelRejected("error", f"model.safetensors.index.json and its shards disagree "
                            f"on {len(wrong)} tensor(s), e.g. {short(wrong[0], 80)!r}")
    return specs, files


def _pickle_specs(folder: Path, root: Path) -> tuple[dict[str, TensorSpec], list[Path], dict]:
    """Only with allow_pickle: the restricted unpickler (weights_only=True) refuses any
    object but tensors and plain containers."""
    import torch

    single = checked_file(folder, "pytorch_model.bin", root)
    if single is not None:
        files = [single]
    else:
        index_file = checked_file(folder, "pytorch_model.bin.index.json", root)
        shards = sorted(set(read_index(index_file, ".bin").values()))
        files = [checked_file(folder, shard, root) for shard in shards]
        if None in files:
            raise ModelRejected("error", "a weight shard named by pytorch_model.bin.index.json "
                                "is missing")
    specs: dict[str, TensorSpec] = {}
    tensors: dict[str, Any] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zip errors ...
            raise ModelRejected("error", f"{file.name}: refused by the safe pickle loader "
                                f"({short(exc, 200)})") from None
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ModelRejected("error", f"{file.name} is not a mapping of names to tensors")
        for tensor, value in state.items():
            specs[tensor] = TensorSpec(str(value.dtype), tuple(value.shape), file)
            tensors[tensor] = value
    return specs, files, tensors


# --- weights against the config ---------------------------------------------------------

def _hf_config(config: dict[str, Any], model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # remote code is never run, so its pointers are dropped rather than half-honoured
    values = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
    try:
        return CONFIG_MAPPING[model_type].from_dict(values)
    except Exception as exc:  # transformers validates configs with many exception types
        raise ModelRejected("error", f"config.json is not a valid {model_type} config "
                            f"({type(exc).__name__}: {short(exc, 200)})") from None


def _check_layer_count(config: dict[str, Any], model_type: str, names: list[str]) -> None:
    """The config's layer count against the layers present in the weights, before a
    skeleton of the config's size is built (ALBERT shares layers: bounded, not counted)."""
    if model_type == "albert":
        return
    field = "n_layers" if model_type == "distilbert" else "num_hidden_layers"
    wanted = config.get(field)
    found = len({m.group(1) for name in names if (m := _LAYER.search(name))})
    # no layer at all: the weights are no model of this kind (match_weights says so)
    if isinstance(wanted, int) and found and wanted != found:
        raise ModelRejected("error", f"config.json says {field}={wanted:,} but the weights "
                            f"hold {found} layer(s)")


def _skeleton(hf_config) -> tuple[dict[str, tuple[int, ...]], str, list[str], list[str]]:
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(hf_config, trust_remote_code=False)
    except Exception as exc:  # inconsistent sizes (heads not dividing hidden_size, ...)
        raise ModelRejected("error", f"config.json does not describe a buildable "
                            f"{hf_config.model_type} ({type(exc).__name__}: "
                            f"{short(exc, 200)})") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return (shapes, model.base_model_prefix, list(model._keys_to_ignore_on_load_missing or []),
            list(model._keys_to_ignore_on_load_unexpected or []))


def _renamed(name: str, prefix: str) -> str:
    # what transformers does on load: strip the base-model prefix of a checkpoint saved
    # with a head, and rename legacy LayerNorm gamma/beta
    if prefix and name.startswith(prefix + "."):
        name = name[len(prefix) + 1:]
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias")


def match_weights(specs: dict[str, TensorSpec], hf_config, config: dict[str, Any]
                  ) -> tuple[str, ...]:
    """Refuse weights that are not this config's model: missing tensors (which
    transformers would fill with random values), unknown tensors inside the model's own
    modules, and shapes that disagree. Returns the prefixes that may be absent."""
    expected, prefix, may_miss, may_add = _skeleton(hf_config)
    optional = ("pooler",)  # checkpoints saved from a masked-LM head have none
    found = {_renamed(name, prefix): spec.shape for name, spec in specs.items()}
    missing = [k for k in expected if k not in found and not k.startswith(optional)
               and not any(re.search(p, k) for p in may_miss)]
    if len(missing) == len([k for k in expected if not k.startswith(optional)]):
        raise ModelRejected("error", f"the weights hold none of the {hf_config.model_type} "
                            f"model's tensors (found {len(found)}: "
                            f"{short(', '.join(sorted(found)[:5]), 200)})")
    if missing:
        raise ModelRejected("error", f"{len(missing)} tensor(s) of the model are missing from "
                            f"the weights, e.g. {short(missing[0], 100)}")
    modules = {k.split(".")[0] for k in expected}
    unknown = sorted(k for k in found if k not in expected and k.split(".")[0] in modules
                     and not k.endswith("position_ids")
                     and not any(re.search(p, k) for p in may_add))
    if unknown:
        raise ModelRejected("error", f"the weights hold {len(unknown)} tensor(s) this config's "
                            f"model does not have, e.g. {short(unknown[0], 100)}")
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            sizes = ", ".join(f"{k}={config[k]}" for k in ("vocab_size", "hidden_size", "dim",
                                                             "embedding_size") if k in config)
            raise ModelRejected("error", f"weights disagree with config.json: {key} is "
                                f"{list(found[key])} in the weights but {list(shape)} for "
                                f"the config ({sizes})")
    return optional


def check_values(tensors) -> None:
    """No NaN or infinity anywhere; not every weight matrix zero; word embeddings not all
    zero (such a model gives constant outputs, and a scan of it a meaningless clean)."""
    import torch

    matrices = nonzero = 0
    for name, tensor in tensors:
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            tensor = tensor.float()
        if not bool(torch.isfinite(tensor).all()):
            raise ModelRejected("error", f"tensor {short(name, 100)} holds NaN or infinite "
                                "values")
        zero = not bool(tensor.any())
        if zero and "word_embeddings" in name:
            raise ModelRejected("error", f"tensor {short(name, 100)} is all zeros")
        if tensor.dim() >= 2:
            matrices += 1
            nonzero += not zero
    if matrices and not nonzero:
        raise ModelRejected("error", "every weight matrix is all zeros")


def _safetensors_values(files: list[Path]):
    """(name, tensor) one at a time, so a whole model never sits in memory twice."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


# (path, size, mtime_ns) of weight files whose values passed: each audit preflights twice
# (the worker, then the loader) and need not read the weights twice
_VALUES_PASSED: set[tuple[str, int, int]] = set()


def _values_key(files: list[Path]) -> tuple:
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


# --- the preflight ----------------------------------------------------------------------

def _check_tokenizer(folder: Path, root: Path) -> None:
    present = [name for name in TOKENIZER_FILES
               if checked_file(folder, name, root, MAX_TOKENIZER_BYTES) is not None]
    if not any(name in present for name in TOKENIZER_SOURCES):
        raise ModelRejected("error", f"no tokenizer: none of {', '.join(TOKENIZER_SOURCES)} "
                            "in the model folder")


def inspect_model(path: str | Path, *, allow_pickle: bool = False,
                  max_params: int | None = None, check_data: bool = True) -> Inspection:
    """Every preflight check; the transformers config to build the model from.
    Raises ModelRejected only."""
    try:
        return _inspect(Path(path), allow_pickle, max_params, check_data)
    except (ModelRejected, ImportError, MemoryError):
        raise  # the last two are the machine's, not the model's: the caller may retry
    except OSError as exc:  # a file vanished or cannot be read mid-check
        raise ModelRejected("error", f"cannot read the model files ({short(exc)})") from None
    except Exception as exc:  # a case no check foresaw: still a row, never a crash
        log.debug("preflight of %s failed", path, exc_info=True)
        raise ModelRejected("error", f"preflight failed ({type(exc).__name__}: "
                            f"{short(exc, 200)})") from None


def _inspect(folder: Path, allow_pickle: bool, max_params: int | None, check_data: bool
             ) -> Inspection:
    if not folder.is_dir():
        raise ModelRejected("error", f"{folder}: not a folder")
    root = model_root(folder)
    config_file = checked_file(folder, "config.json", root)
    if config_file is None:
        raise ModelRejected("error", f"{folder}: no config.json (not a model folder)")
    config = read_json_file(config_file, "config.json", MAX_CONFIG_BYTES)
    facts = config_facts(config)
    rejected = architecture_rejection(facts)
    if rejected:
        raise ModelRejected(*rejected)
    model_type = facts.model_type
    check_config_fields(config)
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise ModelRejected("error", f"{folder}: cannot list the folder ({short(exc)})") from None
    rejected = weights_rejection(names, allow_pickle)
    if rejected:
        raise ModelRejected(*rejected)
    _check_tokenizer(folder, root)
    if "model.safetensors" in names or "model.safetensors.index.json" in names:
        specs, files = _safetensors_specs(folder, root)
        weights_format, values = "safetensors", None
    else:
        specs, files, values = _pickle_specs(folder, root)
        weights_format = "pickle"
    if not specs:
        raise ModelRejected("error", "the weights hold no tensors")
    n_params = sum(math.prod(spec.shape) for spec in specs.values())
    rejected = size_rejection(n_params, max_params)
    if rejected:
        raise ModelRejected(*rejected)
    _check_layer_count(config, model_type, list(specs))
    check_config_bounds(config)
    hf_config = _hf_config(config, model_type)
    optional = match_weights(specs, hf_config, config)
    if check_data and _values_key(files) not in _VALUES_PASSED:
        check_values(values.items() if values is not None else _safetensors_values(files))
        _VALUES_PASSED.add(_values_key(files))
    info = ModelInfo(folder, model_type, weights_format, sum(f.stat().st_size for f in files),
                     n_params)
    return Inspection(info, hf_config, optional)


def preflight(path: str | Path, *, allow_pickle: bool = False,
              max_params: int | None = None, check_data: bool = True) -> ModelInfo:
    """Check a model folder before loading it (see the module doc).

    Raises ModelRejected with status `unsupported` (architecture, quantisation), `skipped`
    (over max_params) or `error` (anything else); never any other exception.
    """
    return inspect_model(path, allow_pickle=allow_pickle, max_params=max_params,
                         check_data=check_data).info
