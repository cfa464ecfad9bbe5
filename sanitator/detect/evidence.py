"""The calibrated test behind every accepted PV: confirmation on fresh sentences.

A candidate trigger is chosen on one set of sentences (the search rows) and judged on
another (the fresh rows, never seen by any search), so the strongest of many candidates is
not a multiple-testing maximum. The question asked of it is the monitor's: does the
trigger pin sentences to one sign pattern? To have a scale that belongs to this encoder,
the answer is compared with the encoder's own noise floor: how closely one sentence's
output keeps its sign pattern when a single token is deleted from it. A backdoor makes
*different* sentences agree with its point more closely than one sentence agrees with
itself after a one-token edit; an ordinary word, however strongly it colours a sentence,
leaves the rest of the sentence speaking (docs/method.md has the measurements).

The test is one-sided and paired per fresh sentence: d_i = agreement(o_i, p) − floor_i,
where o_i is sentence i with the trigger, p the realised point (the trigger's mean output
on the search rows) and floor_i the agreement of sentence i's clean output with its
one-token edit. H0: E[d] <= 0. The p-value is the Student-t tail of the paired t statistic
(n - 1 degrees of freedom), Bonferroni-corrected by the scan's fixed confirmation budget,
and the score is 1 - p: its false-alarm rate at a cut c is at most 1 - c when H0 holds for
every trigger of a clean encoder (the condition, and the null benchmark that measures it:
docs/method.md).

The fresh rows are read only here: `fresh_access()` marks the confirmation, and
`FreshRows.data` refuses every other reader (`FreshRowsRead`), so no search, screen or
false-alarm check can see the sentences that judge it.

The same test is run twice, in two frames, and the better p-value counts twice (Bonferroni
over the frames): raw signs, as the monitor reads them, and signs of the outputs minus the
clean outputs' mean. On a shallow encoder a shared component dominates every output
(2-layer MiniLM CLS keeps 99.4 % of its signs under a one-token edit), so no point, not
even a backdoor's, can beat the raw floor; the centred frame removes that component and
measures the same question on what varies (docs/method.md). On 6-layer MiniLM the two
frames nearly coincide (floors 0.95 raw, 0.94 centred).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.special import stdtr

from sanitator.detect.encoders import Encoder, Feature
from sanitator.detect.mining import MiningData, clean_features
from sanitator.detect.signs import MONITOR_THRESHOLD, sign_agreement

# other corpora's clean outputs, (corpus, [n, H]) each, or a function that encodes them
OtherText = Sequence[tuple[str, torch.Tensor]] | Callable[[], Sequence[tuple[str, torch.Tensor]]]

_READING_FRESH = contextvars.ContextVar("sanitator_reading_fresh", default=False)


class FreshRowsRead(RuntimeError):
    """Something other than the confirmation read the fresh rows."""


@contextlib.contextmanager
def fresh_access():
    """The confirmation (and the nulls it compares against) reads the fresh rows here."""
    token = _READING_FRESH.set(True)
    try:
        yield
    finally:
        _READING_FRESH.reset(token)


def reading_fresh() -> bool:
    return _READING_FRESH.get()


@dataclass
class FreshRows:
    """The fresh sentences of one feature with everything the test compares against."""

    _data: MiningData                 # clean references, random trigger slots
    floor: torch.Tensor               # [n] agreement of each clean output with its edit
    spread: float                     # mean squared distance of clean outputs from their mean
    centre: torch.Tensor              # [H] the clean outputs' mean (the centred frame)
    centred_floor: torch.Tensor       # [n] the floor in the centred frame
    null_displacement: float = 0.0    # median squared move by a random single token

    @property
    def data(self) -> MiningData:
        if not reading_fresh():
            raise FreshRowsRead("the fresh rows were read outside the confirmation")
        return self._data

    def placed(self, where: str) -> MiningData:
        return self.data.placed(where)


def one_token_edit(data: MiningData, seed: int, special_ids: set[int]) -> MiningData:
    """Each sentence with one ordinary token deleted (never a special or the mask token)."""
    rng = random.Random(seed)
    ids, masks = [], []
    for row, tokens in enumerate(data.ids):
        positions = [i for i, t in enumerate(tokens.tolist()) if t not in special_ids]
        mask_at = None if data.mask_at is None else int(data.mask_at[row])
        positions = [i for i in positions if i != mask_at]
        if len(positions) < 2:  # a one-token sentence keeps its token
            ids.append(tokens.clone())
            masks.append(mask_at)
            continue
        drop = rng.choice(positions)
        ids.append(torch.cat([tokens[:drop], tokens[drop + 1:]]))
        masks.append(None if mask_at is None else mask_at - int(drop < mask_at))
    mask_at = None if data.mask_at is None else torch.tensor(masks)
    # only clean features are read from the edit: its trigger slots are never used
    return MiningData(ids, data.insert_at.clone(), mask_at, torch.empty(0))


@torch.no_grad()
def fresh_rows(encoder: Encoder, data: MiningData, feature: Feature, seed: int) -> FreshRows:
    """Measure the noise floor and clean spread of prepared rows (the search rows get the
    same nulls, for the search margin)."""
    special = set(encoder.tokenizer.all_special_ids)
    edited = one_token_edit(data, seed, special)
    edited_clean = clean_features(encoder, edited, feature)
    floor = torch.diagonal(sign_agreement(data.clean, edited_clean))
    clean = data.clean
    centre = clean.mean(dim=0)
    centred_floor = torch.diagonal(sign_agreement(clean - centre, edited_clean - centre))
    spread = float(((clean - centre) ** 2).mean())
    return FreshRows(data, floor, spread, centre, centred_floor)


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    return float(stdtr(max(df, 1), -t))


FRAMES = ("raw", "centred")  # the better frame's p-value is doubled (Bonferroni)


def _paired_t(diff: torch.Tensor) -> float:
    n = len(diff)
    sd = float(diff.std()) if n > 1 else 0.0
    return float(diff.mean()) / max(sd / math.sqrt(n), 1e-6)


@dataclass
class Confirmation:
    """What a candidate did on the fresh sentences, and whether that makes it a backdoor."""

    agreement: float        # mean sign agreement of triggered fresh outputs with the point
    floor: float            # mean one-token-edit agreement of the same sentences
    t: float                # paired t statistic of agreement - floor (raw signs)
    p_value: float          # one-sided, the better frame's doubled, before the budget
    success: float          # fresh eligible sentences the monitor would flag (> threshold)
    natural_rate: float     # fresh clean outputs already flagged against the point
    displacement: float     # mean squared move of the outputs, in clean spreads
    null_displacement: float  # the same for the median random token, in clean spreads
    n: int
    conditions: dict[str, bool | None] = field(default_factory=dict)
    centred_agreement: float = 0.0  # the same three in the centred frame
    centred_floor: float = 0.0
    t_centred: float = 0.0
    frame: str = "raw"              # the frame whose p-value counts
    elsewhere_rate: float = 0.0     # the most of another corpus's clean outputs at the point
    elsewhere_corpus: str = ""      # that corpus

    @property
    def usable(self) -> bool:
        """The side conditions: the monitor would catch the trigger, clean text (the fresh
        rows', and other corpora's) does not sit at the point already, and the point lies
        outside the clean outputs' cloud and farther out than a random token moves them."""
        return all(self.conditions.values())

    def p_adjusted(self, n_tests: int) -> float:
        return min(1.0, self.p_value * max(1, n_tests))

    def summary(self) -> dict[str, Any]:
        data = {name: round(float(getattr(self, name)), 5) for name in (
            "agreement", "floor", "t", "centred_agreement", "centred_floor", "t_centred",
            "success", "natural_rate", "displacement", "null_displacement",
            "elsewhere_rate")}
        data.update(p_value=float(f"{self.p_value:.3g}"), frame=self.frame, n=self.n,
                    elsewhere_corpus=self.elsewhere_corpus, conditions=self.conditions)
        return data


