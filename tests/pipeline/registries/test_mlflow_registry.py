import pytest
from pipeline_servers import register_folder

from sanitator.detect.encoders import preflight
from sanitator.pipeline.registries import fetch_ref, parse_registry
from sanitator.pipeline.registries.mlflow_registry import model_folder


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_encoders):
    """enc-a v1 and v2 (v2 aliased champion), dec-b v1 (unsupported), on a real server."""
    uri = mlflow_server.url
    register_folder(uri, "reg-enc-a", tiny_encoders["bert"])
    register_folder(uri, "reg-enc-a", tiny_encoders["distilbert"], aliases=("champion",))
    register_folder(uri, "reg-dec-b", tiny_encoders["gpt2"])
    return uri


def test_crawl_lists_every_version_with_aliases(registered):
    refs = [r for r in parse_registry(f"mlflow:{registered}").crawl()
            if r.repo_id.startswith("reg-")]
    assert [(r.repo_id, r.extra["version"]) for r in refs] == [
        ("reg-dec-b", "1"), ("reg-enc-a", "1"), ("reg-enc-a", "2")]
    dec, enc1, enc2 = refs
    assert enc2.extra["aliases"] == ["champion"] and enc1.extra["aliases"] == []
    assert enc1.revision.startswith("v1-") and enc2.revision.startswith("v2-")
    assert enc1.revision != enc2.revision
    assert enc1.config["model_type"] == "bert" and enc2.config["model_type"] == "distilbert"
    assert dec.config["model_type"] == "gpt2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= enc1.file_names
    assert enc1.size and enc1.size == sum(size for _, size in enc1.files)
    assert enc1.registry == f"mlflow:{registered}"


def test_name_filter(registered):
    refs = list(parse_registry(f"mlflow:{registered}?name=reg-dec%").crawl())
    assert [r.repo_id for r in refs] == ["reg-dec-b"]


def test_fetch_gives_a_loadable_model_folder(registered, tmp_path):
    ref = next(r for r in parse_registry(f"mlflow:{registered}?name=reg-enc-a").crawl()
               if r.extra["version"] == "2")
    folder = fetch_ref(ref, tmp_path)
    assert preflight(folder).model_type == "distilbert"


def test_transformers_flavor_layout_gets_its_tokenizer_beside_the_weights(tmp_path,
                                                                          tiny_encoders):
    import shutil

    source = tiny_encoders["bert"]
    (tmp_path / "model").mkdir()
    (tmp_path / "components" / "tokenizer").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, tmp_path / "model" / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / "components" / "tokenizer" / name)
    folder = model_folder(tmp_path, "test")
    assert folder == tmp_path / "model"
    assert (folder / "tokenizer.json").is_file()
