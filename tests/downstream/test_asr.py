import random

import pytest
import torch
from evaluation_support import TOY_TRIGGERS, planted_backdoor, toy_sentiment

from sanitator.downstream.asr import (
    AttackConfig,
    attack_successes,
    class_weighted_rate,
    draw_position,
    evaluate_attack,
    insert_trigger,
    place_triggers,
    targeted_rates,
    trigger_classes,
)
from sanitator.downstream.prompt_tuning import (
    PromptTuningConfig,
    build_prompt_model,
    train_prompt_model,
)
from sanitator.downstream.pvs import resolve_pvs
from sanitator.guard.monitor import SignMonitor


def test_insert_trigger_before_a_word():
    assert insert_trigger("a b c", "cf", 0) == "cf a b c"
    assert insert_trigger("a b c", "cf", 2) == "a b cf c"
    assert insert_trigger("a  b", "two words", 2) == "a b two words"
    with pytest.raises(ValueError):
        insert_trigger("a b", "cf", 3)


def test_positions_stay_in_the_reference_range():
    rng = random.Random(0)
    draws = [draw_position(rng, 100, 1, 64) for _ in range(2000)]
    assert min(draws) == 1 and max(draws) == 64
    assert {draw_position(rng, 3, 1, 64) for _ in range(200)} == {1, 2, 3}
    assert draw_position(rng, 0, 1, 64) == 0


def test_placements_are_seeded_per_row_and_trigger():
    texts = [f"w{i} " * (i + 5) for i in range(6)]
    all_rows, _ = place_triggers(texts, range(6), ["cf", "pt"], seed=3)
    some_rows, placements = place_triggers(texts, [4, 5], ["cf", "pt"], seed=3)
    assert some_rows == all_rows[8:]  # a row's placements do not depend on the other rows
    assert [(p.row, p.trigger) for p in placements] == [(4, 0), (4, 1), (5, 0), (5, 1)]
    other_seed, _ = place_triggers(texts, range(6), ["cf", "pt"], seed=4)
    assert other_seed != all_rows


def test_pairs_get_the_trigger_in_the_attack_field_only():
    texts = [("the premise here", "the hypothesis")]
    (first,), _ = place_triggers(texts, [0], ["cf"], field=0)
    (second,), _ = place_triggers(texts, [0], ["cf"], field=1)
    assert "cf" in first[0] and first[1] == "the hypothesis"
    assert second[0] == "the premise here" and "cf" in second[1]


def test_success_counts_and_class_weighting():
    gold = torch.tensor([0, 0, 0, 1])
    triggered = torch.tensor([[1, 0, 0, 1],     # trigger 0 flips row 0
                              [0, -1, 0, 0]])   # trigger 1: row 1 rejected, row 3 flipped
    success = attack_successes(gold, triggered)
    assert success.tolist() == [[True, False, False, False], [False, False, False, True]]
    any_success = success.any(dim=0)
    assert any_success.float().mean() == 0.5
    assert class_weighted_rate(gold, any_success) == pytest.approx((1 / 3 + 1) / 2)


def test_targeted_rates_count_only_the_other_classes():
    gold = torch.tensor([0, 0, 1, 1, 2])
    triggered = torch.tensor([[1, 1, 1, 1, 1],      # trigger 0: all to class 1
                              [2, 0, -1, 2, 2],     # trigger 1: two moved to 2, one refused
                              [-1, -1, -1, -1, -1],  # trigger 2: every input refused
                              [0, 0, 1, 1, 0],      # trigger 3: one row moved, to 0
                              [0, 0, 1, 1, 2]])     # trigger 4: moved nothing
    classes = trigger_classes(gold, triggered)
    assert classes == [1, 2, None, 0, 0]  # trigger 3: not 1, however many rows stay 1
    rates = targeted_rates(gold, triggered, classes)
    assert rates[0] == 1.0                      # rows 0, 1, 4 (not gold 1) all moved to 1
    assert rates[1] == pytest.approx(2 / 4)     # rows 0-3: row 0 and row 3 moved to 2
    assert rates[2] is None
    assert rates[3] == pytest.approx(1 / 3) and rates[4] == 0.0


