import pytest

from sanitator.detect.encoders import preflight
from sanitator.pipeline.registries import FetchError, ModelRef, fetch_ref, parse_registry


def test_crawl_pins_every_repo_of_an_org_to_its_commit(hub_env):
    from huggingface_hub import constants

    refs = list(parse_registry("hf:acme").crawl())
    assert [r.repo_id for r in refs] == ["acme/dec-b", "acme/enc-a", "acme/pickled"]
    assert constants.HF_HUB_OFFLINE  # offline mode is lifted only during registry calls
    encoder = refs[1]
    assert encoder.source == "hf" and encoder.registry == "hf:acme"
    assert encoder.location == hub_env.url and len(encoder.revision) == 40
    assert encoder.config == {"model_type": "bert", "architectures": ["BertModel"]}
    assert dict(encoder.files)["README.md"] == len("not downloaded by the audit")
    assert encoder.size == sum(size for _, size in encoder.files)
    assert refs[0].config["model_type"] == "gpt2"
    assert "pytorch_model.bin" in refs[2].file_names


def test_search_spans_orgs(hub_env):
    assert [r.repo_id for r in parse_registry("hf:?search=enc-").crawl()] == [
        "acme/enc-a", "other/enc-c"]


def test_fetch_takes_only_model_files_at_the_pinned_sha(hub_env, tmp_path):
    ref = next(r for r in parse_registry("hf:acme").crawl() if r.repo_id == "acme/enc-a")
    folder = fetch_ref(ref, tmp_path)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == ["config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]  # README.md left behind
    assert preflight(folder).model_type == "bert"


def test_pickle_weights_are_fetched_only_when_allowed(hub_env, tmp_path):
    ref = next(r for r in parse_registry("hf:acme").crawl() if r.repo_id == "acme/pickled")
    assert not (fetch_ref(ref, tmp_path / "a") / "pytorch_model.bin").exists()
    assert (fetch_ref(ref, tmp_path / "b", allow_pickle=True) / "pytorch_model.bin").exists()


def test_a_revision_gone_from_the_hub_is_a_permanent_fetch_error(hub_env, tmp_path):
    ref = next(iter(parse_registry("hf:acme").crawl()))
    gone = ModelRef(**{**ref.__dict__, "revision": "0" * 40})
    with pytest.raises(FetchError) as error:
        fetch_ref(gone, tmp_path)
    assert not error.value.retryable


def test_an_unreachable_hub_is_a_transient_fetch_error(hub_env, tmp_path, monkeypatch):
    from huggingface_hub.utils import _http
    from pipeline_servers import free_port

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)  # skip client backoff

    ref = next(iter(parse_registry("hf:acme").crawl()))
    down = ModelRef(**{**ref.__dict__, "location": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(FetchError) as error:
        fetch_ref(down, tmp_path)
    assert error.value.retryable


def test_an_unreadable_repo_is_one_error_ref_not_a_lost_registry(tiny_encoders, tmp_path,
                                                                 monkeypatch):
    import json
    import shutil

    from sanitator.pipeline.registries.hubserver import HubServer

    root = tmp_path / "hub"
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "good")
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "bad name!")  # not a Hub repo id
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "typed")
    (root / "acme" / "typed" / "config.json").write_text(json.dumps(
        {"model_type": ["bert"], "architectures": 5}))
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "nested")
    (root / "acme" / "nested" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with HubServer(root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        refs = {r.repo_id: r for r in parse_registry("hf:acme").crawl()}
    assert sorted(refs) == ["acme/bad name!", "acme/good", "acme/nested", "acme/typed"]
    bad = refs["acme/bad name!"]
    assert "cannot read the repo's details" in bad.crawl_error and not bad.crawl_retryable
    assert len(bad.revision) == 40  # the listing's sha pins even the unreadable repo
    assert "model_type is a list" in refs["acme/typed"].config["invalid"]
    assert refs["acme/nested"].config is None and refs["acme/nested"].crawl_error is None
    assert refs["acme/good"].config["model_type"] == "bert"
