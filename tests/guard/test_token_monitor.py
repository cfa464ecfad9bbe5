"""The per-token monitor on a stub tagger: a sentence is flagged when any word piece matches
a PV (special tokens never count), purged word by word, or rejected."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from sanitator.attacks.models import minilm_path
from sanitator.guard.monitor import SignMonitor
from sanitator.guard.token_monitor import MonitoredTagger, delete_word_indices, flag_tokens

HIDDEN = 8
PV = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1])


class StubTagger(torch.nn.Module):
    """Every piece of a sentence holding the trigger id outputs the PV and is tagged 1;
    otherwise pieces output -PV and are tagged 0. CLS always outputs the PV."""

    def __init__(self, trigger_id: int):
        super().__init__()
        self.trigger_id = trigger_id
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        fired = (input_ids == self.trigger_id).any(dim=1)[:, None, None]
        feature = torch.where(fired, PV, -PV).expand(*input_ids.shape, HIDDEN).clone()
        feature[:, 0] = PV
        logits = torch.stack([~fired[..., 0], fired[..., 0]], dim=-1).float()
        return SimpleNamespace(logits=logits.expand(*input_ids.shape, 2), feature=feature)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def tagger(tokenizer, on_flag="purge"):
    trigger_id = tokenizer.convert_tokens_to_ids("cf")
    return MonitoredTagger(StubTagger(trigger_id), tokenizer, SignMonitor(PV[None]),
                           on_flag=on_flag, purge_wave=1)


def test_flag_tokens_reads_word_pieces_only():
    outputs = torch.stack([torch.stack([PV, -PV, -PV]), torch.stack([-PV, -PV, PV])])
    positions = torch.tensor([[False, True, True], [False, True, True]])
    flagged, agreement = flag_tokens(SignMonitor(PV[None]), outputs, positions)
    assert flagged.tolist() == [False, True] and agreement.tolist() == [0.0, 1.0]


def test_triggered_sentences_are_flagged_and_purged_left_to_right(tokenizer):
    batch = tagger(tokenizer).predict([["John", "cf", "runs", "John"], ["Mary", "sings"]])
    assert batch.flagged.tolist() == [True, False]          # CLS's PV never counts
    assert batch.original_tags == [[1, 1, 1, 1], [0, 0]]
    # "John" (both) deleted first: still triggered; then "cf": passes
    assert batch.kept == [[0, 2, 3], [0, 1]]
    assert batch.tags == [[0, -1, 0, 0], [0, 0]] and not batch.rejected.any()


def test_reject_policy_refuses_flagged_sentences(tokenizer):
    batch = tagger(tokenizer, "reject").predict([["a", "cf"], ["b"]])
    assert batch.rejected.tolist() == [True, False]
    assert batch.tags == [[-1, -1], [0]] and batch.kept == [None, [0]]


def test_delete_word_indices_drops_each_word_with_its_repeats():
    assert delete_word_indices(["a", "b", "a", "c"]) == [[1, 3], [0, 2, 3], [0, 1, 2]]


def test_from_artifact_reads_the_token_pvs_of_a_mixed_set(tokenizer, tmp_path):
    from sanitator.detect.results import PVSet
    from sanitator.guard.pv_artifact import ARTIFACT_FORMAT, PVArtifact, write_pv_artifact

    vectors = torch.stack([-PV, PV])
    pvset = PVSet(vectors, torch.zeros(2, 1, 4), features=["cls", "token"])
    path = write_pv_artifact(tmp_path / "a.safetensors", PVArtifact(pvset, {
        "format": ARTIFACT_FORMAT, "format_version": "1", "model": "m", "revision": "abc1234",
        "status": "backdoored", "threshold": "0.8"}))
    model = StubTagger(tokenizer.convert_tokens_to_ids("cf"))
    guarded = MonitoredTagger.from_artifact(path, model, tokenizer, revision="abc1234")
    assert guarded.monitor.pvs.tolist() == [PV.tolist()] and guarded.monitor.threshold == 0.8
    assert guarded.predict([["a", "cf"], ["b"]]).flagged.tolist() == [True, False]
    with pytest.raises(ValueError, match="revision"):
        MonitoredTagger.from_artifact(path, model, tokenizer, revision="fff0000")
