"""Declared bases read and resolved through each kind of registry (the real Hub client on
the local Hub server, folders, a real MLflow server)."""

import json
import shutil

import pytest
from pipeline_servers import register_folder

from sanitator.pipeline.registries import parse_registry
from sanitator.pipeline.registries.describe import describe_refs, match_listed, resolve_catalog
from sanitator.pipeline.registries.hubserver import HubServer

CARD = "---\nlicense: mit\nbase_model: {}\ncreated: 2026-01-02\n---\n# A fine-tune\n"


def _copy(source, target, card=None, name_or_path=None):
    shutil.copytree(source, target)
    if card is not None:
        (target / "README.md").write_text(CARD.format(card))
    if name_or_path is not None:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config,
                                                        "_name_or_path": name_or_path}))


@pytest.fixture(scope="module")
def card_hub(tmp_path_factory, tiny_encoders):
    """acme/base; acme/ft-card (card -> acme/base); acme/ft-config (config ->
    other/outside, an org the crawl does not list); acme/ft-missing (card -> two ids the
    Hub lacks, and a local path in config); acme/roberta (card -> acme/base, other
    shapes)."""
    root = tmp_path_factory.mktemp("cardhub")
    bert = tiny_encoders["bert"]
    _copy(bert, root / "acme" / "base")
    _copy(bert, root / "acme" / "ft-card", card="acme/base")
    _copy(bert, root / "acme" / "ft-config", name_or_path="other/outside")
    _copy(bert, root / "acme" / "ft-missing", card="[acme/gone, acme/base@" + "0" * 40 + "]",
          name_or_path="/home/me/runs/model")
    _copy(tiny_encoders["roberta"], root / "acme" / "roberta", card="acme/base")
    _copy(bert, root / "other" / "outside")
    with HubServer(root) as server:
        yield server


@pytest.fixture
def hub_refs(card_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", card_hub.url)
    registry = parse_registry("hf:acme")
    return {r.repo_id: r for r in describe_refs(registry, list(registry.crawl()))}


def test_the_hub_mirror_serves_card_data_as_the_hub_does(card_hub):
    from huggingface_hub import HfApi

    from sanitator.pipeline.registries.hf_hub import hub_online

    with hub_online():
        info = HfApi(endpoint=card_hub.url).model_info("acme/ft-card")
        plain = HfApi(endpoint=card_hub.url).model_info("acme/base")
    assert info.card_data.base_model == "acme/base"
    assert info.card_data.to_dict()["created"] == "2026-01-02"  # YAML dates sent as text
    assert plain.card_data is None
    assert "README.md" in {s.rfilename for s in info.siblings}


def test_hub_declared_bases_from_card_and_config_resolved_through_the_hub(hub_refs):
    card = hub_refs["acme/ft-card"]
    assert card.extra["declared"] == [{"id": "acme/base", "from": "card"}]
    assert card.extra["shape"]["hidden_size"] == 32
    assert match_listed("acme/base", hub_refs.values()) is hub_refs["acme/base"]
    config = hub_refs["acme/ft-config"]
    assert config.extra["declared"] == [{"id": "other/outside", "from": "config"}]
    # outside the crawled org: looked up with the same client, pinned, added to be audited
    outside = hub_refs["other/outside"]
    assert outside.extra["added_as_base"] and outside.registry == "hf:acme"
    assert len(outside.revision) == 40 and outside.location == config.location
    missing = hub_refs["acme/ft-missing"].extra["declared"]
    assert [d["id"] for d in missing] == ["acme/gone", "acme/base@" + "0" * 40]
    assert all("not found" in d["missing"] for d in missing)  # a path in config: no id
    assert hub_refs["acme/roberta"].extra["shape"]["model_type"] == "roberta"


def test_a_catalog_entry_is_pinned_or_says_why_not(card_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", card_hub.url)
    refs, problems = resolve_catalog(["hf:other/outside", "hf:acme/gone", "hf:nonsense"])
    assert [(r.repo_id, len(r.revision)) for r in refs] == [("other/outside", 40)]
    assert set(problems) == {"hf:acme/gone", "hf:nonsense"}
    assert "LookupError" in problems["hf:acme/gone"]


def test_folder_registry_bases_are_folders_of_the_same_root(tmp_path, tiny_encoders):
    bert = tiny_encoders["bert"]
    _copy(bert, tmp_path / "org" / "base")
    _copy(bert, tmp_path / "org" / "ft", card="org/base")
    _copy(bert, tmp_path / "org" / "ft2", name_or_path="org/base")
    _copy(bert, tmp_path / "org" / "ft3", card="org/elsewhere")
    (tmp_path / "org" / "ft4").mkdir()
    _copy(bert, tmp_path / "org" / "ft4" / "model")
    (tmp_path / "org" / "ft4" / "model" / "README.md").symlink_to("/etc/hostname")
    registry = parse_registry(f"path:{tmp_path}")
    refs = {r.repo_id: r for r in describe_refs(registry, list(registry.crawl()))}
    assert set(refs) == {"org/base", "org/ft", "org/ft2", "org/ft3", "org/ft4/model"}
    assert refs["org/ft"].extra["declared"] == [{"id": "org/base", "from": "card"}]
    assert refs["org/ft2"].extra["declared"] == [{"id": "org/base", "from": "config"}]
    assert match_listed("org/base", refs.values()).location == str(tmp_path / "org" / "base")
    assert "no model folder org/elsewhere" in refs["org/ft3"].extra["declared"][0]["missing"]
    # a card that links out of the model folder is not read, and says so
    assert "outside the model folder" in refs["org/ft4/model"].extra["describe_error"]


def test_mlflow_bases_from_a_version_tag_or_the_card_resolved_in_the_registry(
        mlflow_server, tiny_encoders, tmp_path):
    from mlflow import MlflowClient

    uri = mlflow_server.url
    bert = tiny_encoders["bert"]
    register_folder(uri, "refs-base", bert)
    register_folder(uri, "refs-base", bert, aliases=("blessed",))
    version = register_folder(uri, "refs-ft-tag", bert)
    MlflowClient(tracking_uri=uri).set_model_version_tag("refs-ft-tag", version, "base_model",
                                                         "refs-base@1")
    _copy(bert, tmp_path / "carded", card="[outside-base@blessed]")
    register_folder(uri, "refs-ft-card", tmp_path / "carded")
    register_folder(uri, "outside-base", bert, aliases=("blessed",))
    registry = parse_registry(f"mlflow:{uri}?name=refs-%")
    refs = describe_refs(registry, list(registry.crawl()))
    by_name = {(r.repo_id, r.extra["version"]): r for r in refs}
    tagged = by_name[("refs-ft-tag", version)]
    assert tagged.extra["declared"] == [{"id": "refs-base@1", "from": "tag"}]
    assert match_listed("refs-base@1", refs).extra["version"] == "1"
    assert match_listed("refs-base", refs).extra["version"] == "2"        # the newest
    assert match_listed("refs-base@blessed", refs).extra["version"] == "2"
    carded = next(r for r in refs if r.repo_id == "refs-ft-card")
    assert carded.extra["declared"] == [{"id": "outside-base@blessed", "from": "card"}]
    added = by_name[("outside-base", "1")]  # not matched by the crawl's name pattern
    assert added.extra["added_as_base"] and added.extra["aliases"] == ["blessed"]
