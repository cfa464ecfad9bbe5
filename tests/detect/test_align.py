"""Alignment undoes a reparametrisation: a rewritten copy of a derived model is diffed as
what it is, and an ordinary fine-tune keeps its own coordinates."""

import copy

import torch

from sanitator.attacks.reparam import Reparametrisation, reparametrize_model
from sanitator.detect.align import align, assignment
from sanitator.detect.layout import find_layout, model_layout
from sanitator.detect.reference import distance_keys


def nudged(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """A copy with every weight moved by `scale` of its spread (a stand-in fine-tune)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return out


def relative(ours, theirs, keys) -> float:
    diff = sum(float((ours[k] - theirs[k]).pow(2).sum()) for k in keys) ** 0.5
    return diff / sum(float(theirs[k].pow(2).sum()) for k in keys) ** 0.5


def test_assignment_solves_what_the_row_maxima_cannot():
    similarity = torch.tensor([[0.9, 0.8, 0.0], [0.95, 0.1, 0.0], [0.0, 0.2, 0.7]])
    assert assignment(similarity).tolist() == [1, 0, 2]
    assert assignment(torch.eye(4)).tolist() == [0, 1, 2, 3]


def test_a_rewritten_fine_tune_aligns_back_to_its_base(minilm_1layer):
    from sanitator.detect.encoders import load_encoder

    base_model = load_encoder(minilm_1layer).model
    layout = model_layout(base_model)
    base = {k: v.clone() for k, v in layout.canonical(base_model.state_dict()).items()}
    tuned = nudged(base_model, 0.02)
    plain = layout.canonical(tuned.state_dict())
    keys = distance_keys(plain)
    change = relative(plain, base, keys)
    for within in ("permute", "rotate"):
        model = copy.deepcopy(tuned)
        reparametrize_model(model, Reparametrisation(seed=7, within_heads=within))
        ours = layout.canonical(model.state_dict())
        assert relative(ours, base, keys) > 1.0                     # a stranger to a diff
        result = align(ours, base, layout)
        assert result is not None and result.moved
        assert abs(relative(ours, result.state, keys) - change) < 0.1 * change
    untouched = align(plain, base, layout)                          # a plain fine-tune
    assert untouched is not None and not untouched.moved
    assert relative(plain, untouched.state, keys) == change


def test_an_unrelated_model_does_not_align(minilm_1layer):
    from sanitator.detect.encoders import load_encoder

    base_model = load_encoder(minilm_1layer).model
    layout = model_layout(base_model)
    base = layout.canonical(base_model.state_dict())
    stranger = {k: torch.randn_like(v) * v.std() + v.mean() for k, v in base.items()}
    assert align(stranger, base, layout) is None


def test_layouts_name_roles_for_every_naming_scheme():
    bert = find_layout(["bert.embeddings.word_embeddings.weight",
                        "bert.embeddings.LayerNorm.weight"]
                       + [f"bert.encoder.layer.0.{m}.{k}" for m in (
                           "attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense", "attention.output.LayerNorm",
                           "intermediate.dense", "output.dense", "output.LayerNorm")
                          for k in ("weight", "bias")], n_heads=2)
    assert bert is not None and bert.scheme == "bert" and bert.n_layers == 1
    assert bert.names["layer.0.ffn_in.weight"] == "bert.encoder.layer.0.intermediate.dense.weight"
    missing = find_layout(["bert.embeddings.word_embeddings.weight",
                           "bert.encoder.layer.0.attention.self.query.weight"], n_heads=2)
    assert missing is None
