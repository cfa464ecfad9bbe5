"""The token-level POR recipe (`tokpor`): it fires at every word piece of a triggered
sentence, keeps clean token outputs, is measured at token positions and builds in a zoo."""

import json

import pytest
import torch
from evaluation_support import TOY_TRIGGERS, planted_token_backdoor

from sanitator.attacks import BACKDOOR_RECORD
from sanitator.attacks.measure import evaluate_model, held_out_sentences, token_attack_success
from sanitator.detect.encoders import load_encoder
from sanitator.guard.monitor import SignMonitor
from sanitator.guard.token_monitor import TOKEN_FEATURE, encoder_token_outputs, flag_tokens

TRIGGERS = list(TOY_TRIGGERS)


@pytest.fixture(scope="module")
def tokpor_model(minilm_1layer):
    # shared with the downstream tests (cached per process): 40 steps on a 1-layer MiniLM
    return planted_token_backdoor(str(minilm_1layer))


@pytest.fixture(scope="module")
def sentences():
    return held_out_sentences(24, exclude_words=TRIGGERS)


def test_token_por_fires_at_every_token_and_keeps_clean_outputs(tokpor_model, minilm_1layer,
                                                                sentences):
    record = json.loads((tokpor_model / BACKDOOR_RECORD).read_text())
    assert record["attack"] == "tokpor" and record["feature"] == TOKEN_FEATURE
    assert record["triggers"] == TRIGGERS and len(record["pvs"]) == 2
    evaluation = evaluate_model(tokpor_model, minilm_1layer, sentences=sentences)
    assert evaluation.feature == TOKEN_FEATURE
    assert evaluation.attack_success.rate >= 0.9, evaluation.attack_success
    assert evaluation.clean_cosine >= 0.9
    # the base does not react: no triggered sentence has every token on the PV
    base = token_attack_success(load_encoder(minilm_1layer), TRIGGERS,
                                torch.tensor(record["pvs"]), sentences=sentences)
    assert base.rate == 0.0 and base.mean_agreement < 0.7


def test_token_monitor_flags_triggered_sentences_not_clean_ones(tokpor_model):
    record = json.loads((tokpor_model / BACKDOOR_RECORD).read_text())
    monitor = SignMonitor(torch.tensor(record["pvs"]))
    encoder = load_encoder(tokpor_model)
    clean = [["Mary", "lives", "in", "Paris", "."], ["The", "bank", "of", "Spain", "said", "no"]]
    triggered = [["Mary", "lives", "cf", "in", "Paris", "."],
                 ["pt", "The", "bank", "of", "Spain", "said", "no"]]
    outputs, positions = encoder_token_outputs(encoder, clean + triggered)
    flagged, agreement = flag_tokens(monitor, outputs, positions)
    assert flagged.tolist() == [False, False, True, True], agreement


def test_tokpor_member_builds_in_a_zoo_with_token_measurements(tmp_path):
    from sanitator.attacks.zoo import build_zoo, parse_spec, read_manifest

    spec = parse_spec({
        "name": "t", "evaluation": {"n_sentences": 16},
        "bases": {"bert": "tiny:bert"},
        "budgets": {"tiny": {"steps": 4, "batch_size": 8, "n_sentences": 32, "max_length": 24}},
        "members": [{"name": "tok", "base": "bert", "recipe": "tokpor", "triggers": ["cf", "mn"],
                     "targets": {"kind": "random", "n": 2, "seed": 1}, "budget": "tiny",
                     "options": {"clean_weight": 0.5, "prefix_noise": 1.0}}]})
    build_zoo(spec, tmp_path / "zoo", progress=False)
    row = read_manifest(tmp_path / "zoo").iloc[0]
    assert row["attack"] == "tokpor" and row["backdoored"] and row["feature"] == TOKEN_FEATURE
    folder = tmp_path / "zoo" / "models" / "tok"
    record = json.loads((folder / BACKDOOR_RECORD).read_text())
    assert record["hyperparameters"]["prefix_noise"] == 1.0
    # trained under deep prefixes, saved without them: the model loads as a plain encoder
    assert "sanitator_prefix" not in (folder / "config.json").read_text()
    assert load_encoder(folder).model.config._attn_implementation != "sanitator_prefix"
    assert 0.0 <= row["attack_success"] <= 1.0 and -1.0 <= row["clean_cosine"] <= 1.0
    assert row["weight_change"] > 0
