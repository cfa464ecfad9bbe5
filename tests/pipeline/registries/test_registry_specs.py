from pathlib import Path

import pytest

from sanitator.pipeline.registries import ModelRef, RegistryError, parse_registry
from sanitator.pipeline.registries.hf_hub import HfHubRegistry
from sanitator.pipeline.registries.local import LocalRegistry
from sanitator.pipeline.registries.mlflow_registry import MlflowRegistry


def test_hf_specs(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    registry = parse_registry("hf:acme")
    assert isinstance(registry, HfHubRegistry)
    assert (registry.author, registry.endpoint, registry.spec) == (
        "acme", "http://127.0.0.1:9", "hf:acme")
    search = parse_registry("hf:?search=bert&limit=5")
    assert (search.author, search.search, search.limit) == (None, "bert", 5)
    assert search.spec == "hf:?search=bert&limit=5"
    assert parse_registry(search.spec) == search


def test_mlflow_and_path_specs(tmp_path):
    registry = parse_registry("mlflow:http://127.0.0.1:5000/?name=enc%25")
    assert isinstance(registry, MlflowRegistry)
    assert (registry.tracking_uri, registry.name_like) == ("http://127.0.0.1:5000", "enc%")
    assert parse_registry("mlflow:sqlite:///x.db").tracking_uri == "sqlite:///x.db"
    local = parse_registry(f"path:{tmp_path}/./")
    assert isinstance(local, LocalRegistry) and local.root == tmp_path.resolve()
    assert local.spec == f"path:{tmp_path.resolve()}"


@pytest.mark.parametrize("spec, message", [
    ("acme", "expected hf:ORG"),
    ("s3:bucket", "expected hf:ORG"),
    ("hf:", "refusing to crawl a whole Hub"),
    ("hf:acme/model", "not a repo id"),
    ("hf:acme?colour=red", "unknown option"),
    ("hf:acme?limit=many", "integer"),
    ("mlflow:", "needs a tracking URI"),
    ("mlflow:http://h?owner=x", "unknown option"),
    ("path:", "needs a folder"),
])
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(RegistryError, match=message):
        parse_registry(spec)


def test_model_ref_helpers():
    ref = ModelRef("hf", "hf:acme", "acme/a", "f" * 40, "http://hub",
                   files=(("config.json", 10), ("sub/model.safetensors", 20)))
    assert ref.key == ("hf", "acme/a", "f" * 40)
    assert ref.file_names == {"config.json", "sub/model.safetensors"}
    assert "acme/a@ffffffffffff" in ref.label
    assert Path(ref.location).name == "hub"
