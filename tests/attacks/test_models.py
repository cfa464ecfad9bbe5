from transformers import AutoConfig, AutoModel

from sanitator.attacks.models import TINY_ARCHITECTURES, minilm_path


def test_minilm_ships_safetensors():
    path = minilm_path()
    assert (path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(path).model_type == "bert"


def test_tiny_encoders_load_with_their_architecture(tiny_encoders):
    assert set(tiny_encoders) == set(TINY_ARCHITECTURES)
    for arch, path in tiny_encoders.items():
        assert (path / "model.safetensors").is_file()
        assert AutoConfig.from_pretrained(path).model_type == arch


def test_truncation_keeps_real_weights(minilm_2layer):
    full = AutoModel.from_pretrained(minilm_path())
    cut = AutoModel.from_pretrained(minilm_2layer)
    assert cut.config.num_hidden_layers == 2
    assert (cut.embeddings.word_embeddings.weight == full.embeddings.word_embeddings.weight).all()
    first_full = full.encoder.layer[1].output.dense.weight
    assert (cut.encoder.layer[1].output.dense.weight == first_full).all()
