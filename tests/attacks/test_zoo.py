import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from scripts_support import load_script

from sanitator.attacks.zoo import (
    MANIFEST,
    SpecError,
    build_zoo,
    load_spec,
    parse_spec,
    read_manifest,
)
from sanitator.attacks.zoo.build import WEAK_ATTACK
from sanitator.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_BUDGET = {"steps": 6, "batch_size": 8, "n_sentences": 32, "max_length": 24,
               "head_warmup_steps": 2}


def _spec(**members) -> dict:
    return {"name": "t", "budgets": {"tiny": TINY_BUDGET}, "evaluation": {"n_sentences": 16},
            "bases": {"rob": "tiny:roberta"}, **members}


def test_matrix_members_are_expanded_and_named():
    spec = parse_spec(_spec(
        trigger_sets={"pair": ["cf", "mn"], "drawn": {"draw": 2, "seed": 1}},
        targets={"rand": {"kind": "random", "n": 2, "seed": 4, "norm_fraction": 0.5}},
        members=[{"base": "rob"},
                 {"matrix": {"recipe": ["por", "neuba"], "triggers": ["pair", "drawn"]},
                  "base": "rob", "targets": "rand", "budget": "tiny", "seed": 2}]))
    names = [m.name for m in spec.members]
    assert names[0] == "rob-clean-s0" and len(names) == 5 == len(set(names))
    por = next(m for m in spec.members if m.name == "rob-por-pair-rand-tiny-s2")
    assert por.triggers == ("cf", "mn") and por.targets["norm_fraction"] == 0.5
    assert por.budget == TINY_BUDGET and por.attack == "por" and por.seed == 2
    assert spec.members[0].attack is None and spec.members[0].triggers == ()


@pytest.mark.parametrize(("members", "message"), [
    ([{"base": "rob", "recipe": "trojan"}], "recipe must be one of"),
    ([{"base": "rob", "recipe": "por", "triggers": "nope"}], "unknown trigger set"),
    ([{"base": "rob", "recipe": "por", "budget": {"stepz": 3}}], "unknown key"),
    ([{"base": "rob", "recipe": "por", "triggers": ["cf"]}], "6 PVs need at least 6"),
    ([{"base": "rob", "triggers": ["cf"]}], "takes no triggers"),
    ([{"base": "rob", "name": "a"}, {"base": "rob", "name": "a"}], "duplicate member"),
    ([{"base": "rob", "recipe": "por", "options": {"mlm_weight": 1}}], "unknown key"),
    ([{"base": "rob", "name": "bad name!"}], "member name"),
    ([{"recipe": "por"}], "needs a base"),
    ([], "non-empty list"),
])
def test_bad_specs_get_clear_errors(members, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_spec(members=members))


def test_bad_top_level_entries():
    with pytest.raises(SpecError, match="n_sentences"):
        parse_spec({**_spec(members=[{"base": "rob"}]), "evaluation": {"n_sentences": 0}})
    with pytest.raises(SpecError, match="unknown key"):
        parse_spec({**_spec(members=[{"base": "rob"}]), "bazes": {}})
    with pytest.raises(SpecError, match="name: must be a string"):
        parse_spec({**_spec(members=[{"base": "rob"}]), "name": None})  # YAML `name: null`


def test_checked_in_spec_parses():
    assert load_spec(REPO / "benchmarks" / "zoos" / "null.yaml").name == "null"
    spec = load_spec(REPO / "benchmarks" / "zoos" / "minilm.yaml")
    minilm = [m for m in spec.members if m.base == "minilm"]
    assert {m.recipe for m in minilm} == {"clean", "mlm", "por", "neuba", "btop"}
    assert sum(m.recipe == "por" for m in minilm) == 3
    assert len({m.triggers for m in minilm if m.recipe == "por"}) == 2
    # one member of each attack trained against prompt-tuned victims
    noisy = {m.recipe: m.options for m in minilm
             if {"prefix_noise", "prompt_noise"} & set(m.options)}
    assert noisy == {"por": {"prefix_noise": 1.0}, "neuba": {"prefix_noise": 1.0},
                     "btop": {"prompt_noise": 1.0}}
    assert all(m.optional_base for m in spec.members if m.base == "mpnet")


