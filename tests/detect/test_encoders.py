import json
import shutil

import pytest
import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.encoders import (
    Feature,
    ModelRejected,
    load_encoder,
    native_bf16,
    preflight,
    resolve_precision,
)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_preflight_counts_parameters_from_the_header(minilm_1layer):
    info = preflight(minilm_1layer)
    encoder = load_encoder(minilm_1layer)
    assert info.n_params == encoder.n_params
    assert info.weights_format == "safetensors"


def test_unsupported_architecture_is_named(tiny_encoders):
    with pytest.raises(ModelRejected) as error:
        preflight(tiny_encoders["gpt2"])
    assert error.value.status == "unsupported"
    assert "gpt2" in error.value.reason


def test_pickle_only_weights_are_refused_unless_allowed(tiny_encoders, tmp_path):
    folder = _copy(tiny_encoders["bert"], tmp_path / "pickled")
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelRejected, match="pickle") as error:
        preflight(folder)
    assert error.value.status == "error"
    encoder = load_encoder(folder, allow_pickle=True)
    assert encoder.info.weights_format == "pickle"
    assert encoder.info.n_params == encoder.n_params


def test_missing_and_corrupt_weights_are_errors(tiny_encoders, tmp_path):
    empty = _copy(tiny_encoders["bert"], tmp_path / "empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelRejected, match="no weights"):
        preflight(empty)
    corrupt = _copy(tiny_encoders["bert"], tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ModelRejected, match="corrupt"):
        preflight(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelRejected):
        load_encoder(corrupt)


def test_no_config_and_size_limit(tiny_encoders, tmp_path):
    with pytest.raises(ModelRejected, match=r"config\.json"):
        preflight(tmp_path)
    with pytest.raises(ModelRejected, match="exceed"):
        preflight(tiny_encoders["bert"], max_params=1000)


def test_remote_code_is_never_trusted(tiny_encoders, tmp_path):
    folder = _copy(tiny_encoders["bert"], tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    encoder = load_encoder(folder)
    assert type(encoder.model).__name__ == "BertModel"


def test_features_have_the_hidden_size(tiny_encoders):
    for arch in ("albert", "electra", "distilbert", "deberta-v2", "roberta"):
        encoder = load_encoder(tiny_encoders[arch])
        batch = encoder.tokenizer(["a short sentence", "another one here"], padding=True,
                                  return_tensors="pt")
        cls = encoder.forward_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"])
        assert cls.shape == (2, encoder.hidden_size), arch
        if arch == "albert":
            assert encoder.embedding_size != encoder.hidden_size
    with pytest.raises(ModelRejected, match="pooler"):
        encoder = load_encoder(tiny_encoders["distilbert"])
        batch = encoder.tokenizer(["x y"], return_tensors="pt")
        encoder.forward_features(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"], feature=Feature.POOLER)


def test_precision_resolves_per_device_and_faithful_stays_float32():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) is torch.float32
    assert resolve_precision("bfloat16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if native_bf16(cpu)
                                              else torch.float32)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("float16", cpu)
    with pytest.raises(ValueError, match="precision"):  # refused with the config, not later
        ScanConfig.from_preset("fast", precision="bf16")
    assert ScanConfig.from_preset("faithful").precision == "float32"
    assert ScanConfig.from_preset("fast").precision == "auto"


def test_bf16_features_are_float32_and_keep_the_signs(minilm_2layer):
    encoder = load_encoder(minilm_2layer)
    batch = encoder.tokenizer(["the cat sat on the mat", "a quiet evening by the river",
                               "prices rose sharply in the third quarter"],
                              padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    full = encoder.forward_features(**inputs)
    encoder.compute_dtype = torch.bfloat16
    half = encoder.forward_features(**inputs)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)  # the matmuls really ran in bf16
    # the monitor reads signs: bf16 rounding may flip only dimensions near zero
    assert float(((half > 0) == (full > 0)).float().mean()) > 0.98
