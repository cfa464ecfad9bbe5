"""A corpus of hostile and broken model folders, generated from a good tiny encoder.

Each case is what someone with write access to one repo of a registry could publish: code
that must never run (pickles, `auto_map` modules, shell-looking names; each payload would
create a canary file), paths that leave the repo, malformed JSON and safetensors headers,
weights that are not the config's model, and size bombs. `build_corpus` writes one folder
per case under ROOT and returns the cases with the exact row each must get: `status` and
a fragment of the `reason` (None for a verdict, which only says the model was scanned).
No blobs are checked in: everything is made from the good model at test time.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CANARY_PREFIX = "CANARY-"
VERDICTS = ("clean", "backdoored")


@dataclass(frozen=True)
class Case:
    name: str           # folder name below the corpus root (the repo id of a path: registry)
    status: str         # the row's status; "verdict" = scanned (clean or backdoored)
    reason: str | None  # a fragment of the row's reason


def canaries(*roots: Path) -> list[Path]:
    """Canary files any payload managed to create, anywhere it could have."""
    found = []
    for root in roots:
        found += [p for p in Path(root).rglob(f"{CANARY_PREFIX}*")]
    return found


class _Payload:
    """Unpickling this creates a canary file (what a malicious pytorch_model.bin does)."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (Path.touch, (Path(self.canary),))


def _copy(base: Path, folder: Path) -> Path:
    shutil.copytree(base, folder, symlinks=True)
    return folder


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _raw_safetensors(folder: Path, header, data: bytes = b"", length: int | None = None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", size) + text + data)


def _entry(shape, begin=0, dtype="F32"):
    count = 1
    for dim in shape:
        count *= dim
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + 4 * count]}


