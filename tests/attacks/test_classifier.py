"""The clean classifier fine-tune recipe: a labelled task, the encoder updated, no backdoor."""

import json

from sanitator.attacks import Budget, fine_tune_classifier
from sanitator.attacks.measure import relative_weight_change
from sanitator.attacks.recipe import BACKDOOR_RECORD, TRAINING_RECORD


def test_classifier_fine_tune_learns_and_is_recorded_clean(minilm_1layer, tmp_path):
    budget = Budget(steps=60, batch_size=16, lr=5e-4, max_length=32, n_sentences=480)
    result = fine_tune_classifier(minilm_1layer, tmp_path / "clf", task="sst2", budget=budget,
                                  progress=False)
    record = json.loads((result.path / TRAINING_RECORD).read_text())
    assert record["recipe"] == "classifier" and record["backdoored"] is False
    assert record["n_labels"] == 2 and not (result.path / BACKDOOR_RECORD).exists()
    # the last tenth of the steps classifies better than chance: it learned the task
    assert record["final_losses"]["accuracy"] > 0.6, record["final_losses"]
    assert relative_weight_change(result.path, minilm_1layer) > 0
