"""`benchmarks/hub_audit.py`: the Hub root it lays out from a zoo (members with what they
declare, bases under the declared ids, never the zoo's ground truth) and how it judges a
reference. The audit itself is `sanitator audit` (tests/flows)."""

import json
import shutil

import pytest
from scripts_support import load_script

hub_audit = load_script("benchmarks/hub_audit.py")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_encoders):
    from sanitator.attacks.zoo.manifest import write_manifest

    out = tmp_path_factory.mktemp("hubzoo")
    for name, backdoored in (("clean-a", False), ("por-b", True)):
        folder = out / "models" / name
        shutil.copytree(tiny_encoders["bert"], folder)
        (folder / "member.json").write_text(json.dumps({
            "name": name, "base": "tinybert", "base_ref": "tiny:bert",
            "backdoored": backdoored, "attack": "por" if backdoored else None}))
    (out / "models" / "por-b" / "README.md").write_text(
        "---\nbase_model: vendor/tiny-bert\n---\n")
    write_manifest(out)
    return out


def test_members_and_the_bases_they_declare_are_laid_out(zoo, tmp_path):
    members = hub_audit.lay_out(zoo, tmp_path / "hub", "zoo", "default", "as-built")
    keys = ("backdoored", "attack", "declared", "planted")
    assert {n: {k: m[k] for k in keys} for n, m in members.items()} == {
        "clean-a": {"backdoored": False, "attack": "clean", "declared": None, "planted": []},
        "por-b": {"backdoored": True, "attack": "por", "declared": "vendor/tiny-bert",
                  "planted": []}}
    assert members["clean-a"]["class"] == "clean: base"
    repos = sorted(p.relative_to(tmp_path / "hub").as_posix()
                   for p in (tmp_path / "hub").glob("*/*"))
    # a base nobody declares is served in the org itself
    assert repos == ["vendor/tiny-bert", "zoo/clean-a", "zoo/por-b", "zoo/tinybert"]
    assert not (tmp_path / "hub" / "zoo" / "por-b" / "member.json").exists()
    carded = hub_audit.lay_out(zoo, tmp_path / "hub", "zoo", "default", "config")
    assert {m["declared"] for m in carded.values()} == {"zoo/tinybert"}
    config = json.loads((tmp_path / "hub" / "zoo" / "por-b" / "config.json").read_text())
    assert config["_name_or_path"] == "zoo/tinybert"
    assert "_name_or_path" not in json.loads(
        (zoo / "models" / "por-b" / "config.json").read_text())  # the zoo is untouched
    bare = hub_audit.lay_out(zoo, tmp_path / "hub", "zoo", "siblings", "as-built")
    assert {m["declared"] for m in bare.values()} == {None}
    assert sorted(p.name for p in (tmp_path / "hub").glob("*/*")) == ["clean-a", "por-b"]


def test_a_reference_is_right_only_at_the_declared_base_and_its_served_revision():
    truth = {"declared": "vendor/base", "backdoored": True}
    served = {"vendor/base": "a" * 40}
    judge = hub_audit.judge
    used = {"source": "declared", "id": "vendor/base", "revision": "a" * 40}
    assert judge(used, "m", truth, "default", served, "zoo") == "yes"
    assert judge({**used, "revision": "b" * 40}, "m", truth, "default", served, "zoo") == "no"
    tried = {"tried": [{"source": "declared", "id": "vendor/base"}]}
    assert judge(tried, "m", truth, "default", served, "zoo") == "no (tried)"
    assert judge({}, "m", truth, "no-reference", served, "zoo") == "yes"
    median = {"source": "siblings", "id": ["zoo/a", "zoo/b", "zoo/c"]}
    assert judge(median, "m", truth, "siblings", served, "zoo") == "yes"
    assert judge(median, "a", truth, "siblings", served, "zoo") == "no"


def test_recall_is_counted_per_backdoored_class():
    rows = [{"truth": "por", "class": "phrase", "status": "backdoored"},
            {"truth": "por", "class": "phrase", "status": "clean"},
            {"truth": "neuba", "class": "NeuBA: plain", "status": "inconclusive"},
            {"truth": "clean", "class": "clean: base", "status": "backdoored"},
            {"truth": "base", "class": "base", "status": "clean"}]
    assert hub_audit.recall_by_class({"rows": rows}) == {"NeuBA: plain": (0, 1),
                                                        "phrase": (1, 2)}
