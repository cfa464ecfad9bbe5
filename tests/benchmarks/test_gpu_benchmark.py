"""`benchmarks/gpu.py`: the forward counter that sizes a scan's encoder work."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_forward_counter_counts_encoder_forwards_tokens_and_gradients(tiny_encoders):
    from transformers import AutoModel

    gpu = _load()
    model = AutoModel.from_pretrained(tiny_encoders["bert"])
    ids = torch.ones(3, 7, dtype=torch.long)
    with gpu.ForwardCounter() as counter:
        with torch.no_grad():
            model(input_ids=ids)
        model(inputs_embeds=model.embeddings.word_embeddings(ids[:2]))  # a gradient pass
        model.encoder.layer[0](torch.zeros(1, 4, model.config.hidden_size))  # not an encoder
    assert (counter.forwards, counter.grad_forwards, counter.tokens) == (2, 1, 3 * 7 + 2 * 7)
    model(input_ids=ids)  # the hook is gone after the block
    assert counter.forwards == 2
