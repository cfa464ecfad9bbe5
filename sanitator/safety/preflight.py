"""Preflight: everything checked in a fetched model folder before any model is built.

In order: config.json (type and bounds of every field the audit reads), the architecture,
the weight files (sanitator.safety.weight_files: safetensors headers or the safe pickle loader,
sharded indexes), the tokenizer files, then the weights against the config (layer count,
tensor names and shapes, through a skeleton of the model on the `meta` device, which
allocates nothing) and the weight values (no NaN or infinity, not all zero). Every file
it reads must be a regular file inside the model folder (a Hugging Face cache snapshot
may link into its repo's blobs). Any surprise is a `ModelRejected`; nothing else escapes
`preflight`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanitator.core.status import Status
from sanitator.safety.model_policy import (
    MAX_CONFIG_BYTES,
    MAX_TOKENIZER_BYTES,
    TOKENIZER_FILES,
    TOKENIZER_SOURCES,
    ModelRejected,
    architecture_rejection,
    check_config_bounds,
    check_config_fields,
    config_facts,
    read_json_file,
    short,
    size_rejection,
    weights_rejection,
)
from sanitator.safety.weight_files import (
    VALUES_PASSED,
    TensorSpec,
    checked_file,
    model_root,
    pickle_specs,
    safetensors_specs,
    safetensors_values,
    values_key,
)

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.")


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


# --- weights against the config ---------------------------------------------------------

def _hf_config(config: dict[str, Any], model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # remote code is never run, so its pointers are dropped rather than half-honoured
    values = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
    try:
        return CONFIG_MAPPING[model_type].from_dict(values)
    except Exception as exc:  # transformers validates configs with many exception types
        raise ModelRejected(Status.ERROR, f"config.json is not a valid {model_type} config "
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
        raise ModelRejected(Status.ERROR, f"config.json says {field}={wanted:,} but the weights "
                            f"hold {found} layer(s)")


def _skeleton(hf_config) -> tuple[dict[str, tuple[int, ...]], str, list[str], list[str]]:
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(hf_config, trust_remote_code=False)
    except Exception as exc:  # inconsistent sizes (heads not dividing hidden_size, ...)
        raise ModelRejected(Status.ERROR, f"config.json does not describe a buildable "
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
        raise ModelRejected(Status.ERROR, f"the weights hold none of the {hf_config.model_type} "
                            f"model's tensors (found {len(found)}: "
                            f"{short(', '.join(sorted(found)[:5]), 200)})")
    if missing:
        raise ModelRejected(Status.ERROR, f"{len(missing)} tensor(s) of the model are missing from "
                            f"the weights, e.g. {short(missing[0], 100)}")
    modules = {k.split(".")[0] for k in expected}
    unknown = sorted(k for k in found if k not in expected and k.split(".")[0] in modules
                     and not k.endswith("position_ids")
                     and not any(re.search(p, k) for p in may_add))
    if unknown:
        raise ModelRejected(Status.ERROR,
                            f"the weights hold {len(unknown)} tensor(s) this config's "
                            f"model does not have, e.g. {short(unknown[0], 100)}")
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            sizes = ", ".join(f"{k}={config[k]}" for k in ("vocab_size", "hidden_size", "dim",
                                                             "embedding_size") if k in config)
            raise ModelRejected(Status.ERROR, f"weights disagree with config.json: {key} is "
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
            raise ModelRejected(Status.ERROR, f"tensor {short(name, 100)} holds NaN or infinite "
                                "values")
        zero = not bool(tensor.any())
        if zero and "word_embeddings" in name:
            raise ModelRejected(Status.ERROR, f"tensor {short(name, 100)} is all zeros")
        if tensor.dim() >= 2:
            matrices += 1
            nonzero += not zero
    if matrices and not nonzero:
        raise ModelRejected(Status.ERROR, "every weight matrix is all zeros")


# --- the preflight ----------------------------------------------------------------------

def _check_tokenizer(folder: Path, root: Path) -> None:
    present = [name for name in TOKENIZER_FILES
               if checked_file(folder, name, root, MAX_TOKENIZER_BYTES) is not None]
    if not any(name in present for name in TOKENIZER_SOURCES):
        raise ModelRejected(Status.ERROR, f"no tokenizer: none of {', '.join(TOKENIZER_SOURCES)} "
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
        raise ModelRejected(Status.ERROR, f"cannot read the model files ({short(exc)})") from None
    except Exception as exc:  # a case no check foresaw: still a row, never a crash
        log.debug("preflight of %s failed", path, exc_info=True)
        raise ModelRejected(Status.ERROR, f"preflight failed ({type(exc).__name__}: "
                            f"{short(exc, 200)})") from None


def _inspect(folder: Path, allow_pickle: bool, max_params: int | None, check_data: bool
             ) -> Inspection:
    if not folder.is_dir():
        raise ModelRejected(Status.ERROR, f"{folder}: not a folder")
    root = model_root(folder)
    config_file = checked_file(folder, "config.json", root)
    if config_file is None:
        raise ModelRejected(Status.ERROR, f"{folder}: no config.json (not a model folder)")
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
        raise ModelRejected(Status.ERROR,
                            f"{folder}: cannot list the folder ({short(exc)})") from None
    rejected = weights_rejection(names, allow_pickle)
    if rejected:
        raise ModelRejected(*rejected)
    _check_tokenizer(folder, root)
    if "model.safetensors" in names or "model.safetensors.index.json" in names:
        specs, files = safetensors_specs(folder, root)
        weights_format, values = "safetensors", None
    else:
        specs, files, values = pickle_specs(folder, root)
        weights_format = "pickle"
    if not specs:
        raise ModelRejected(Status.ERROR, "the weights hold no tensors")
    n_params = sum(math.prod(spec.shape) for spec in specs.values())
    rejected = size_rejection(n_params, max_params)
    if rejected:
        raise ModelRejected(*rejected)
    _check_layer_count(config, model_type, list(specs))
    check_config_bounds(config)
    hf_config = _hf_config(config, model_type)
    optional = match_weights(specs, hf_config, config)
    if check_data and values_key(files) not in VALUES_PASSED:
        check_values(values.items() if values is not None else safetensors_values(files))
        VALUES_PASSED.add(values_key(files))
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