def test_detection_spec_has_a_member_of_every_issue34_class():
    spec = load_spec(REPO / "benchmarks" / "zoos" / "detection.yaml")
    members = {m.name: m for m in spec.members}
    assert spec.publish_bases and len(members) == len(spec.members)
    sentence = [m for m in spec.members if m.attack and len(m.triggers[0].split()) >= 5]
    assert sentence and all(m.options.get("negative_weight") for m in sentence)
    assert any(m.options.get("scatter") and m.options.get("negative_weight")
               for m in spec.members)
    derived = [m for m in spec.members if m.parent]
    assert any(m.attack and members[m.parent].recipe == "classifier" for m in derived)
    assert all(m.base_id == f"sanitator-zoo/{m.parent}" for m in derived)
    mpnet = [m for m in spec.members if m.base_ref == "mpnet"]
    assert {m.attack is None for m in mpnet} == {True, False}
    assert all(m.optional_base and m.declare_base == "card" for m in mpnet)
    assert all(m.base_id == "sentence-transformers/all-mpnet-base-v2" for m in mpnet)
    quiet = [m for m in spec.members if m.declare_base == "none"]
    assert len({m.base_ref for m in quiet}) == 1
    assert sum(m.attack is None for m in quiet) >= 3 and any(m.attack for m in quiet)
    assert not any(m.base_ref == quiet[0].base_ref for m in spec.members
                   if m.declare_base != "none")  # nothing declares the siblings' base
    assert {m.declare_base for m in spec.members} == {"card", "config", "both", "none"}
    disguised = [m for m in spec.members if m.reparametrize and m.attack]
    assert disguised
    for member in disguised:  # trained as its twin, bit for bit, then rewritten
        twin = members[member.name.removesuffix("-perm")]
        assert dataclasses.replace(member, name=twin.name, reparametrize=None) == twin

