"""Random prompts during training: the attacker who expects prompt-tuned victims.

A backdoor trained on plain forwards collapses the triggered output onto its PV; a victim's
trained deep prefixes (keys/values prepended at every layer) shift that output enough that
the victim's head may read some PVs as no class in particular. Every other step, the
triggered rows of the batch run under fresh random prefixes (`PREFIX_LENGTH` per layer,
normal with a standard deviation drawn in [0.5, 1.5] x `strength`, the scale of a freshly
initialised prefix table), so the collapse survives them; the clean rows always run plain,
because stealth is judged on the plain encoder.

`SoftPromptNoise` is the same idea for P-tuning v1 victims (BToP): random input vectors
where a ptv1 model puts its continuous prompt (after the first token).
"""

from __future__ import annotations

import torch

from sanitator.attacks.batches import TokenBatch
from sanitator.attacks.common import AttackSetup, read_feature
from sanitator.downstream.prefix_tuning import deep_prefixes, prefix_layout
from sanitator.downstream.prompt_base import PromptTuningConfig

PREFIX_LENGTH = PromptTuningConfig.prefix_length  # the victims' default deep prompt
PROMPT_TOKENS = PromptTuningConfig.prompt_tokens  # the ptv1 victims' default prompt


class PrefixNoise:
    """Last hidden states of a batch whose first rows run under random deep prefixes on
    every other call (`strength` 0: always plain)."""

    def __init__(self, setup: AttackSetup, strength: float):
        if strength < 0:
            raise ValueError(f"prefix_noise must be >= 0, got {strength}")
        self.setup, self.strength = setup, float(strength)
        self.layout = prefix_layout(setup.encoder) if strength > 0 else None
        self.calls = 0

    def cls(self, inputs: dict[str, torch.Tensor], n_prefixed: int) -> torch.Tensor:
        """[B, H] CLS outputs, as `hidden` (a plain call computes the CLS row only)."""
        if self._plain_call():
            return read_feature(self.setup, inputs)
        return self._prefixed(inputs, n_prefixed)[:, 0]

    def hidden(self, inputs: dict[str, torch.Tensor], n_prefixed: int) -> torch.Tensor:
        """[B, L, H] for the batch `inputs`; rows [:n_prefixed] under prefixes this call
        when it is an even one."""
        if self._plain_call():
            return self.setup.model(**inputs).last_hidden_state
        return self._prefixed(inputs, n_prefixed)

    def _plain_call(self) -> bool:
        self.calls += 1
        return self.layout is None or self.calls % 2 == 1

    def _prefixed(self, inputs: dict[str, torch.Tensor], n_prefixed: int) -> torch.Tensor:
        setup = self.setup
        layers, heads, head_dim = self.layout
        scale = self.strength * (0.5 + torch.rand((), generator=setup.generator).item())
        shape = (layers, 2, 1, heads, PREFIX_LENGTH, head_dim)
        table = torch.randn(shape, generator=setup.generator).to(setup.device) * scale
        expand = (-1, n_prefixed, -1, -1, -1)
        with deep_prefixes(setup.encoder, table[:, 0].expand(*expand),
                           table[:, 1].expand(*expand)):
            prefixed = setup.model(**{k: v[:n_prefixed] for k, v in inputs.items()}
                                   ).last_hidden_state
        if n_prefixed >= len(next(iter(inputs.values()))):
            return prefixed
        plain = setup.model(**{k: v[n_prefixed:] for k, v in inputs.items()}).last_hidden_state
        return torch.cat([prefixed, plain])


class SoftPromptNoise:
    """Mask-position outputs of a batch with `PROMPT_TOKENS` random input vectors after
    its first token (one draw per batch, as one trained prompt serves every input; standard
    deviation in [0.5, 1.5] x `strength` x that of the word embeddings)."""

    def __init__(self, setup: AttackSetup, strength: float):
        if strength < 0:
            raise ValueError(f"prompt_noise must be >= 0, got {strength}")
        self.setup, self.strength = setup, float(strength)
        self.calls = 0

    def due(self) -> bool:
        """True on every other call when active: this step runs under a random prompt."""
        self.calls += 1
        return self.strength > 0 and self.calls % 2 == 0

    def at(self, batch: TokenBatch, positions: torch.Tensor) -> torch.Tensor:
        """[B, H] outputs at `positions` (indices after the first token, counted before
        the prompt is inserted)."""
        setup, k = self.setup, PROMPT_TOKENS
        table = setup.encoder.word_embeddings
        ids, mask = batch.input_ids.to(setup.device), batch.attention_mask.to(setup.device)
        embeds = table(ids)
        scale = self.strength * float(table.weight.detach().float().std()) * (
            0.5 + torch.rand((), generator=setup.generator).item())
        prompt = torch.randn((1, k, embeds.shape[-1]), generator=setup.generator) * scale
        prompt = prompt.to(setup.device, embeds.dtype).expand(len(ids), -1, -1)
        embeds = torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], dim=1)
        mask = torch.cat([mask[:, :1], mask.new_ones(len(ids), k), mask[:, 1:]], dim=1)
        return read_feature(setup, {"attention_mask": mask, "inputs_embeds": embeds},
                            positions + k)