@dataclass
class SideConditions:
    """The five side conditions of a point, measured on some rows (fresh or search)."""

    success: float          # eligible rows the monitor would flag (> threshold)
    natural_rate: float     # clean outputs already flagged against the point
    displacement: float     # mean squared move of the outputs, in clean spreads
    null_displacement: float  # the same for the median random token, in clean spreads
    conditions: dict[str, bool | None]   # None: not measured (another one failed first)
    elsewhere_rate: float = 0.0   # the highest such rate on another corpus's clean outputs
    elsewhere_corpus: str = ""

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.conditions.items() if ok is False]


def side_conditions(outputs: torch.Tensor, point: torch.Tensor, clean: torch.Tensor,
                    spread: float, null_displacement: float, *, max_natural_rate: float,
                    slack: float = 1.0, threshold: float = MONITOR_THRESHOLD,
                    elsewhere: OtherText = ()) -> SideConditions:
    """The monitor would catch the trigger, clean text does not sit at the point already
    (neither the rows' own nor, `elsewhere`, any other corpus's clean outputs: a point
    natural text reaches, such as a classifier's class cluster that its class words move
    a sentence to, is where language goes, not a predefined vector), and the outputs moved
    farther than the clean outputs' own spread and than a random token moves them.
    `slack` < 1 loosens every bound by that factor: the screen on the search rows rejects
    only what clearly fails, so the fresh test still decides. `elsewhere` (pairs of corpus
    and clean outputs, or a function giving them) is read only when the other four hold:
    encoding other corpora costs seconds, and a failed point fails either way (the
    condition then reads None, not measured)."""
    agree = sign_agreement(outputs, point[None])[:, 0]
    natural = sign_agreement(clean, point[None])[:, 0] > threshold
    eligible = ~natural
    success = float((agree[eligible] > threshold).float().mean()) if int(eligible.sum()) else 0.0
    displacement = float(((outputs - clean) ** 2).mean()) / max(spread, 1e-12)
    null = null_displacement / max(spread, 1e-12)
    natural_rate = float(natural.float().mean())
    conditions: dict[str, bool | None] = {
        "monitor_catches_it": success >= 0.5 * slack,
        "clean_text_not_there": natural_rate <= max_natural_rate / slack,
        "outside_clean_cloud": displacement > 1.0 * slack,
        "beyond_random_token": displacement > null * slack,
        "other_text_not_there": None}
    elsewhere_rate, elsewhere_corpus = 0.0, ""
    if all(ok for ok in conditions.values() if ok is not None):
        pairs = elsewhere() if callable(elsewhere) else elsewhere
        rates = [(float((sign_agreement(other, point[None])[:, 0] > threshold).float().mean()),
                  corpus) for corpus, other in pairs]
        elsewhere_rate, elsewhere_corpus = max(rates, key=lambda r: r[0], default=(0.0, ""))
        elsewhere_corpus = elsewhere_corpus if elsewhere_rate > 0 else ""  # none sits there
        conditions["other_text_not_there"] = elsewhere_rate <= max_natural_rate / slack
    return SideConditions(success, natural_rate, displacement, null, conditions,
                          elsewhere_rate, elsewhere_corpus)


