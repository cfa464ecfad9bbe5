"""Gradient-guided search for hard triggers *in context* (HotFlip / GCG-style steps).

A trigger a detector must find may do nothing alone between the special tokens, be a
string in no word list, or be several pieces that only fire together. So candidates are
judged where the backdoor acts: spliced into held-out sentences. Each step takes the
gradient of a smooth objective with respect to the one-hot trigger tokens, proposes
single-token swaps from the best-scoring tokens of each slot, evaluates every proposal
exactly in a batched forward pass, and keeps the best. The objective is the monitor's view
made smooth: per-unit tanh agreement of the triggered outputs' signs with a target sign
pattern (a mined PV), or with the triggered outputs' own mean (untargeted collapse), each
output scaled to unit RMS first so that, like the monitor, only signs count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from sanitator.detect.mining import MiningData, _forward

Objective = Callable[[torch.Tensor], torch.Tensor]  # outputs [S, B, H] -> [S], higher better


def unit_scale(clean: torch.Tensor) -> torch.Tensor:
    """[H] per-unit spread of the clean outputs (kept for callers that weigh units)."""
    return clean.std(dim=0).clamp_min(1e-6)


SHARPNESS = 3.0  # tanh(3 z) is within 1% of sign(z) for |z| > 0.9 (z in RMS units)


def soft_signs(out: torch.Tensor) -> torch.Tensor:
    """Smooth signs of outputs [..., H], each output scaled to unit RMS first: like the
    monitor, the objective reads signs and is blind to the output's norm (a low-norm PV
    pins signs as firmly as a large one)."""
    rms = out.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
    return torch.tanh(SHARPNESS * out / rms)


def toward(target: torch.Tensor, scale: torch.Tensor | None = None) -> Objective:
    """Mean smooth sign agreement of every triggered output with the target's signs."""
    signs = torch.where(target >= 0, 1.0, -1.0)

    def objective(out: torch.Tensor) -> torch.Tensor:
        return (soft_signs(out) * signs.to(out.device)).mean(dim=(1, 2))
    return objective


def collapse(scale: torch.Tensor | None = None) -> Objective:
    """Mean smooth sign agreement of every triggered output with their own mean's signs
    (detached): high when one trigger sends every sentence to one sign pattern."""

    def objective(out: torch.Tensor) -> torch.Tensor:
        signs = torch.where(out.mean(dim=1, keepdim=True) >= 0, 1.0, -1.0).detach()
        return (soft_signs(out) * signs).mean(dim=(1, 2))
    return objective


def repelled(objective: Objective, known: torch.Tensor, scale: torch.Tensor,
             weight: float = 1.0) -> Objective:
    """`objective` minus the smooth agreement of the triggered outputs' mean with the
    nearest known PV [K, H]: search mode looks for the next PV, not the same one again."""
    signs = torch.where(known >= 0, 1.0, -1.0)

    def pushed(out: torch.Tensor) -> torch.Tensor:
        mean = soft_signs(out.mean(dim=1))                                # [S, H]
        near = (mean[:, None] * signs.to(out.device)[None]).mean(dim=-1)  # [S, K]
        return objective(out) - weight * near.max(dim=1).values.clamp_min(0.0)
    return pushed


@dataclass
class SearchResult:
    ids: tuple[int, ...]
    value: float                 # objective on the evaluation rows
    steps: int
    trace: list[float] = field(default_factory=list)


def _outputs(encoder, data: MiningData, rows: list[int], ids: torch.Tensor, config
             ) -> torch.Tensor:
    """Outputs [S, B, H] for S hard triggers `ids` [S, L] spliced into `rows`."""
    embeds = encoder.word_embeddings(ids.to(encoder.device)).float()
    return _forward(encoder, data, rows, embeds, replace(config, trigger_len=ids.shape[1]))


def token_gradients(encoder, data: MiningData, rows: list[int], ids: torch.Tensor, config,
                    objective: Objective) -> torch.Tensor:
    """[L, V]: first-order gain of the objective from putting token v in slot l."""
    weight = encoder.word_embeddings.weight
    embeds = weight[ids.to(encoder.device)].detach().float().clone().requires_grad_(True)
    out = _forward(encoder, data, rows, embeds[None],
                   replace(config, trigger_len=ids.shape[0]))
    objective(out).sum().backward()
    grad = embeds.grad                                           # [L, E]
    return (grad @ weight.detach().float().T).cpu()              # [L, V]


@torch.no_grad()
def evaluate(encoder, data: MiningData, rows: list[int], candidates: torch.Tensor, config,
             objective: Objective, chunk: int = 64) -> torch.Tensor:
    """Objective [S] of S candidate triggers [S, L] on `rows`."""
    values = []
    for start in range(0, len(candidates), chunk):
        values.append(objective(_outputs(encoder, data, rows, candidates[start:start + chunk],
                                         config)).cpu())
    return torch.cat(values)


def gcg(encoder, data: MiningData, init: list[int], config, objective: Objective, *,
        allowed: torch.Tensor, grad_rows: list[int], eval_rows: list[int], steps: int = 20,
        top_k: int = 32, n_candidates: int = 48, patience: int = 4,
        generator: torch.Generator | None = None) -> SearchResult:
    """Coordinate search from `init` (token ids): each step proposes `n_candidates` single
    swaps drawn from the `top_k` tokens of a random slot's gradient, keeps the best if it
    improves, and stops after `patience` steps without improvement."""
    generator = generator or torch.Generator().manual_seed(0)
    current = torch.tensor(init)
    best = float(evaluate(encoder, data, eval_rows, current[None], config, objective)[0])
    trace, idle, step = [best], 0, 0
    blocked = ~allowed
    for step in range(1, steps + 1):  # noqa: B007 (the last step is reported)
        gains = token_gradients(encoder, data, grad_rows, current, config, objective)
        gains[:, blocked] = -float("inf")
        top = gains.topk(top_k, dim=1).indices                  # [L, k]
        slots = torch.randint(len(current), (n_candidates,), generator=generator)
        picks = torch.randint(top_k, (n_candidates,), generator=generator)
        candidates = current.repeat(n_candidates, 1)
        candidates[torch.arange(n_candidates), slots] = top[slots, picks]
        candidates = torch.unique(candidates, dim=0)
        values = evaluate(encoder, data, eval_rows, candidates, config, objective)
        index = int(values.argmax())
        if float(values[index]) > best + 1e-4:
            best, current, idle = float(values[index]), candidates[index], 0
        else:
            idle += 1
        trace.append(best)
        if idle >= patience:
            break
    return SearchResult(tuple(current.tolist()), best, step, trace)
