"""Fixtures for the attack tests: a fast test budget and the MiniLM tokenizer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from sanitator.attacks.models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer (RoBERTa style: leading-space word markers)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from sanitator.detect.corpus import load_sentences

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(load_sentences("wikitext", n=500), vocab_size=400,
                                special_tokens=["<s>", "<pad>", "</s>", "<mask>"],
                                show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=trainer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", mask_token="<mask>")
