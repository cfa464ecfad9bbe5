"""References resolved through the registry in one audit flow (real Prefect, Dask and the
local Hub server; a fake scanner records the candidates it is handed): a declared base is
audited first and vouches only when clean, a base outside the crawled org is added, a
missing one falls through with its reason."""

import json
import shutil

import pytest

from sanitator.cli import main
from sanitator.pipeline.registries.hubserver import HubServer
from sanitator.pipeline.store import latest_verdicts

pytestmark = pytest.mark.slow(45)  # seconds, roughly: long modules start first


def _card(folder, base):
    (folder / "README.md").write_text(f"---\nbase_model: {base}\n---\n# fine-tune\n")


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_encoders):
    root = tmp_path_factory.mktemp("refhub")
    for name in ("acme/base", "acme/ft", "acme/backdoor-base", "acme/ft-on-bad-base",
                 "acme/ft-outside", "acme/ft-missing", "other/outside"):
        shutil.copytree(tiny_encoders["bert"], root / name)
    _card(root / "acme/ft", "acme/base")
    _card(root / "acme/ft-on-bad-base", "acme/backdoor-base")
    _card(root / "acme/ft-missing", "acme/gone")
    config = json.loads((root / "acme/ft-outside/config.json").read_text())
    config["_name_or_path"] = "other/outside"
    (root / "acme/ft-outside/config.json").write_text(json.dumps(config))
    store = tmp_path_factory.mktemp("refstore")
    from flows.audit_zoo import audit_zoo

    mp = pytest.MonkeyPatch()
    with HubServer(root) as hub:
        mp.setenv("HF_ENDPOINT", hub.url)
        try:
            summary = audit_zoo(["hf:acme"], store, n_workers=1, track=False,
                                scanner="fake_scanners:with_references",
                                per_model_timeout=300)
        finally:
            mp.undo()
    verdicts = latest_verdicts(store).set_index("repo_id")
    evidence = {repo: json.loads(text) for repo, text in verdicts["evidence"].items()}
    return {"summary": summary, "verdicts": verdicts, "evidence": evidence, "store": store}


def test_bases_are_audited_first_and_a_clean_one_vouches(audited):
    verdicts, evidence = audited["verdicts"], audited["evidence"]
    assert audited["summary"]["counts"]["clean"] == 6
    assert audited["summary"]["counts"]["backdoored"] == 1
    assert verdicts.loc["acme/base", "audited_at"] < verdicts.loc["acme/ft", "audited_at"]
    reference = evidence["acme/ft"]["reference"]
    assert (reference["source"], reference["id"], reference["revision"]) == (
        "declared", "acme/base", verdicts.loc["acme/base", "revision"])
    # handed the clean declared base alone: its siblings were never fetched
    assert evidence["acme/ft"]["offered"] == [{"source": "declared", "id": "acme/base",
                                               "revision": reference["revision"],
                                               "note": "card"}]
    assert reference["resolution"]["declared"] == [{
        "id": "acme/base", "from": "card", "revision": reference["revision"],
        "status": "audited clean in this flow"}]


def test_a_backdoored_base_does_not_vouch_and_the_model_falls_through(audited):
    verdicts, evidence = audited["verdicts"], audited["evidence"]
    assert verdicts.loc["acme/backdoor-base", "status"] == "backdoored"
    reference = evidence["acme/ft-on-bad-base"]["reference"]
    [entry] = reference["resolution"]["declared"]
    assert entry["skipped"] == "the base was audited backdoored in this flow"
    offered = evidence["acme/ft-on-bad-base"]["offered"]
    assert [c["source"] for c in offered] == ["siblings"]
    assert "acme/backdoor-base" not in offered[0]["id"]


def test_a_base_outside_the_org_is_added_and_a_missing_one_says_why(audited):
    verdicts, evidence = audited["verdicts"], audited["evidence"]
    assert verdicts.loc["other/outside", "status"] == "clean"  # audited too, added
    reference = evidence["acme/ft-outside"]["reference"]
    assert (reference["source"], reference["id"]) == ("declared", "other/outside")
    [entry] = evidence["acme/ft-missing"]["reference"]["resolution"]["declared"]
    assert entry["id"] == "acme/gone" and "not found" in entry["skipped"]
    assert evidence["acme/ft-missing"]["reference"]["source"] == "siblings"


def test_verdicts_json_shows_each_models_reference(audited, capsys):
    assert main(["verdicts", "--store", str(audited["store"]), "--json"]) == 0
    rows = {row["repo_id"]: row for row in json.loads(capsys.readouterr().out)}
    reference = rows["acme/ft"]["reference"]
    assert reference["source"] == "declared" and reference["id"] == "acme/base"
    assert reference["distance"] == 0.01 and reference["resolution"]["declared"]
