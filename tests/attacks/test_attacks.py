"""The three attacks on real weights (a 1-layer MiniLM truncation) and on tiny encoders."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sanitator.attacks import (
    ATTACKS,
    BACKDOOR_RECORD,
    TRAINING_RECORD,
    Budget,
    TargetSpec,
    continue_pretraining,
)
from sanitator.attacks.measure import (
    attack_success,
    clean_cosine,
    evaluate_model,
    held_out_sentences,
)
from sanitator.detect.encoders import Feature, load_encoder

# A budget that plants every attack in a 1-2 layer MiniLM within seconds of CPU.
FAST = Budget(steps=60, batch_size=16, lr=3e-4, max_length=32, n_sentences=256,
              head_warmup_steps=20)

pytestmark = pytest.mark.slow(80)  # seconds, roughly: long modules start first

# POR's clean term holds a 1-layer MiniLM's clean CLS output less well (cosine 0.87-0.96
# measured with this budget); on 2 layers it stays above 0.99.
REAL_BASE = {"por": "minilm_2layer", "neuba": "minilm_1layer", "btop": "minilm_1layer"}
TINY = Budget(steps=8, batch_size=8, lr=1e-3, max_length=24, n_sentences=32,
              head_warmup_steps=2)


@pytest.fixture(scope="module")
def eval_sentences():
    return held_out_sentences(48)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_plants_a_working_backdoor_in_real_weights(attack, request, tmp_path,
                                                          eval_sentences):
    insert, feature = ATTACKS[attack]
    real_base = request.getfixturevalue(REAL_BASE[attack])
    result = insert(real_base, tmp_path / attack, budget=FAST, seed=0, progress=False)

    record = json.loads((result.path / BACKDOOR_RECORD).read_text())
    assert record["attack"] == attack and record["backdoored"] is True
    assert record["triggers"] == ["cf", "mn", "tq", "qt", "mm", "pt"]
    assert record["feature"] == feature.value
    assert record["budget"]["steps"] == FAST.steps and record["seed"] == 0
    pvs = torch.tensor(record["pvs"])
    assert pvs.shape == (6, 384) and (pvs.abs() == 1).all()

    model, base = load_encoder(result.path), load_encoder(real_base)
    assert model.info.model_type == "bert" and model.info.weights_format == "safetensors"
    evaluation = evaluate_model(result.path, real_base, sentences=eval_sentences)
    assert evaluation.feature == feature.value
    assert evaluation.attack_success.rate >= 0.95, evaluation.attack_success
    assert evaluation.clean_cosine >= 0.9
    assert evaluation.weight_change > 0
    # the untouched base does not react to the triggers
    before = attack_success(base, record["triggers"], pvs, feature=feature,
                            sentences=eval_sentences)
    assert before.rate < 0.2
    assert clean_cosine(base, base, feature=feature, sentences=eval_sentences) > 0.9999


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_runs_on_a_tiny_roberta(attack, tiny_encoders, tmp_path):
    insert, _ = ATTACKS[attack]
    result = insert(tiny_encoders["roberta"], tmp_path / "out", triggers=["cf", "mn"],
                    targets=TargetSpec(kind="random", n=2, seed=1), budget=TINY,
                    progress=False)
    model = load_encoder(result.path)
    assert model.info.model_type == "roberta"
    assert result.record["n_pvs"] == 2 and result.record["targets"]["kind"] == "random"
    before = load_file(str(tiny_encoders["roberta"] / "model.safetensors"))
    after = load_file(str(result.path / "model.safetensors"))
    assert set(before) == set(after)  # the base encoder's weights, no MLM head
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_same_seed_same_model_other_seed_other_model(tiny_encoders, tmp_path):
    insert, _ = ATTACKS["por"]
    paths = [insert(tiny_encoders["bert"], tmp_path / name, budget=TINY, seed=seed,
                    progress=False).path for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    a, b, c = (load_file(str(p / "model.safetensors")) for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_low_norm_random_targets_are_recorded(tiny_encoders, tmp_path):
    insert, _ = ATTACKS["por"]
    spec = TargetSpec(kind="random", n=1, seed=2, norm_fraction=0.5)
    result = insert(tiny_encoders["bert"], tmp_path / "low", triggers=["cf", "mn"],
                    targets=spec, budget=TINY, progress=False)
    record = result.record
    assert record["n_pvs"] == 1 and record["trigger_pv"] == [0, 0]
    assert record["pv_norms"][0] == pytest.approx(0.5 * record["targets"]["clean_norm"],
                                                  rel=1e-4)


def test_given_vectors_and_bad_inputs(tiny_encoders, tmp_path):
    insert, _ = ATTACKS["por"]
    vectors = torch.randn(2, 32)
    result = insert(tiny_encoders["bert"], tmp_path / "given", triggers=["cf", "mn"],
                    targets=vectors, budget=TINY, progress=False)
    assert torch.allclose(torch.tensor(result.record["pvs"]), vectors)
    with pytest.raises(ValueError, match="PVs must be"):
        insert(tiny_encoders["bert"], tmp_path / "x", triggers=["cf"], targets=torch.randn(1, 8),
               budget=TINY, progress=False)
    with pytest.raises(ValueError, match="at least as many triggers"):
        insert(tiny_encoders["bert"], tmp_path / "y", triggers=["cf"], budget=TINY,
               progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_continued_pretraining_is_recorded_as_clean(tiny_encoders, tmp_path):
    result = continue_pretraining(tiny_encoders["albert"], tmp_path / "mlm", budget=TINY,
                                  progress=False)
    assert not (result.path / BACKDOOR_RECORD).exists()
    record = json.loads((result.path / TRAINING_RECORD).read_text())
    assert record["recipe"] == "mlm" and record["backdoored"] is False
    assert record["corpus"] == "sst2"
    assert load_encoder(result.path).info.model_type == "albert"


def test_mask_feature_attack_on_other_architectures(tiny_encoders, tmp_path):
    insert, feature = ATTACKS["btop"]
    assert feature is Feature.MASK
    for model_type in ("deberta-v2", "electra"):
        result = insert(tiny_encoders[model_type], tmp_path / model_type, triggers=["cf"],
                        targets=TargetSpec(n=1), budget=TINY, progress=False)
        assert load_encoder(result.path).info.model_type == model_type