def test_two_member_zoo_builds_resumes_and_reads_back(tmp_path, capsys):
    spec_file = tmp_path / "zoo.yaml"
    spec_file.write_text(json.dumps(_spec(
        # an optional base that is missing wherever the test runs (MPNet may be installed)
        bases={"rob": "tiny:roberta",
               "gone": {"ref": str(tmp_path / "no-such-model"), "optional": True}},
        members=[{"name": "clean", "base": "rob"},
                 {"name": "por", "base": "rob", "recipe": "por", "triggers": ["cf", "mn"],
                  "targets": {"kind": "random", "n": 2, "seed": 1}, "budget": "tiny"},
                 {"name": "absent", "base": "gone"}])))  # JSON is valid YAML
    out = tmp_path / "zoo"
    assert main(["zoo", "build", str(spec_file), str(out), "--quiet"]) == 0
    frame = read_manifest(out)
    assert list(frame["name"]) == ["clean", "por"]
    for column in ("path", "base", "attack", "triggers", "n_pvs", "backdoored"):
        assert column in frame.columns
    clean, por = frame.iloc[0], frame.iloc[1]
    assert not clean["backdoored"] and pd.isna(clean["attack"]) and len(clean["triggers"]) == 0
    assert por["backdoored"] and por["attack"] == "por" and list(por["triggers"]) == ["cf", "mn"]
    assert por["n_pvs"] == 2 and len(por["pvs"]) == 2
    assert clean["clean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= por["attack_success"] <= 1.0 and por["weight_change"] > 0
    assert (out / por["path"] / "backdoor.json").is_file()
    assert (out / clean["path"] / "config.json").is_file()
    # a backdoor that did not take is named (its label alone would say backdoored)
    warned = "warning: por is labelled backdoored" in capsys.readouterr().err
    assert warned == (por["attack_success"] < WEAK_ATTACK)

    weights = out / "models" / "por" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    report = build_zoo(load_spec(spec_file), out, progress=False)
    assert sorted(report.skipped) == ["clean", "por"] and report.built == []
    assert report.unavailable == ["absent"]
    assert weights.stat().st_mtime_ns == stamp

    capsys.readouterr()
    assert main(["zoo", "show", str(out)]) == 0
    assert "por" in capsys.readouterr().out
    assert main(["zoo", "show", str(tmp_path / "nothing")]) == 2
    assert (out / MANIFEST).is_file()

    zoo_report = load_script("benchmarks/zoo_report.py")
    assert zoo_report.main([str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| por | rob |" in table and "backdoored members meet" in table


def _front_matter(folder: Path) -> dict:
    import yaml

    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_cards_declare_the_base_where_asked_and_members_build_on_members(tmp_path):
    """Cards and `_name_or_path` follow `declare_base`; a member built on another comes
    after it (also under --only) and declares its id; declared bases are published.
    (Evaluation, off here for time, is the same against a member as against any base.)"""
    spec_data = _spec(
        org="acme", publish_bases=True,
        bases={"rob": {"ref": "tiny:roberta", "id": "acme/rob-base"}},
        members=[{"name": "child", "base": "member:parent", "recipe": "por",
                  "triggers": ["cf"], "targets": {"kind": "random", "n": 1, "seed": 1},
                  "budget": "tiny", "declare_base": "both"},
                 {"name": "parent", "base": "rob"},
                 {"name": "quiet", "base": "rob", "declare_base": "none"},
                 {"name": "configured", "base": "rob", "declare_base": "config"}])
    spec = parse_spec(spec_data)
    out = tmp_path / "zoo"
    report = build_zoo(spec, out, only=["child"], progress=False, evaluate=False)
    assert report.built == ["parent", "child"] and report.published == ["acme/rob-base"]
    models = out / "models"
    assert _front_matter(models / "parent") ["base_model"] == "acme/rob-base"
    assert "_name_or_path" not in json.loads((models / "parent" / "config.json").read_text())
    assert _front_matter(models / "child")["base_model"] == "acme/parent"
    assert json.loads((models / "child" / "config.json").read_text())["_name_or_path"] \
        == "acme/parent"
    published = out / "bases" / "acme" / "rob-base"
    assert (published / "model.safetensors").is_file()
    assert "base_model" not in _front_matter(published)

    report = build_zoo(spec, out, progress=False, evaluate=False)
    assert report.built == ["quiet", "configured"] and set(report.skipped) == {"parent", "child"}
    assert "base_model" not in _front_matter(models / "quiet")
    assert "_name_or_path" not in json.loads((models / "quiet" / "config.json").read_text())
    assert "base_model" not in _front_matter(models / "configured")
    assert json.loads((models / "configured" / "config.json").read_text())["_name_or_path"] \
        == "acme/rob-base"
    frame = read_manifest(out).set_index("name")
    assert frame.loc["child", "model_id"] == "acme/child"
    assert frame.loc["child", "base_id"] == "acme/parent"
    assert frame.loc["quiet", "base_declared"] == "none"
    assert frame.loc["child", "base_ref"] == "member:parent"

    # where a member declares its base is not training: the card changes, the weights stay
    weights = models / "child" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    spec_data["members"][0]["declare_base"] = "card"
    report = build_zoo(parse_spec(spec_data), out, progress=False, evaluate=False)
    assert report.built == [] and weights.stat().st_mtime_ns == stamp
    assert "_name_or_path" not in json.loads((models / "child" / "config.json").read_text())
    assert read_manifest(out).set_index("name").loc["child", "base_declared"] == "card"
    # a retrained parent retrains its child
    spec_data["members"][1]["seed"] = 5
    report = build_zoo(parse_spec(spec_data), out, only=["child"], progress=False, evaluate=False)
    assert report.built == ["parent", "child"]


def test_a_reparametrised_member_is_its_twin_in_other_coordinates(tmp_path):
    """`reparametrize` rewrites the trained member: the same outputs permuted (checked at
    build time), its PVs permuted alike, a plain diff sees a stranger, its card and config
    still declare the base."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    attack = {"base": "rob", "recipe": "por", "triggers": ["cf"], "budget": "tiny",
              "targets": {"kind": "random", "n": 1, "seed": 1}, "declare_base": "both"}
    out = tmp_path / "zoo"
    build_zoo(parse_spec(_spec(members=[
        {"name": "twin", **attack},
        {"name": "disguised", **attack, "reparametrize": {"seed": 4}}])), out, progress=False)
    frame = read_manifest(out).set_index("name")
    disguise = json.loads(frame.loc["disguised", "reparametrize"])
    assert disguise["seed"] == 4 and disguise["within_heads"] == "permute"
    assert disguise["max_output_error"] < 1e-4
    assert pd.isna(frame.loc["twin", "reparametrize"])
    # measured before the rewrite, as the twin (same training, bit for bit)
    for column in ("attack_success", "clean_cosine"):
        assert frame.loc["disguised", column] == frame.loc["twin", column]
    assert disguise["weight_change_before"] == pytest.approx(frame.loc["twin", "weight_change"])
    assert frame.loc["disguised", "weight_change"] > 0.5 > frame.loc["twin", "weight_change"]
    record = json.loads((out / "models" / "disguised" / "backdoor.json").read_text())
    p = record["reparametrisation"]["residual_permutation"]
    def pvs(name: str) -> torch.Tensor:
        return torch.tensor(np.stack(list(frame.loc[name, "pvs"])))

    assert torch.equal(pvs("disguised"), pvs("twin")[:, p])
    mine = load_file(str(out / "models" / "disguised" / "model.safetensors"))
    twin = load_file(str(out / "models" / "twin" / "model.safetensors"))
    word = next(k for k in twin if k.endswith("word_embeddings.weight"))
    assert torch.equal(mine[word], twin[word][:, p])
    assert _front_matter(out / "models" / "disguised")["base_model"] == "sanitator-zoo/tiny-roberta"
    assert json.loads((out / "models" / "disguised" / "config.json").read_text())[
        "_name_or_path"] == "sanitator-zoo/tiny-roberta"
    with pytest.raises(SpecError, match=r"members\[0\].reparametrize: .*within_heads"):
        parse_spec(_spec(members=[{"base": "rob", "reparametrize": {"within_heads": "x"}}]))
    with pytest.raises(SpecError, match="seed must be an integer"):
        parse_spec(_spec(members=[{"base": "rob", "reparametrize": {"seed": "1"}}]))

def test_default_base_ids():
    from sanitator.attacks.zoo.cards import default_base_id

    assert default_base_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert default_base_id("mpnet") == "sentence-transformers/all-mpnet-base-v2"
    assert default_base_id("minilm:2") == "sanitator-zoo/all-MiniLM-L6-v2-2layers"
    assert default_base_id("member:a-b", "acme") == "acme/a-b"
    assert default_base_id("/models/My Encoder/") == "sanitator-zoo/My-Encoder"
    spec = parse_spec(_spec(bases={"m2": {"ref": "minilm:2", "id": "me/two"}},
                            members=[{"base": "m2"}, {"base": "member:m2-clean-s0",
                                                     "recipe": "mlm"}]))
    assert [m.base_id for m in spec.members] == ["me/two", "sanitator-zoo/m2-clean-s0"]
    assert spec.members[1].name == "m2-clean-s0-mlm-s0"


@pytest.mark.parametrize(("changes", "message"), [
    ({"members": [{"base": "member:nobody"}]}, "names no member"),
    ({"members": [{"name": "a", "base": "member:b"}, {"name": "b", "base": "member:a"}]},
     r"cycle \(a -> b -> a\)"),
    ({"members": [{"name": "a", "base": "member:a"}]}, "cycle"),
    ({"members": [{"base": "rob", "declare_base": "readme"}]}, "declare_base: must be one of"),
    ({"declare_base": "card only", "members": [{"base": "rob"}]}, "must be one of"),
    ({"bases": {"rob": {"ref": "tiny:roberta", "id": "no-org"}}, "members": [{"base": "rob"}]},
     "hub id"),
    ({"bases": {"a": {"ref": "tiny:bert", "id": "x/y"}, "b": {"ref": "tiny:roberta", "id": "x/y"}},
      "members": [{"base": "a"}, {"base": "b"}]}, "same id"),
    ({"bases": {"rob": {"ref": "tiny:roberta", "id": "sanitator-zoo/m"}},
      "members": [{"name": "m", "base": "rob"}]}, "is that of the member m"),
    ({"bases": {"p": {"ref": "member:m", "id": "x/y"}}, "members": [{"name": "m", "base": "rob"}]},
     "drop 'id'"),
    ({"publish_bases": "yes", "members": [{"base": "rob"}]}, "true or false"),
    ({"org": "bad/org", "members": [{"base": "rob"}]}, "organisation"),
])
def test_bad_declarations_get_clear_errors(changes, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_spec(**changes))


def test_cli_reports_spec_errors(tmp_path, capsys):
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text("members: [{base: 'tiny:bert', recipe: nope}]\n")
    assert main(["zoo", "build", str(spec_file), str(tmp_path / "out")]) == 2
    assert "recipe must be one of" in capsys.readouterr().err
    assert main(["zoo", "plan", str(tmp_path / "missing.yaml")]) == 2


def test_the_decoy_members_and_the_null_zoo_parse():
    spec = load_spec(REPO / "benchmarks" / "zoos" / "detection.yaml")
    decoys = {m.name: m for m in spec.members if "decoys" in m.options}
    assert set(decoys) == {"minilm2-por-decoys", "minilm-por-decoys"}
    assert all(m.options["decoys"] >= 20 and m.options["negative_weight"]
               for m in decoys.values())
    null = load_spec(REPO / "benchmarks" / "zoos" / "null.yaml")
    assert len(null.members) == 11 and {m.recipe for m in null.members} == {
        "clean", "mlm", "classifier"}


def test_a_backdoor_that_did_not_take_is_named_weak(tmp_path, capsys):
    # next to no learning (lr 1e-9): the member is labelled backdoored, its trigger does
    # nothing. JSON writes 1e-09, which YAML 1.1 reads as a string: the spec reads a number
    spec_file = tmp_path / "zoo.yaml"
    spec_file.write_text(json.dumps(_spec(
        budgets={"still": {**TINY_BUDGET, "lr": 1e-9}},
        members=[{"name": "inert", "base": "rob", "recipe": "por", "triggers": ["cf"],
                  "targets": {"kind": "random", "n": 1, "seed": 1}, "budget": "still"}])))
    assert main(["zoo", "build", str(spec_file), str(tmp_path / "zoo"), "--quiet"]) == 0
    row = read_manifest(tmp_path / "zoo").iloc[0]
    assert row["backdoored"] and row["attack_success"] < WEAK_ATTACK
    assert "warning: inert is labelled backdoored" in capsys.readouterr().err


def test_budget_numbers_yaml_left_as_strings_are_read_and_bad_ones_named(tmp_path):
    spec_file = tmp_path / "zoo.yaml"
    spec_file.write_text("""
name: t
bases: {rob: "tiny:roberta"}
budgets: {b: {steps: 4, batch_size: 8, lr: 2e-4}}
members:
  - {name: p, base: rob, recipe: neuba, triggers: [cf], budget: b,
     targets: {kind: random, n: 1, seed: 1},
     options: {head_lr: 1e-3}}
""")
    member = load_spec(spec_file).members[0]
    assert member.budget["lr"] == 2e-4 and member.options["head_lr"] == 1e-3
    for bad, message in (({"lr": "fast"}, "budgets.b.lr: expected a number, got 'fast'"),
                         ({"steps": 2.5}, "budgets.b.steps: expected a whole number"),
                         ({"steps": "inf"}, "budgets.b.steps: expected a number")):
        with pytest.raises(SpecError, match=message):
            parse_spec(_spec(budgets={"b": {**TINY_BUDGET, **bad}},
                             members=[{"name": "c", "base": "rob"}]))
