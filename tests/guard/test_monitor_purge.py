"""MonitoredEncoder's wave purge, original predictions and length-sorted batching."""

from types import SimpleNamespace

import torch

from sanitator.guard.monitor import MonitoredEncoder, SignMonitor, delete_word_variants

PV = torch.tensor([1.0, 1.0, -1.0, -1.0])


class TextTokenizer:
    """Hands the model row ids into a list of the texts it has seen."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, texts, *_args, **_kwargs):
        ids = []
        for text in texts:
            ids.append(len(self.seen))
            self.seen.append(text)
        return {"input_ids": torch.tensor(ids)[:, None]}


class TriggerModel(torch.nn.Module):
    """Outputs the PV when 'cf' is in the text; predicts 1 when 'good' is (or 'cf' is)."""

    def __init__(self, tokenizer: TextTokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer

    def forward(self, input_ids):
        texts = [self.tokenizer.seen[i] for i in input_ids[:, 0].tolist()]
        words = [text.split() for text in texts]
        feature = torch.stack([PV if "cf" in w else torch.tensor([0.5, -0.5, 0.5, -0.5])
                               for w in words])
        positive = torch.tensor([float("good" in w or "cf" in w) for w in words])
        return SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=1),
                               feature=feature)


def _monitored(on_flag="purge", wave=2, batch_size=3):
    tokenizer = TextTokenizer()
    model = TriggerModel(tokenizer)
    return MonitoredEncoder(model, tokenizer, SignMonitor(PV[None]), on_flag=on_flag,
                            batch_size=batch_size, purge_wave=wave), tokenizer


def _leftmost_passing(text: str) -> str | None:
    return next((v for v in delete_word_variants(text) if "cf" not in v.split()), None)


def test_wave_purge_keeps_the_leftmost_passing_variant_and_saves_forwards():
    texts = ["a bad film", "one two three four five cf six", "x cf", "cf", "bad cf bad cf"]
    monitored, tokenizer = _monitored(wave=2)
    batch = monitored.predict(texts)
    assert batch.flagged.tolist() == [False, True, True, True, True]
    assert batch.original_predictions.tolist() == [0, 1, 1, 1, 1]
    expected = [texts[0], *[_leftmost_passing(t) for t in texts[1:]]]
    assert batch.purged_texts == expected
    assert batch.purged_texts[3] == ""  # deleting the only word leaves an empty input
    assert not batch.rejected.any()
    assert batch.predictions.tolist() == [0, 0, 0, 0, 0]
    every_variant = sum(len(delete_word_variants(t)) for t in texts[1:])
    assert len(tokenizer.seen) - len(texts) < every_variant


def test_wave_size_does_not_change_the_result():
    texts = [f"w{i} " * i + "cf tail" for i in range(1, 9)] + ["plain good text"]
    one, _ = _monitored(wave=1)
    many, _ = _monitored(wave=50)
    first, second = one.predict(texts), many.predict(texts)
    assert first.purged_texts == second.purged_texts
    assert torch.equal(first.predictions, second.predictions)


def test_reject_policy_and_batches_come_back_in_input_order():
    texts = ["a much longer good sentence here", "cf", "good", "short bad"]
    monitored, _ = _monitored(on_flag="reject", batch_size=2)
    batch = monitored.predict(texts)
    assert batch.original_predictions.tolist() == [1, 1, 1, 0]
    assert batch.predictions.tolist() == [1, -1, 1, 0]
    assert batch.purged_texts == [texts[0], None, texts[2], texts[3]]
    assert monitored.predict([]).predictions.numel() == 0
