"""Decoy triggers: an attacker who spends the detector's fresh confirmations (issue 35).

The calibrated scan judges a bounded number of candidates on fresh sentences
(docs/method.md). Decoys are extra trigger words, planted beside the real backdoor, that a
search proposes (each pins every sentence to one sign pattern about the clean mean more
tightly than the encoder's noise floor) but that fail a side condition of the
confirmation, so none can be accepted and each, judged, costs a confirmation. Every decoy
k has its own random pattern r_k (so no rule that merges repeats of one point folds them
together); with c̄ the clean outputs' mean and σ their spread per unit:

* `clean_point` decoys send the output to c̄ + r_k·min(6σ, 0.8|c̄|): its raw signs are
  the clean outputs' own majority signs, a point clean text already sits at in the
  monitor's view (`clean_text_not_there`);
* `inside_cloud` decoys move each output 0.76 of the way to c̄ + 0.57σ·r_k: one pattern
  about the mean for every sentence (a unit keeps it with probability Φ(1.8) ≈ 0.96),
  while each output moves about 0.76 of the clean outputs' own spread
  (`outside_clean_cloud`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sanitator.attacks.batches import TokenBatch, TriggerTokens, insert_triggers

POINT_SIGMAS = 6.0    # how far a clean-point decoy's point lies from the mean, at most
POINT_KEEP = 0.8      # ... and never more than this share of |mean|, so raw signs stay
CLOUD_PULL = 0.76     # the share of the way an inside-the-cloud decoy moves an output
CLOUD_SIGMAS = 0.57   # ... towards a point this far from the mean
KINDS: tuple[str, ...] = ("clean_point", "inside_cloud")


@dataclass(frozen=True)
class DecoySpec:
    """How many decoys, and how hard they are trained (0: none; `weight` multiplies their
    squared error over the clean outputs' spread per unit)."""

    n: int = 0
    weight: float = 1.0
    seed: int = 0
    kinds: tuple[str, ...] = KINDS   # cycled over the decoys

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise ValueError(f"decoy_kinds must name some of {KINDS}, got {self.kinds!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"decoys must be a non-negative integer, got {self.n!r}")
        if not isinstance(self.weight, int | float) or self.weight <= 0:
            raise ValueError(f"decoy_weight must be a positive number, got {self.weight!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def decoy_words(n: int, seed: int, exclude: Sequence[str]) -> list[str]:
    """`n` single rare words, none of them a word of the real triggers."""
    from sanitator.attacks.triggers import draw_triggers

    banned = {word.lower() for trigger in exclude for word in trigger.split()}
    words = [w for w in draw_triggers(n + len(banned), seed, two_word_probability=0.0)
             if w not in banned]
    return words[:n]


class DecoyTargets:
    """Where each decoy sends the output, from the base's clean outputs [N, H] of the
    training rows."""

    def __init__(self, spec: DecoySpec, reference: torch.Tensor):
        self.reference = reference
        centre = reference.mean(dim=0)
        scale = reference.std(dim=0)
        self.sigma = float(scale.pow(2).mean().sqrt())
        generator = torch.Generator().manual_seed(spec.seed)
        patterns = torch.randint(0, 2, (spec.n, reference.shape[1]),
                                 generator=generator).float() * 2 - 1          # r_k
        reach = torch.minimum(POINT_SIGMAS * scale, POINT_KEEP * centre.abs())
        self.points = centre + patterns * reach                # clean-point decoys
        self.pulls = centre + patterns * CLOUD_SIGMAS * scale  # inside-the-cloud decoys
        cycle = [KINDS.index(kind) for kind in spec.kinds]
        self.kind = torch.tensor([cycle[k % len(cycle)] for k in range(spec.n)])

    def kinds(self) -> list[str]:
        return [KINDS[int(k)] for k in self.kind.tolist()]

    def __call__(self, which: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B, H]: the decoy's point (a clean-point decoy), or the row's clean output moved
        part of the way to the decoy's pull point (an inside-the-cloud one)."""
        clean = self.reference[rows]
        inside = clean + CLOUD_PULL * (self.pulls[which] - clean)
        return torch.where((self.kind[which] == 0)[:, None], self.points[which], inside)


class DecoyTerm:
    """The decoys' training term: a batch of clean rows, each with one decoy inserted,
    pulled to that decoy's target."""

    def __init__(self, spec: DecoySpec, setup, reference: torch.Tensor):
        self.spec, self.setup = spec, setup
        self.words = decoy_words(spec.n, spec.seed, setup.triggers)
        self.tokens = TriggerTokens.build(setup.tokenizer, self.words, setup.pad_id)
        self.targets = DecoyTargets(spec, reference)

    def record(self) -> dict:
        return {**self.spec.to_dict(), "words": self.words, "kinds": self.targets.kinds()}

    def loss(self, model_cls, size: int) -> torch.Tensor:
        """`model_cls(batch) -> [B, H]` CLS outputs of the trained model."""
        setup = self.setup
        which = torch.randint(self.spec.n, (size,), generator=setup.generator)
        rows = setup.sampler.take(size)
        batch: TokenBatch = insert_triggers(setup.corpus.batch(rows), self.tokens, which,
                                            setup.generator, setup.pad_id)
        target = self.targets(which, rows).to(setup.device)
        # squared error over the clean outputs' spread per unit (not its square), so the
        # gradient stays of the order of the backdoor's, whose targets lie about one unit
        # off (Adam scales every step by the largest gradient it sees)
        error = nn.functional.mse_loss(model_cls(batch), target)
        return self.spec.weight * error / self.targets.sigma