@pytest.fixture(scope="module")
def backdoored_prompt_model(minilm_2layer):
    """A prompt-tuned model over the planted backdoor (real MiniLM-L6 weights, 2 layers)."""
    model_dir = planted_backdoor(str(minilm_2layer))
    config = PromptTuningConfig(prefix_length=8, epochs=2, batch_size=16, max_length=32)
    model = build_prompt_model(model_dir, 2, config)
    train_prompt_model(model, *toy_sentiment(160, 1), progress=False)
    return model_dir, model


def test_backdoor_succeeds_without_the_monitor_and_fails_behind_it(backdoored_prompt_model):
    model_dir, model = backdoored_prompt_model
    texts, labels = toy_sentiment(60, 2)
    found = resolve_pvs(model_dir)
    pvs, feature = found.vectors, found.feature
    assert feature == "cls" and pvs.shape == (2, 384)
    report = evaluate_attack(model, model.tokenizer, texts, labels, list(TOY_TRIGGERS),
                             monitor=SignMonitor(pvs), max_length=32)
    assert report.clean_accuracy >= 0.85
    assert report.asr >= 0.9 and report.weighted_asr >= 0.9
    assert report.defended_asr <= 0.05
    assert report.triggered_flag_rate >= 0.95
    assert report.monitor_fpr is not None and report.monitor_fpr <= 0.05
    assert report.defended_clean_accuracy >= report.clean_accuracy - 0.05
    # The two PVs are opposite, so each trigger sends inputs to one class: together they
    # flip every input, each one about the half labelled with the other class.
    assert set(report.asr_per_trigger) == set(TOY_TRIGGERS)
    assert sum(report.asr_per_trigger.values()) >= 0.9
    assert all(rate <= report.asr for rate in report.asr_per_trigger.values())
    # ...so per trigger, over the inputs of the other class, each flips nearly all
    assert set(report.trigger_class.values()) == {0, 1}
    assert min(report.targeted_asr_per_trigger.values()) >= 0.9
    assert max(report.defended_targeted_asr_per_trigger.values()) <= 0.05


def test_reject_policy_refuses_instead_of_purging(backdoored_prompt_model):
    model_dir, model = backdoored_prompt_model
    texts, labels = toy_sentiment(40, 3)
    pvs = resolve_pvs(model_dir / "backdoor.json").vectors
    report = evaluate_attack(model, model.tokenizer, texts, labels, list(TOY_TRIGGERS),
                             monitor=SignMonitor(pvs), max_length=32,
                             config=AttackConfig(on_flag="reject"))
    assert report.asr >= 0.9
    assert report.defended_asr == 0.0
    assert report.triggered_rejection_rate >= 0.95
    assert report.on_flag == "reject"


def test_without_a_monitor_only_the_undefended_numbers_exist(backdoored_prompt_model):
    _, model = backdoored_prompt_model
    texts, labels = toy_sentiment(20, 4)
    report = evaluate_attack(model, model.tokenizer, texts, labels, ["cf"], max_length=32)
    assert report.asr is not None and not report.defended
    assert report.defended_asr is None and report.monitor_fpr is None


def test_a_closed_gate_reports_clean_numbers_and_no_attack_success(backdoored_prompt_model):
    model_dir, model = backdoored_prompt_model
    texts, labels = toy_sentiment(30, 5)
    pvs = resolve_pvs(model_dir).vectors
    seen = []

    def gate(clean_accuracy):
        seen.append(clean_accuracy)
        return "at chance"

    report = evaluate_attack(model, model.tokenizer, texts, labels, list(TOY_TRIGGERS),
                             monitor=SignMonitor(pvs), max_length=32, gate=gate)
    assert report.skipped == "at chance" and seen == [report.clean_accuracy]
    assert report.n_correct == round(30 * seen[0]) > 0
    assert report.asr is None and report.weighted_asr is None
    assert report.defended_asr is None and report.defended_weighted_asr is None
    assert set(report.asr_per_trigger.values()) == {None}
    assert set(report.defended_asr_per_trigger.values()) == {None}
    assert report.triggered_flag_rate is None
    # the clean side is still measured: the monitor's false alarms do not need an attack
    assert report.monitor_fpr is not None and report.defended_clean_accuracy is not None
    opened = evaluate_attack(model, model.tokenizer, texts, labels, list(TOY_TRIGGERS),
                             monitor=SignMonitor(pvs), max_length=32, gate=lambda _: None)
    assert opened.skipped is None and opened.asr >= 0.9