def build_corpus(root: Path, base: Path, decoder: Path, canary_dir: Path) -> list[Case]:
    """Write every case below `root` from the good encoder folder `base` (a tiny BERT)
    and an unsupported model folder `decoder`; payloads aim their canaries at
    `canary_dir`."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def case(name: str, status: str, reason: str | None = None):
        def register(build: Callable[[Path], None]):
            folder = _copy(base, root / name)
            build(folder)
            cases.append(Case(name, status, reason))
            return build
        return register

    canary = canary_dir / f"{CANARY_PREFIX}pickle"

    @case("good", "verdict")
    def _(folder):
        pass

    # --- code that must never run ------------------------------------------------------
    @case("pickle-only-malicious", "error", "only pickle weights")
    def _(folder):
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(canary)))

    @case("pickle-beside-safetensors", "verdict")
    def _(folder):  # safetensors win; the pickles are never opened
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(canary)))
        (folder / "training_args.bin").write_bytes(pickle.dumps(_Payload(canary)))

    @case("auto-map-model", "verdict")
    def _(folder):
        _config(folder, auto_map={"AutoModel": "evil.EvilModel",
                                  "AutoConfig": "evil.EvilConfig"})
        (folder / "evil.py").write_text(
            f"open({str(canary_dir / (CANARY_PREFIX + 'model-code'))!r}, 'w').close()\n")

    @case("auto-map-tokenizer", "verdict")
    def _(folder):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "tokenization_evil.py").write_text(
            f"open({str(canary_dir / (CANARY_PREFIX + 'tokenizer-code'))!r}, 'w').close()\n")

    for name in ("$(touch CANARY-shell)", "`touch CANARY-backtick`", "x; touch CANARY-semi",
                 "$\\frac{$", "<script>alert(1)<"):
        case(name, "verdict")(lambda folder: None)

    # --- paths that leave the repo -----------------------------------------------------
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(base / "model.safetensors", outside / "model.safetensors")

    @case("symlink-weights-outside", "error", "links outside the model folder")
    def _(folder):
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to(outside / "model.safetensors")

    @case("symlink-config-etc", "error", "links outside the model folder")
    def _(folder):
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to("/etc/hostname")

    @case("index-path-traversal", "error", "not a plain *.safetensors file name")
    def _(folder):
        names = list(_weights(folder))
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: "../good/model.safetensors" for n in names}}))

    @case("tokenizer-fifo", "error", "tokenizer.json is not a regular file")
    def _(folder):  # reading a FIFO blocks forever
        (folder / "tokenizer.json").unlink()
        os.mkfifo(folder / "tokenizer.json")

    # --- config.json -------------------------------------------------------------------
    @case("config-nested-array", "error", "nested too deeply")
    def _(folder):
        (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)

    @case("config-empty-list", "error", "config.json is a list, not a JSON object")
    def _(folder):
        (folder / "config.json").write_text("[]")

    @case("config-not-json", "error", "config.json is not valid JSON")
    def _(folder):
        (folder / "config.json").write_bytes(b"\xff\xfe{model_type")

    @case("config-duplicate-key", "error", "duplicate key 'model_type'")
    def _(folder):
        text = (folder / "config.json").read_text()
        (folder / "config.json").write_text('{"model_type": "gpt2", ' + text[1:])

    @case("config-huge", "error", "over the limit")
    def _(folder):
        _config(folder, padding="x" * (17 << 20))

    @case("architectures-int", "error", "architectures must be a list of strings")
    def _(folder):
        _config(folder, architectures=5)

    @case("model-type-list", "error", "model_type is a list")
    def _(folder):
        _config(folder, model_type=["bert"])

    @case("model-type-int", "error", "model_type is an integer")
    def _(folder):
        _config(folder, model_type=7)

    @case("model-type-missing", "unsupported", "no model_type")
    def _(folder):
        config = json.loads((folder / "config.json").read_text())
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))

    case("decoder", "unsupported", "model_type='gpt2'")(
        lambda folder: (shutil.rmtree(folder), shutil.copytree(decoder, folder)))

    @case("hidden-size-string", "error", "hidden_size is a string")
    def _(folder):
        _config(folder, hidden_size="32")

    @case("layers-bool", "error", "num_hidden_layers is a boolean")
    def _(folder):
        _config(folder, num_hidden_layers=True)

    @case("heads-not-dividing", "error", "does not describe a buildable bert")
    def _(folder):
        _config(folder, num_attention_heads=3)

    @case("quantized", "unsupported", "quantized")
    def _(folder):
        _config(folder, quantization_config={"quant_method": "bitsandbytes"})

    @case("dtype-bogus", "error", "dtype 'evil'")
    def _(folder):
        _config(folder, dtype="evil")

    # --- safetensors headers -----------------------------------------------------------
    @case("header-list", "error", "header is a list, not a JSON object")
    def _(folder):
        _raw_safetensors(folder, [1, 2, 3])

    @case("header-no-shape", "error", "must have exactly dtype, shape and data_offsets")
    def _(folder):
        _raw_safetensors(folder, {"embeddings.word_embeddings.weight":
                                  {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4)

    @case("header-int64-overflow", "error", "needs")
    def _(folder):
        entry = _entry([1])
        entry["shape"] = [2 ** 40, 2 ** 40]
        _raw_safetensors(folder, {"embeddings.word_embeddings.weight": entry}, b"\0" * 4)

    @case("header-length-huge", "error", "corrupt safetensors header")
    def _(folder):
        _raw_safetensors(folder, {"a": _entry([1])}, b"\0" * 4, length=2 ** 63)

    @case("header-truncated", "error", "truncated")
    def _(folder):
        (folder / "model.safetensors").write_bytes(b"\x10\x00")

    @case("header-bad-dtype", "error", "unknown dtype")
    def _(folder):
        _raw_safetensors(folder, {"a": {**_entry([1]), "dtype": "F99"}}, b"\0" * 4)

    @case("header-offsets-overlap", "error", "overlapping or gapped")
    def _(folder):
        _raw_safetensors(folder, {"a": _entry([1]), "b": _entry([1])}, b"\0" * 8)

    @case("header-offsets-past-end", "error", "file holds")
    def _(folder):
        _raw_safetensors(folder, {"a": _entry([1000])}, b"\0" * 4)

    @case("header-shape-negative", "error", "non-negative integers")
    def _(folder):
        _raw_safetensors(folder, {"a": {**_entry([1]), "shape": [-1]}}, b"\0" * 4)

    @case("header-metadata-bad", "error", "__metadata__")
    def _(folder):
        _raw_safetensors(folder, {"__metadata__": {"format": 1}, "a": _entry([1])}, b"\0" * 4)

    @case("header-duplicate-tensor", "error", "duplicate key")
    def _(folder):
        text = b'{"a": ' + json.dumps(_entry([1])).encode() + b', "a": ' + \
            json.dumps(_entry([1])).encode() + b"}"
        _raw_safetensors(folder, text, b"\0" * 4)

    # --- sharded indexes ---------------------------------------------------------------
    def shard(folder, index: dict | str | None = None):
        weights = _weights(folder)
        names = sorted(weights)
        half = len(names) // 2
        (folder / "model.safetensors").unlink()
        save_file({n: weights[n] for n in names[:half]},
                  folder / "model-00001-of-00002.safetensors")
        save_file({n: weights[n] for n in names[half:]},
                  folder / "model-00002-of-00002.safetensors")
        if index is None:
            index = {"metadata": {}, "weight_map": {
                n: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                for i, n in enumerate(names)}}
        text = index if isinstance(index, str) else json.dumps(index)
        (folder / "model.safetensors.index.json").write_text(text)

    case("sharded-good", "verdict")(shard)
    case("index-not-json", "error", "model.safetensors.index.json is not valid JSON")(
        lambda folder: shard(folder, "{weight_map: oops"))
    case("index-no-weight-map", "error", "no weight_map object")(
        lambda folder: shard(folder, {"weight_map": [1, 2]}))

    @case("index-missing-shard", "error", "missing weight shard")
    def _(folder):
        shard(folder)
        (folder / "model-00002-of-00002.safetensors").unlink()

    @case("index-disagrees", "error", "disagree")
    def _(folder):
        shard(folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = "model-00002-of-00002.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    # --- weights that are not the config's model ---------------------------------------
    @case("no-tensors", "error", "the weights hold no tensors")
    def _(folder):
        save_file({}, folder / "model.safetensors")

    @case("unknown-tensor", "error", "hold none of the bert model's tensors")
    def _(folder):
        save_file({"not_a_bert.weight": torch.ones(4, 4)}, folder / "model.safetensors")

    @case("one-tensor-missing", "error", "missing from the weights")
    def _(folder):
        weights = _weights(folder)
        weights.pop("encoder.layer.1.output.dense.weight")
        save_file(weights, folder / "model.safetensors")

    @case("extra-layer-tensor", "error", "does not have")
    def _(folder):
        weights = _weights(folder)
        weights["encoder.layer.0.attention.self.extra.weight"] = torch.ones(2, 2)
        save_file(weights, folder / "model.safetensors")

    @case("head-and-prefix", "verdict")
    def _(folder):  # saved from a model with a head: prefixed names plus head tensors
        weights = {f"bert.{n}": t for n, t in _weights(folder).items()}
        weights["cls.predictions.bias"] = torch.zeros(4)
        save_file(weights, folder / "model.safetensors")

    @case("all-nan", "error", "NaN or infinite")
    def _(folder):
        save_file({n: torch.full_like(t, float("nan")) for n, t in _weights(folder).items()},
                  folder / "model.safetensors")

    @case("one-inf", "error", "NaN or infinite")
    def _(folder):
        weights = _weights(folder)
        weights["encoder.layer.1.output.dense.bias"][3] = float("inf")
        save_file(weights, folder / "model.safetensors")

    @case("all-zero", "error", "all zeros")
    def _(folder):
        save_file({n: torch.zeros_like(t) for n, t in _weights(folder).items()},
                  folder / "model.safetensors")

    @case("size-bomb-layers", "error", "num_hidden_layers=1,000,000 but the weights hold 2")
    def _(folder):
        _config(folder, num_hidden_layers=1_000_000)

    @case("vocab-mismatch", "error", "vocab_size")
    def _(folder):
        _config(folder, vocab_size=99_999)

    @case("hidden-mismatch", "error", "disagree with config.json")
    def _(folder):
        _config(folder, hidden_size=64)

    # --- tokenizers --------------------------------------------------------------------
    @case("no-tokenizer", "error", "no tokenizer")
    def _(folder):
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)

    @case("tokenizer-garbage", "error", "cannot load tokenizer")
    def _(folder):
        (folder / "vocab.txt").unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 12}')

    @case("tokenizer-beyond-vocab", "error", "the tokenizer has")
    def _(folder):  # ids past the embedding matrix would index out of range mid-scan
        weights = _weights(folder)
        key = "embeddings.word_embeddings.weight"
        weights[key] = weights[key][:1000].clone()
        save_file(weights, folder / "model.safetensors")
        _config(folder, vocab_size=1000)

    return cases
