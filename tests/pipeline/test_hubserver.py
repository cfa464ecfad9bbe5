"""The local Hub server, driven by the real huggingface_hub client (and transformers)."""

import json
import shutil
import urllib.error
import urllib.request

import pytest

from sanitator.cli import main
from sanitator.pipeline.registries.hf_hub import hub_online
from sanitator.pipeline.registries.hubserver import HubServer


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tiny_encoders):
    root = tmp_path_factory.mktemp("hubrepos")
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "enc-a")
    (root / "acme" / "enc-a" / "extras").mkdir()
    (root / "acme" / "enc-a" / "extras" / "notes.txt").write_text("hello")
    shutil.copytree(tiny_encoders["gpt2"], root / "acme" / "dec-b")
    shutil.copytree(tiny_encoders["roberta"], root / "other" / "enc-c")
    shutil.copytree(tiny_encoders["bert"], root / "solo")  # a repo id without an org
    (root / ".hidden").mkdir()
    return root


@pytest.fixture(scope="module")
def hub(hub_root):
    with HubServer(hub_root, page_size=2) as server:
        yield server


@pytest.fixture
def api(hub):
    from huggingface_hub import HfApi

    with hub_online():
        yield HfApi(endpoint=hub.url)


def test_list_models_filters_and_paginates(api):
    assert [m.id for m in api.list_models()] == ["acme/dec-b", "acme/enc-a", "other/enc-c",
                                                  "solo"]  # 2 pages of 2, Link-followed
    assert [m.id for m in api.list_models(author="acme")] == ["acme/dec-b", "acme/enc-a"]
    assert [m.id for m in api.list_models(search="ENC")] == ["acme/enc-a", "other/enc-c"]
    assert [m.id for m in api.list_models(filter="gpt2")] == ["acme/dec-b"]
    assert len(list(api.list_models(limit=3))) == 3


def test_model_info_pins_a_content_sha_and_describes_files(api, hub_root):
    info = api.model_info("acme/enc-a", files_metadata=True)
    assert len(info.sha) == 40 and int(info.sha, 16) >= 0
    assert info.config == {"model_type": "bert", "architectures": ["BertModel"]}
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "extras/notes.txt"}
    weights = siblings["model.safetensors"]
    assert weights.size == (hub_root / "acme/enc-a/model.safetensors").stat().st_size
    assert weights.lfs is not None and len(weights.lfs.sha256) == 64
    assert siblings["config.json"].lfs is None and len(siblings["config.json"].blob_id) == 40
    assert api.model_info("acme/enc-a", revision=info.sha).sha == info.sha
    assert api.model_info("solo").config["model_type"] == "bert"


def test_sha_changes_when_a_file_changes(api, hub_root):
    before = api.model_info("other/enc-c").sha
    notes = hub_root / "other" / "enc-c" / "README.md"
    notes.write_text("v2")
    try:
        assert api.model_info("other/enc-c").sha != before
    finally:
        notes.unlink()
    assert api.model_info("other/enc-c").sha == before


def test_tree_and_refs(api):
    sha = api.model_info("acme/enc-a").sha
    top = {(e.path, type(e).__name__) for e in api.list_repo_tree("acme/enc-a", revision=sha)}
    assert ("extras", "RepoFolder") in top and ("extras/notes.txt", "RepoFile") not in top
    deep = [e.path for e in api.list_repo_tree("acme/enc-a", revision=sha, recursive=True)]
    assert "extras/notes.txt" in deep
    inside = [e.path for e in api.list_repo_tree("acme/enc-a", path_in_repo="extras")]
    assert inside == ["extras/notes.txt"]
    refs = api.list_repo_refs("acme/enc-a")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", sha)]


def test_errors_carry_the_hub_error_codes(api):
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/enc-a", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        api.list_repo_tree("acme/enc-a", path_in_repo="nope").__iter__().__next__()


@pytest.mark.parametrize("path", ["/api/models/.hidden/x", "/api/models/acme/..",
                                  "/acme/%2E%2E/resolve/main/config.json",
                                  "/acme/enc-a/resolve/main/..%2F..%2Fother%2Fenc-c%2Fconfig.json"])
def test_hidden_and_escaping_paths_are_not_found(hub, path):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(hub.url + path)
    assert error.value.code == 404


def test_snapshot_download_pinned_with_allow_patterns(hub, api, tmp_path):
    from huggingface_hub import snapshot_download

    sha = api.model_info("acme/enc-a").sha
    with hub_online():
        folder = snapshot_download("acme/enc-a", revision=sha, endpoint=hub.url,
                                   local_dir=tmp_path / "dl",
                                   allow_patterns=["*.json", "*.safetensors"])
    names = sorted(p.name for p in (tmp_path / "dl").iterdir() if not p.name.startswith("."))
    assert names == ["config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert (tmp_path / "dl" / "config.json").read_bytes() == (
        hub.httpd.index.root / "acme/enc-a/config.json").read_bytes()
    assert str(folder) == str(tmp_path / "dl")


def test_download_and_head_headers_and_ranges(hub):
    url = f"{hub.url}/acme/enc-a/resolve/main/config.json"
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request) as response:
        assert len(response.headers["X-Repo-Commit"]) == 40
        size = int(response.headers["Content-Length"])
    request = urllib.request.Request(url, headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and len(response.read()) == 10
        assert response.headers["Content-Range"] == f"bytes 0-9/{size}"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{hub.url}/acme/enc-a/resolve/main/added_tokens.json")
    assert missing.value.code == 404
    assert missing.value.headers["X-Error-Code"] == "EntryNotFound"


def test_transformers_loads_a_model_through_the_hub(hub, monkeypatch, tmp_path):
    """transformers probes optional files; they must answer EntryNotFound, not fail."""
    from huggingface_hub import constants
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    with hub_online():
        model = AutoModel.from_pretrained("acme/enc-a", cache_dir=tmp_path)
        tokenizer = AutoTokenizer.from_pretrained("acme/enc-a", cache_dir=tmp_path)
    assert type(model).__name__ == "BertModel"
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_token_protects_every_endpoint(hub_root):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with HubServer(hub_root, token="s3cret") as server, hub_online():
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=server.url).model_info("acme/enc-a")
        assert HfApi(endpoint=server.url, token="s3cret").model_info("acme/enc-a").sha


def test_list_endpoint_is_plain_json(hub):
    with urllib.request.urlopen(f"{hub.url}/api/models?author=other") as response:
        items = json.loads(response.read())
    assert [item["id"] for item in items] == ["other/enc-c"]
    assert items[0]["sha"] and "siblings" not in items[0]


def test_command_line_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["hub", "serve", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_links_out_of_a_repo_are_never_served(hub_root, tiny_encoders, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "linky")
    (root / "acme" / "linky" / "vocab.txt").symlink_to("/etc/hostname")
    (root / "acme" / "linky" / "inside.json").symlink_to("config.json")
    (root / "acme" / "linky" / "dangling.json").symlink_to("missing.json")
    with HubServer(root) as hub:
        with urllib.request.urlopen(f"{hub.url}/api/models/acme/linky") as answer:
            names = {s["rfilename"] for s in json.load(answer)["siblings"]}
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{hub.url}/acme/linky/resolve/main/vocab.txt")
    assert "inside.json" in names and not {"vocab.txt", "dangling.json"} & names
    assert error.value.code == 404
