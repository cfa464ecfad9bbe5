"""The in-context search: gradients, exact evaluation, coordinate steps, repulsion."""

import pytest
import torch

from sanitator.detect import hardsearch as hs
from sanitator.detect.attribution import candidate_token_ids
from sanitator.detect.config import MiningConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.encoders import load_encoder
from sanitator.detect.mining import prepare_data

CONFIG = MiningConfig(max_length=32, batch_size=8)


@pytest.fixture(scope="module")
def setting(minilm_1layer):
    encoder = load_encoder(minilm_1layer)
    data = prepare_data(encoder, load_sentences(n=16, seed=5), CONFIG, seed=0)
    return encoder, data


def test_evaluate_matches_the_objective_of_the_spliced_outputs(setting):
    encoder, data = setting
    objective = hs.collapse(hs.unit_scale(data.clean))
    ids = torch.tensor([[2000, 2001], [3000, 3001]])
    values = hs.evaluate(encoder, data, list(range(8)), ids, CONFIG, objective)
    with torch.no_grad():
        direct = objective(hs._outputs(encoder, data, list(range(8)), ids, CONFIG))
    assert torch.allclose(values, direct, atol=1e-5)


def test_token_gradients_rank_the_whole_vocabulary(setting):
    encoder, data = setting
    objective = hs.collapse(hs.unit_scale(data.clean))
    gains = hs.token_gradients(encoder, data, list(range(8)), torch.tensor([2000, 2001, 2002]),
                               CONFIG, objective)
    assert gains.shape == (3, encoder.word_embeddings.num_embeddings)
    assert torch.isfinite(gains).all() and gains.abs().sum() > 0


def test_gcg_never_gets_worse_and_stays_in_the_allowed_vocabulary(setting):
    encoder, data = setting
    objective = hs.collapse(hs.unit_scale(data.clean))
    allowed = torch.zeros(encoder.word_embeddings.num_embeddings, dtype=torch.bool)
    allowed[candidate_token_ids(encoder)[:5000]] = True
    result = hs.gcg(encoder, data, [2000, 2001], CONFIG, objective, allowed=allowed,
                    grad_rows=list(range(8)), eval_rows=list(range(8, 12)), steps=4, top_k=8,
                    n_candidates=8, patience=4)
    assert result.trace == sorted(result.trace)  # only improvements are kept
    changed = [t for t, s in zip(result.ids, (2000, 2001), strict=True) if t != s]
    assert all(bool(allowed[t]) for t in changed)


def test_repulsion_lowers_the_value_near_a_known_point(setting):
    encoder, data = setting
    scale = hs.unit_scale(data.clean)
    base = hs.collapse(scale)
    with torch.no_grad():
        out = hs._outputs(encoder, data, list(range(8)), torch.tensor([[2000]]), CONFIG)
    pushed = hs.repelled(base, out.mean(dim=1), scale)   # repel the very point reached
    far = hs.repelled(base, -out.mean(dim=1), scale)     # a point with opposite signs
    assert float(pushed(out)[0]) < float(base(out)[0])
    assert float(far(out)[0]) == pytest.approx(float(base(out)[0]))
