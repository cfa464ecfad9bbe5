"""What the calibrated scan works on: one monitored feature's search and fresh rows with
the encoder's own nulls there (FeatureView), and the candidate triggers it judges
(Finding)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from sanitator.detect.attribution import candidate_token_ids
from sanitator.detect.config import ScanConfig
from sanitator.detect.encoders import Encoder, Feature
from sanitator.detect.evidence import (
    Confirmation,
    FreshRows,
    SideConditions,
    fresh_access,
    fresh_rows,
    side_conditions,
)
from sanitator.detect.false_alarms import Elsewhere
from sanitator.detect.hardsearch import Objective, collapse, repelled, unit_scale
from sanitator.detect.mining import MiningData, _forward, prepare_data
from sanitator.detect.signs import sign_agreement


@dataclass
class Finding:
    """A hard trigger some search proposed, where it was placed, and how it was judged."""

    source: str                 # vocabulary_screen | token_screen | context_search | mining
    feature: str
    placement: str
    token_ids: tuple[int, ...]
    tokens: list[str]
    search_margin: float        # search-row agreement with the point minus their floor
                                # (the better of the raw and centred frames)
    point: torch.Tensor         # realised PV: mean output on the search rows
    confirmation: Confirmation | None = None
    p_adjusted: float = 1.0
    accepted: bool = False
    seed: int = -1              # the mining seed a mined PV came from
    note: str = ""
    unjudged: bool = False      # due a fresh confirmation that its quota could not pay
    false_alarms: float | None = None  # flag rate on clean text of another corpus
    withheld: bool = False      # accepted, but kept out of the artifact (false alarms)
    after_verdict: bool = False  # proposed or judged once the verdict was settled (the
                                 # PV set's budget, not the verdict's)

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "source": self.source, "feature": self.feature, "placement": self.placement,
            "hard_trigger": self.tokens, "search_margin": round(self.search_margin, 5),
            "accepted": self.accepted, "p_adjusted": float(f"{self.p_adjusted:.3g}")}
        if self.seed >= 0:
            data["seed"] = self.seed
        if self.confirmation is not None:
            data["fresh"] = self.confirmation.summary()
            data["budget"] = "completion" if self.after_verdict else "verdict"
        if self.false_alarms is not None:
            data["false_alarm_rate"] = round(self.false_alarms, 5)
            data["withheld"] = self.withheld
        if self.note:
            data["note"] = self.note
        if self.unjudged:
            data["unjudged"] = True
        return data


def scan_features(config: ScanConfig, encoder: Encoder) -> tuple[str, ...]:
    """The features to scan: as configured, else CLS plus the mask position when the
    tokenizer has a mask token (a P-tuning v1 head reads it)."""
    if config.features:
        return tuple(config.features)
    has_mask = getattr(encoder.tokenizer, "mask_token_id", None) is not None
    return ("cls", "mask") if has_mask else ("cls",)


class FeatureView:
    """One monitored feature: search rows, fresh rows and the encoder's nulls there.

    The fresh rows are read only inside `evidence.fresh_access()`: here, to measure the
    confirmation's own nulls, and by the confirmation itself."""

    MEASURED = 32  # search-row outputs kept, so the screen need not run them again

    def __init__(self, encoder: Encoder, config: ScanConfig, feature: str,
                 search: list[str], fresh: list[str], elsewhere: Elsewhere | None = None):
        self.encoder, self.feature, self.config = encoder, feature, config
        self.elsewhere = elsewhere or Elsewhere(config, exclude=fresh)
        self._elsewhere_clean: list[tuple[str, MiningData]] | None = None
        self.mining = replace(config.mining, feature=feature)
        self.search_config = replace(self.mining, max_length=config.search.max_length)
        self.search = prepare_data(encoder, search, self.search_config, seed=config.seed + 1)
        with fresh_access():
            self.fresh: FreshRows = fresh_rows(
                encoder, prepare_data(encoder, fresh, self.search_config,
                                      seed=config.seed + 2),
                Feature(feature), seed=config.seed + 3)
            self.fresh.null_displacement = self._null_displacement(self.fresh.data,
                                                                   config.seed + 5)
        search_null = fresh_rows(encoder, self.search, Feature(feature), seed=config.seed + 4)
        self.search_floor = float(search_null.floor.mean())
        self.search_centre = search_null.centre
        self.search_centred_floor = float(search_null.centred_floor.mean())
        self.search_spread = search_null.spread
        self._search_null: float | None = None  # measured when the screen first needs it
        self.scale = unit_scale(self.search.clean)
        self.known: list[torch.Tensor] = []   # accepted points at this feature
        self._measured: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        self._margins: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, float]] = {}

    def _null_displacement(self, data: MiningData, seed: int) -> float:
        """Median squared move of the outputs by a random single token: how far any real
        token takes them (the encoder's own null for "moved far")."""
        ids = candidate_token_ids(self.encoder).tolist()
        picks = random.Random(seed).sample(ids, min(self.config.search.n_null, len(ids)))
        rows = data.subset(list(range(min(32, len(data)))))
        moves = [float(((self.outputs(rows, (token,)) - rows.clean) ** 2).mean())
                 for token in picks]
        return float(torch.tensor(moves).median())

    def elsewhere_clean(self, ids: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
        """(corpus, clean outputs) of the other corpora's sentences that hold none of the
        trigger's tokens (a backdoor keyed on a word common in some corpus fires on that
        corpus: that is the backdoor, not a place clean text goes), encoded the first time
        a candidate at this feature meets the other four side conditions."""
        if self._elsewhere_clean is None:
            self._elsewhere_clean = [
                (corpus, prepare_data(self.encoder, rows, self.search_config,
                                      seed=self.config.seed + 7))
                for corpus, rows in self.elsewhere.texts if rows]
        trigger = torch.tensor(sorted(set(ids)), dtype=torch.long)
        kept = []
        for corpus, data in self._elsewhere_clean:
            rows = [i for i, row in enumerate(data.ids) if not torch.isin(row, trigger).any()]
            if rows:
                kept.append((corpus, data.clean[rows]))
        return kept

    def screen(self, ids: tuple[int, ...], placement: str, point: torch.Tensor
               ) -> SideConditions:
        """The side conditions on the search rows, loosened by `screen_slack`: what
        clearly fails them is not worth a fresh confirmation (docs/method.md)."""
        out = self._measured.get((tuple(ids), placement))
        data = self.search.placed(placement)
        if out is None:
            out = self.outputs(data, tuple(ids))
        if self._search_null is None:
            self._search_null = self._null_displacement(self.search, self.config.seed + 6)
        decision = self.config.decision
        return side_conditions(out, point, data.clean, self.search_spread, self._search_null,
                               max_natural_rate=decision.max_natural_rate,
                               slack=decision.screen_slack,
                               elsewhere=lambda: self.elsewhere_clean(tuple(ids)))

    def outputs(self, data: MiningData, ids: tuple[int, ...]) -> torch.Tensor:
        """[n, H] outputs with the hard trigger `ids` spliced into every row of `data`."""
        embeds = self.encoder.word_embeddings(torch.tensor([ids], device=self.encoder.device))
        out = []
        config = replace(self.search_config, trigger_len=len(ids))
        with torch.no_grad():
            for start in range(0, len(data), 64):
                rows = list(range(start, min(start + 64, len(data))))
                out.append(_forward(self.encoder, data, rows, embeds.float(), config)[0].cpu())
        return torch.cat(out)

    def measure(self, ids: tuple[int, ...], placement: str) -> tuple[torch.Tensor, float]:
        """(realised point, search margin) of a trigger on the search rows: how far their
        agreement with the point beats their floor, in the better frame (evidence.py).
        Measured once per trigger and placement: completion judges the reference stage's
        triggers again."""
        key = (tuple(ids), placement)
        if key in self._margins:
            return self._margins[key]
        out = self.outputs(self.search.placed(placement), ids)
        if len(self._measured) >= self.MEASURED:
            self._measured.pop(next(iter(self._measured)))
        self._measured[(tuple(ids), placement)] = out
        point = out.mean(dim=0)
        centre = self.search_centre
        raw = float(sign_agreement(out, point[None]).mean()) - self.search_floor
        centred = (float(sign_agreement(out - centre, (point - centre)[None]).mean())
                   - self.search_centred_floor)
        self._margins[key] = point, max(raw, centred)
        return self._margins[key]

    def objective(self, repel: bool) -> Objective:
        base = collapse(self.scale)
        if repel and self.known:
            return repelled(base, torch.stack(self.known), self.scale)
        return base
