import shutil

import pytest

from sanitator.pipeline.registries import FetchError, parse_registry
from sanitator.pipeline.registries.hf_hub import hub_online
from sanitator.pipeline.registries.local import LocalRegistry, content_revision


@pytest.fixture
def folder_zoo(tmp_path, tiny_encoders):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "encoder-a")
    shutil.copytree(tiny_encoders["gpt2"], root / "acme" / "team" / "decoder-b")
    shutil.copytree(tiny_encoders["bert"], root / ".trash" / "old")
    (root / "acme" / "encoder-a" / "onnx").mkdir()
    (root / "acme" / "encoder-a" / "onnx" / "config.json").write_text("{}")  # inside a model
    return root


def test_every_model_folder_is_a_ref_named_by_its_relative_path(folder_zoo):
    refs = list(parse_registry(f"path:{folder_zoo}").crawl())
    assert [r.repo_id for r in refs] == ["acme/encoder-a", "acme/team/decoder-b"]
    encoder = refs[0]
    assert (encoder.source, encoder.registry) == ("path", f"path:{folder_zoo}")
    assert encoder.location == str(folder_zoo / "acme" / "encoder-a")
    assert encoder.config == {"model_type": "bert", "architectures": ["BertModel"]}
    assert "model.safetensors" in encoder.file_names and "onnx/config.json" in encoder.file_names
    assert encoder.size == sum(size for _, size in encoder.files)
    assert len(encoder.revision) == 40
    assert refs[1].config["model_type"] == "gpt2"


def test_revision_follows_every_file_the_scan_reads(folder_zoo):
    folder = folder_zoo / "acme" / "encoder-a"
    before = content_revision(folder)
    (folder / "README.md").write_text("not read by the scan")
    assert content_revision(folder) == before
    (folder / "tokenizer_config.json").write_text("{}")  # a fixed tokenizer is a new model
    after_tokenizer = content_revision(folder)
    assert after_tokenizer != before
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert content_revision(folder) not in (before, after_tokenizer)


def test_identical_copies_share_a_revision(folder_zoo, tmp_path):
    shutil.copytree(folder_zoo / "acme" / "encoder-a", tmp_path / "copy")
    assert content_revision(tmp_path / "copy") == content_revision(
        folder_zoo / "acme" / "encoder-a")


def test_fetch_returns_the_folder_and_refuses_changed_content(folder_zoo, tmp_path):
    registry = LocalRegistry.from_spec(str(folder_zoo))
    ref = next(iter(registry.crawl()))
    assert registry.fetch(ref, tmp_path) == folder_zoo / "acme" / "encoder-a"
    (folder_zoo / "acme" / "encoder-a" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FetchError, match="changed since the crawl") as error:
        registry.fetch(ref, tmp_path)
    assert not error.value.retryable


def test_missing_root_is_a_registry_error(tmp_path):
    with pytest.raises(Exception, match="not a folder"):
        list(parse_registry(f"path:{tmp_path / 'missing'}").crawl())


def test_hf_cache_layout_uses_hub_ids_and_commit_shas(hub, tmp_path):
    """A cache filled by the real client (here from the local hub) is crawled as a cache."""
    from huggingface_hub import HfApi, snapshot_download

    cache = tmp_path / "hf" / "hub"
    with hub_online():
        sha = HfApi(endpoint=hub.url).model_info("acme/enc-a").sha
        snapshot_download("acme/enc-a", revision=sha, endpoint=hub.url, cache_dir=cache,
                          allow_patterns=["*.json", "*.safetensors"])
    for root in (cache, cache.parent):  # the hub folder itself or the HF_HOME above it
        refs = list(parse_registry(f"path:{root}").crawl())
        assert [(r.repo_id, r.revision) for r in refs] == [("acme/enc-a", sha)]
        assert refs[0].extra["layout"] == "hf-cache"
        assert refs[0].config["model_type"] == "bert"
        assert (refs[0].location.endswith(sha))


def test_every_hostile_folder_is_one_ref_and_none_stops_the_crawl(hostile_corpus, tmp_path):
    root = hostile_corpus["root"]
    refs = list(parse_registry(f"path:{root}").crawl())
    folders = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("config.json")
                     if not any(part.startswith(".") for part in p.relative_to(root).parts))
    assert sorted(r.repo_id for r in refs) == folders
    by_name = {r.repo_id: r for r in refs}
    assert "nested too deeply" in by_name["config-nested-array"].config["invalid"]
    assert "model_type is a list" in by_name["model-type-list"].config["invalid"]
    linked = by_name["symlink-config-etc"]  # a link out of the folder is never read
    assert "links outside the model folder" in linked.config["invalid"]
    assert linked.revision == content_revision(root / "symlink-config-etc")


def test_names_that_are_not_utf8_get_printable_repo_ids(tiny_encoders, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_encoders["bert"], root / "ok")
    weird = bytes(root / "ok")[:-2] + b"caf\xe9-\xff"
    shutil.copytree(tiny_encoders["bert"], weird.decode("utf-8", "surrogateescape"))
    refs = list(parse_registry(f"path:{root}").crawl())
    assert sorted(r.repo_id for r in refs) == ["caf\\xe9-\\xff", "ok"]
    ref = next(r for r in refs if r.repo_id != "ok")
    assert LocalRegistry(root).fetch(ref, tmp_path).name.endswith("-\udcff")


def test_weights_that_are_no_regular_file_get_the_scans_reason(tiny_encoders, tmp_path):
    """A named pipe or a link to itself where the weights should be: the crawl's row
    says what the preflight says, not "no weights"."""
    import os

    from sanitator.pipeline.audit import AuditPolicy, plan_audits
    from sanitator.safety.model_policy import ModelRejected
    from sanitator.safety.preflight import preflight

    root = tmp_path / "zoo"
    for name in ("pipe", "self-link", "fine"):
        shutil.copytree(tiny_encoders["bert"], root / name)
    for name in ("pipe", "self-link"):
        (root / name / "model.safetensors").unlink()
    os.mkfifo(root / "pipe" / "model.safetensors")
    (root / "self-link" / "model.safetensors").symlink_to("model.safetensors")
    refs = {r.repo_id: r for r in parse_registry(f"path:{root}").crawl()}
    assert refs["fine"].crawl_error is None
    plan = plan_audits(refs.values(), [], "c" * 16, AuditPolicy())
    reasons = {r.ref.repo_id: r.reason for r in plan.rejected}
    for name in ("pipe", "self-link"):
        with pytest.raises(ModelRejected) as scan:
            preflight(root / name)
        assert reasons[name] == scan.value.reason
        assert reasons[name].startswith("model.safetensors is not a regular file")
    assert [r.repo_id for r in plan.todo] == ["fine"]
