import json

import pytest
import torch
from evaluation_support import toy_sentiment

from sanitator.detect.encoders import ModelRejected, load_encoder
from sanitator.downstream.prompt_tuning import (
    PromptTuningConfig,
    build_prompt_model,
    load_prompt,
    predict,
    save_prompt,
    tokenize,
    train_prompt_model,
    trainable_parameters,
)
from sanitator.guard.monitor import MonitoredEncoder, SignMonitor

TOY = dict(prefix_length=8, epochs=2, batch_size=16, max_length=32)


def _accuracy(model, texts, labels) -> float:
    predictions, _ = predict(model, texts)
    return float((predictions == torch.tensor(labels)).float().mean())


@pytest.fixture(scope="module")
def toy():
    return toy_sentiment(160, 1), toy_sentiment(60, 2)


@pytest.fixture(scope="module")
def trained_ptv2(toy, minilm_2layer):
    (train_x, train_y), _ = toy
    model = build_prompt_model(minilm_2layer, 2, PromptTuningConfig(**TOY, learning_rate=1e-2))
    before = {name: value.clone() for name, value in model.encoder.state_dict().items()}
    stats = train_prompt_model(model, train_x, train_y, progress=False)
    return model, before, stats


def test_ptv2_learns_the_toy_task_with_the_encoder_bit_identical(trained_ptv2, toy):
    model, before, stats = trained_ptv2
    _, (test_x, test_y) = toy
    assert _accuracy(model, test_x, test_y) >= 0.85
    (train_x, train_y), _ = toy
    # the recorded train accuracy is the trained model's own, not the running one
    assert stats.train_accuracy == pytest.approx(_accuracy(model, train_x, train_y))
    assert 0 < stats.last_epoch_accuracy <= 1
    after = model.encoder.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert stats.steps == 2 * 10 and stats.config["learning_rate"] == 1e-2


def test_only_prompt_and_head_parameters_train(trained_ptv2):
    model, _, stats = trained_ptv2
    names = set(trainable_parameters(model))
    assert names == {"prefix.weight", "head.weight", "head.bias"}
    assert not any(p.requires_grad for p in model.encoder.parameters())
    layers = model.n_layers * 2 * model.n_heads * model.head_dim
    assert stats.trainable_params == 8 * layers + 384 * 2 + 2


def test_prefixes_change_the_output_and_padding_does_not(trained_ptv2, minilm_2layer):
    model, _, _ = trained_ptv2
    short, long = "the film was great .", "honestly , the soundtrack was really quite boring ."
    _, alone = predict(model, [short])
    _, batched = predict(model, [short, long])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    encoder = load_encoder(minilm_2layer)
    plain = encoder.model(**tokenize(encoder.tokenizer, [short], 32, "cpu")).last_hidden_state
    assert (plain[0, 0] - alone[0]).abs().max() > 1e-2


def test_monitored_encoder_wraps_a_prompt_model(trained_ptv2, toy):
    model, _, _ = trained_ptv2
    _, (test_x, _) = toy
    direct, features = predict(model, test_x[:20])
    monitor = SignMonitor(torch.zeros(0, 384))
    batch = MonitoredEncoder(model, model.tokenizer, monitor, max_length=32).predict(test_x[:20])
    assert torch.equal(batch.predictions, direct)
    assert features.shape == (20, 384)


def test_save_and_load_round_trip(trained_ptv2, toy, tmp_path, minilm_2layer):
    model, _, _ = trained_ptv2
    _, (test_x, _) = toy
    path = save_prompt(model, tmp_path / "prompt.safetensors", encoder_path=minilm_2layer)
    again = load_prompt(path)
    first, _ = predict(model, test_x)
    second, _ = predict(again, test_x)
    assert torch.equal(first, second)
    assert torch.equal(model.prefix.weight, again.prefix.weight)
    assert torch.equal(model.feature_norm.mean, again.feature_norm.mean)
    assert torch.equal(model.feature_norm.var, again.feature_norm.var)


def test_prompt_files_from_before_the_standardiser_still_load(tmp_path, minilm_1layer):
    from safetensors.torch import load_file, save_file

    config = PromptTuningConfig(prefix_length=2, max_length=16, standardize=False)
    model = build_prompt_model(minilm_1layer, 2, config)
    path = save_prompt(model, tmp_path / "prompt.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    settings = json.loads(meta["config"])
    del settings["standardize"]  # as written before the option existed
    save_file(load_file(str(path)), str(path), metadata={**meta, "config": json.dumps(settings)})
    again = load_prompt(path)
    assert again.config.standardize is False and isinstance(again.feature_norm, torch.nn.Identity)


@pytest.mark.parametrize("layers", [1, 2])
def test_standardised_head_learns_on_shallow_encoders_where_the_plain_head_cannot(
        toy, layers, minilm_1layer, minilm_2layer):
    # In 1-2 layer MiniLM the CLS vector barely moves with the input; the plain head stays
    # at chance, the standardised one learns (docs/evaluation.md, convergence).
    (train_x, train_y), (test_x, test_y) = toy
    encoder = {1: minilm_1layer, 2: minilm_2layer}[layers]
    accuracy = {}
    for standardize in (False, True):
        config = PromptTuningConfig(**TOY, standardize=standardize)
        model = build_prompt_model(encoder, 2, config)
        stats = train_prompt_model(model, train_x, train_y, progress=False)
        accuracy[standardize] = (stats.train_accuracy, _accuracy(model, test_x, test_y))
    assert max(accuracy[False]) <= 0.65
    assert min(accuracy[True]) >= 0.85


def test_standardiser_statistics_are_the_trained_models_own(trained_ptv2, toy):
    model, _, _ = trained_ptv2
    (train_x, _), _ = toy
    _, features = predict(model, train_x)
    norm = model.feature_norm
    assert torch.allclose(norm.mean, features.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, features.var(0, unbiased=False).mean(), rtol=1e-3)


def test_ptv1_learns_the_toy_task_through_the_mask(toy, minilm_2layer):
    (train_x, train_y), (test_x, test_y) = toy
    config = PromptTuningConfig(method="ptv1", epochs=3, batch_size=16, max_length=32,
                                learning_rate=3e-3)
    model = build_prompt_model(minilm_2layer, 2, config, verbalizer=("bad", "good"))
    before = [p.clone() for p in model.encoder.parameters()]
    train_prompt_model(model, train_x, train_y, progress=False)
    assert _accuracy(model, test_x, test_y) >= 0.75
    assert all(torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(),
                                                 strict=True))
    # The feature is the mask position's hidden state: after [CLS] and the prompt tokens.
    output = model(**tokenize(model.tokenizer, test_x[:3], 32, "cpu"))
    assert model.mask_index == 3 and output.feature.shape == (3, 384)


