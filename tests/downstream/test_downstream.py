import pytest

from sanitator.downstream.evaluate import check_convergence, majority_rate


def test_majority_rate_is_the_most_frequent_label_share():
    assert majority_rate([0, 0, 0, 1]) == 0.75
    assert majority_rate([2, 1, 0]) == pytest.approx(1 / 3)
    assert majority_rate([]) == 0.0


def test_accuracy_near_the_majority_class_is_not_converged():
    balanced, skewed = [0, 1] * 50, [0] * 87 + [1] * 13
    learnt = check_convergence(0.80, balanced, 0.75, balanced)
    assert learnt.converged and learnt.reason is None
    assert learnt.test_majority == 0.5 and learnt.margin == 0.10
    # clean accuracy 0.55 on a balanced test set: 5 points above chance
    chance = check_convergence(0.80, balanced, 0.55, balanced)
    assert not chance.converged
    assert "clean test accuracy 0.550" in chance.reason and "0.500" in chance.reason
    assert chance.reason.count("accuracy") == 1  # the train side is fine
    # on a skewed task, 0.95 is what always answering the majority class nearly gets
    skew = check_convergence(0.99, skewed, 0.95, skewed)
    assert not skew.converged and "0.870" in skew.reason
    assert check_convergence(0.99, skewed, 0.98, skewed).converged
    # a prompt that never learnt its training rows is not converged whatever the test says
    train = check_convergence(0.54, balanced, 0.80, balanced)
    assert not train.converged and "train accuracy 0.540" in train.reason
    assert "no attack success measured" in train.reason


def test_the_margin_is_a_setting():
    balanced = [0, 1] * 50
    assert not check_convergence(0.9, balanced, 0.65, balanced, margin=0.2).converged
    assert check_convergence(0.9, balanced, 0.65, balanced, margin=0.1).converged
