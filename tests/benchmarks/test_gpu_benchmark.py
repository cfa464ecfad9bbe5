"""`benchmarks/gpu.py`: the forward counter that sizes a scan's encoder work."""


import torch
from scripts_support import load_script


def test_forward_counter_counts_encoder_forwards_tokens_and_gradients(tiny_encoders):
    from transformers import AutoModel

    gpu = load_script("benchmarks/gpu.py", "gpu_bench")
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