@torch.no_grad()
def confirm(outputs: torch.Tensor, point: torch.Tensor, fresh: FreshRows, *,
            max_natural_rate: float, threshold: float = MONITOR_THRESHOLD,
            elsewhere: OtherText = ()) -> Confirmation:
    """Judge triggered fresh outputs [n, H] against the realised point [H]."""
    with fresh_access():
        clean = fresh.data.clean
    agree = sign_agreement(outputs, point[None])[:, 0]
    centred = sign_agreement(outputs - fresh.centre, (point - fresh.centre)[None])[:, 0]
    t = _paired_t(agree - fresh.floor)
    t_centred = _paired_t(centred - fresh.centred_floor)
    frame = "raw" if t >= t_centred else "centred"
    p_value = min(1.0, len(FRAMES) * t_sf(max(t, t_centred), len(agree) - 1))
    side = side_conditions(outputs, point, clean, fresh.spread, fresh.null_displacement,
                           max_natural_rate=max_natural_rate, threshold=threshold,
                           elsewhere=elsewhere)
    return Confirmation(float(agree.mean()), float(fresh.floor.mean()), t, p_value,
                        side.success, side.natural_rate, side.displacement,
                        side.null_displacement, len(agree), side.conditions,
                        float(centred.mean()), float(fresh.centred_floor.mean()), t_centred,
                        frame, side.elsewhere_rate, side.elsewhere_corpus)
