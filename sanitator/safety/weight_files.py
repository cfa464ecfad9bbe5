"""The files of a model folder, read as untrusted bytes: where a file may be, and what a
safetensors header, a sharded index and a pickle checkpoint must look like before anything
uses them (the safetensors format: an 8-byte little-endian header length, a JSON object of
{dtype, shape, data_offsets} entries whose byte ranges tile the data that follows).
Every refusal is a ModelRejected with a plain reason."""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanitator.core.status import Status
from sanitator.safety.model_policy import (
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    PICKLE_FILES,
    SAFETENSORS_FILES,
    ModelRejected,
    parse_json,
    read_json_file,
    short,
    type_name,
)

# safetensors dtype -> bytes per element (the reference implementation's byte-sized types)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1,
               "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
               "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}
_SHARD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
        # a link to itself (or round a loop of links) never reaches a file
        if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
            raise ModelRejected(Status.ERROR, f"{name} is not a regular file (a link that "
                                "loops back to itself)") from None
        raise ModelRejected(Status.ERROR, f"{name} cannot be read ({short(exc)})") from None
    if not resolved.is_relative_to(root):
        raise ModelRejected(Status.ERROR, f"{name} links outside the model folder "
                            f"(to {short(resolved, 120)}); refusing to read it")
    if not stat.S_ISREG(info.st_mode):
        raise ModelRejected(Status.ERROR, f"{name} is not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ModelRejected(Status.ERROR, f"{name} is {info.st_size:,} bytes, over the limit of "
                            f"{max_bytes:,}")
    return path


# --- safetensors and indexes ------------------------------------------------------------

def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ModelRejected(Status.ERROR, f"{where}: shape must be a list of at most 8 "
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
            raise ModelRejected(Status.ERROR, f"{name}: corrupt safetensors file (truncated)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ModelRejected(Status.ERROR, f"{name}: corrupt safetensors header (declares "
                                f"{header_len:,} header bytes in a {size:,}-byte file)")
        header = parse_json(handle.read(header_len), f"{name} header")
    if not isinstance(header, dict):
        raise ModelRejected(Status.ERROR, f"{name}: safetensors header is {type_name(header)}, "
                            "not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise ModelRejected(Status.ERROR, f"{name}: __metadata__ must map strings to strings")
    specs: dict[str, TensorSpec] = {}
    ranges: list[tuple[int, int, str]] = []
    for tensor, entry in header.items():
        where = f"{name}: tensor {short(tensor, 80)!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelRejected(Status.ERROR, f"{where} must have exactly dtype, shape and "
                                f"data_offsets, got {short(entry, 80)}")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ModelRejected(Status.ERROR, f"{where}: unknown dtype {short(dtype, 40)!r}")
        shape = _shape(entry["shape"], where)
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ModelRejected(Status.ERROR, f"{where}: data_offsets must be [begin, end] with "
                                f"0 <= begin <= end, got {short(offsets, 80)}")
        declared = math.prod(shape) * DTYPE_BYTES[dtype]  # Python ints: no overflow
        if declared != offsets[1] - offsets[0]:
            raise ModelRejected(Status.ERROR, f"{where}: shape {list(shape)} of {dtype} needs "
                                f"{declared:,} bytes but its offsets span "
                                f"{offsets[1] - offsets[0]:,}")
        specs[tensor] = TensorSpec(dtype, shape, file)
        ranges.append((offsets[0], offsets[1], tensor))
    end = 0
    for begin, stop, tensor in sorted(ranges):
        if begin != end:
            raise ModelRejected(Status.ERROR,
                                f"{name}: tensor {short(tensor, 80)!r} starts at byte "
                                f"{begin:,}, expected {end:,} (overlapping or gapped data)")
        end = stop
    if end != size - 8 - header_len:
        raise ModelRejected(Status.ERROR, f"{name}: the tensors cover {end:,} data bytes but the "
                            f"file holds {size - 8 - header_len:,}")
    return specs


def read_index(path: Path, suffix: str) -> dict[str, str]:
    """Tensor name -> shard file name from a sharded checkpoint's index."""
    index = read_json_file(path, path.name, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelRejected(Status.ERROR, f"{path.name}: no weight_map object (a corrupt index)")
    for tensor, shard in weight_map.items():
        if not (isinstance(shard, str) and _SHARD.fullmatch(shard) and shard.endswith(suffix)
                and shard not in SAFETENSORS_FILES + PICKLE_FILES):
            raise ModelRejected(Status.ERROR, f"{path.name}: tensor {short(tensor, 80)!r} names "
                                f"shard {short(shard, 80)!r}, not a plain *{suffix} file "
                                "name in the model folder")
    return weight_map


def safetensors_specs(folder: Path, root: Path) -> tuple[dict[str, TensorSpec], list[Path]]:
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
            raise ModelRejected(Status.ERROR, f"missing weight shard {shard!r} named by "
                                "model.safetensors.index.json")
        files.append(path)
        for tensor, spec in read_safetensors_header(path).items():
            if tensor in specs:
                raise ModelRejected(Status.ERROR, f"tensor {short(tensor, 80)!r} is in two shards")
            specs[tensor] = spec
    wrong = sorted(t for t in set(specs) | set(weight_map)
                   if t not in specs or weight_map.get(t) != specs[t].file.name)
    if wrong:
        raise ModelRejected(Status.ERROR, f"model.safetensors.index.json and its shards disagree "
                            f"on {len(wrong)} tensor(s), e.g. {short(wrong[0], 80)!r}")
    return specs, files


def pickle_specs(folder: Path, root: Path) -> tuple[dict[str, TensorSpec], list[Path], dict]:
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
            raise ModelRejected(Status.ERROR,
                                "a weight shard named by pytorch_model.bin.index.json "
                                "is missing")
    specs: dict[str, TensorSpec] = {}
    tensors: dict[str, Any] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zip errors ...
            raise ModelRejected(Status.ERROR, f"{file.name}: refused by the safe pickle loader "
                                f"({short(exc, 200)})") from None
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ModelRejected(Status.ERROR, f"{file.name} is not a mapping of names to tensors")
        for tensor, value in state.items():
            specs[tensor] = TensorSpec(str(value.dtype), tuple(value.shape), file)
            tensors[tensor] = value
    return specs, files, tensors


def safetensors_values(files: list[Path]):
    """(name, tensor) one at a time, so a whole model never sits in memory twice."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


# (path, size, mtime_ns) of weight files whose values passed the preflight: an audit
# preflights twice (the worker, then the loader) and need not read the weights twice
VALUES_PASSED: set[tuple[str, int, int]] = set()


def values_key(files: list[Path]) -> tuple:
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