@pytest.mark.parametrize("arch", ["bert", "roberta", "albert", "distilbert", "electra"])
def test_deep_prompts_plug_into_every_supported_family(tiny_encoders, arch):
    config = PromptTuningConfig(prefix_length=4, epochs=1, batch_size=4, max_length=16)
    model = build_prompt_model(tiny_encoders[arch], 3, config)
    stats = train_prompt_model(model, ["a b c", "d e", "f g h i", "j"], [0, 1, 2, 1],
                               progress=False)
    assert stats.steps == 1
    assert model.n_layers == 2  # one prefix per attention call, ALBERT's shared layer included
    predictions, features = predict(model, ["a b", "c d e f"])
    assert predictions.shape == (2,) and features.shape[0] == 2
    assert model.prefix.weight.grad is not None


def test_unsupported_family_and_bad_settings_are_refused(tiny_encoders):
    with pytest.raises(ModelRejected, match="ptv1"):
        build_prompt_model(tiny_encoders["deberta-v2"], 2, PromptTuningConfig())
    with pytest.raises(ValueError, match="unknown prompt-tuning method"):
        PromptTuningConfig(method="lora")
    with pytest.raises(ValueError, match="verbaliser"):
        build_prompt_model(tiny_encoders["bert"], 2, PromptTuningConfig(method="ptv1"))
    model = build_prompt_model(tiny_encoders["bert"], 2, PromptTuningConfig(max_length=8))
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        train_prompt_model(model, ["a", "b"], [0, 2], progress=False)


def test_feature_spread_is_robust_to_a_few_outliers():
    from sanitator.downstream.prompt_base import feature_spread

    generator = torch.Generator().manual_seed(0)
    steady = 0.05 + 1e-3 * torch.randn(200, 16, generator=generator)
    assert feature_spread(steady) == pytest.approx(0.02, rel=0.2)
    spiked = steady.clone()
    spiked[:4] = 1.0  # a few inputs pushed onto a PV
    assert feature_spread(spiked) < 0.03
    assert feature_spread(torch.randn(200, 16, generator=generator)) > 5


def test_auto_mode_standardises_only_where_the_cls_feature_barely_varies(toy, minilm_2layer):
    from sanitator.attacks.models import minilm_path
    from sanitator.downstream.prompt_base import SPREAD_THRESHOLD

    (train_x, train_y), _ = toy
    config = PromptTuningConfig(prefix_length=4, epochs=1, batch_size=32, max_length=32)
    assert config.standardize is None
    shallow = build_prompt_model(minilm_2layer, 2, config)
    stats = train_prompt_model(shallow, train_x[:64], train_y[:64], progress=False)
    assert stats.standardized and stats.feature_spread < SPREAD_THRESHOLD
    assert bool(shallow.feature_norm.active)
    # all six layers of MiniLM make the CLS feature move from input to input: plain head
    varied = build_prompt_model(minilm_path(), 2, config)
    stats = train_prompt_model(varied, train_x[:64], train_y[:64], progress=False)
    assert not stats.standardized and stats.feature_spread > SPREAD_THRESHOLD
    # ptv1's fresh head is always standardised; forcing the setting skips the measurement
    forced = build_prompt_model(minilm_2layer, 2, PromptTuningConfig(standardize=False,
                                                                     max_length=32))
    stats = train_prompt_model(forced, train_x[:32], train_y[:32], progress=False)
    assert not stats.standardized and stats.feature_spread is None


def test_deep_prefixes_reach_every_layer_and_leave_the_encoder_as_it_was(minilm_1layer):
    from sanitator.downstream.prefix_tuning import deep_prefixes, prefix_layout

    encoder = load_encoder(minilm_1layer)
    before = encoder.model.config._attn_implementation
    layers, heads, head_dim = prefix_layout(encoder)
    assert (layers, heads * head_dim) == (1, encoder.hidden_size)
    assert encoder.model.config._attn_implementation == before
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        seeded = torch.Generator().manual_seed(0)
        table = torch.randn(layers, 2, 1, heads, 4, head_dim, generator=seeded)
        with deep_prefixes(encoder, table[:, 0], table[:, 1]):
            prefixed = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        again = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(plain, prefixed, atol=1e-3)
    assert torch.equal(plain, again) and encoder.model.config._attn_implementation == before
