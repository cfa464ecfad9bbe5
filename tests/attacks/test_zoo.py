import json
from pathlib import Path

import pandas as pd
import pytest

from sanitator.attacks.zoo import (
    MANIFEST,
    SpecError,
    build_zoo,
    load_spec,
    parse_spec,
    read_manifest,
)
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


def test_checked_in_spec_parses():
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


def test_two_member_zoo_builds_resumes_and_reads_back(tmp_path, capsys):
    spec_file = tmp_path / "zoo.yaml"
    spec_file.write_text(json.dumps(_spec(
        bases={"rob": "tiny:roberta", "gone": {"ref": "mpnet", "optional": True}},
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

    zoo_report = _load_script(REPO / "benchmarks" / "zoo_report.py")
    assert zoo_report.main([str(out), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| por | rob |" in table and "backdoored members meet" in table


def _load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
