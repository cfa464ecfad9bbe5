"""Random victim prompts during attack training (sanitator.attacks.prompt_noise)."""

import pytest
import torch

from sanitator.attacks.batches import mask_one_token
from sanitator.attacks.common import Budget, prepare
from sanitator.attacks.prompt_noise import PROMPT_TOKENS, PrefixNoise, SoftPromptNoise

SENTENCES = ["the river runs past the old mill", "a quiet evening in the town square",
             "she wrote the letter twice before sending it", "rain fell on the long road"]


@pytest.fixture
def setup(minilm_1layer):
    return prepare(minilm_1layer, budget=Budget(steps=1, batch_size=4, n_sentences=4),
                   seed=0, corpus=SENTENCES)


@torch.no_grad()
def test_prefix_noise_perturbs_only_the_first_rows_and_only_every_other_call(setup):
    inputs = setup.corpus.batch(torch.arange(4)).model_inputs(setup.device)
    plain = setup.model(**inputs).last_hidden_state
    noise = PrefixNoise(setup, 1.0)
    first, second = noise.hidden(inputs, 2), noise.hidden(inputs, 2)
    torch.testing.assert_close(first, plain)  # odd calls run plain
    assert not torch.allclose(second[:2], plain[:2], atol=1e-3)  # prefixed rows moved
    torch.testing.assert_close(second[2:], plain[2:])  # clean rows run plain
    torch.testing.assert_close(PrefixNoise(setup, 0.0).hidden(inputs, 2), plain)
    with pytest.raises(ValueError, match="prefix_noise"):
        PrefixNoise(setup, -1.0)
    # the encoder is left as it was: no prefix attention after the call
    torch.testing.assert_close(setup.model(**inputs).last_hidden_state, plain)


@torch.no_grad()
def test_soft_prompt_noise_reads_the_mask_after_the_inserted_prompt(setup):
    batch, positions, _ = mask_one_token(setup.corpus.batch(torch.arange(4)),
                                         setup.tokenizer.mask_token_id, setup.generator)
    noise = SoftPromptNoise(setup, 1.0)
    assert [noise.due() for _ in range(4)] == [False, True, False, True]
    assert not any(SoftPromptNoise(setup, 0.0).due() for _ in range(2))

    state = setup.generator.get_state()
    got = noise.at(batch, positions)
    # the same draw by hand: prompt vectors after the first token, mask read k places later
    setup.generator.set_state(state)
    table = setup.encoder.word_embeddings
    scale = float(table.weight.std()) * (0.5 + torch.rand((), generator=setup.generator).item())
    prompt = torch.randn((1, PROMPT_TOKENS, table.weight.shape[1]),
                         generator=setup.generator) * scale
    embeds = table(batch.input_ids)
    embeds = torch.cat([embeds[:, :1], prompt.expand(4, -1, -1), embeds[:, 1:]], dim=1)
    mask = torch.cat([batch.attention_mask[:, :1], torch.ones(4, PROMPT_TOKENS,
                      dtype=batch.attention_mask.dtype), batch.attention_mask[:, 1:]], dim=1)
    hidden = setup.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, hidden[torch.arange(4), positions + PROMPT_TOKENS])
    plain = setup.model(**batch.model_inputs()).last_hidden_state[torch.arange(4), positions]
    assert not torch.allclose(got, plain, atol=1e-3)
