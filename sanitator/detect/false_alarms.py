"""The monitor's false alarms, measured before a PV set ships (issue 15): each accepted PV's
flag rate on clean text from another corpus than the scan's; a PV above
`max_false_alarms` is withheld from the artifact and reported, never shipped silently.
And the other corpora a candidate's point is held against before it is accepted
(`Elsewhere`, the side condition `other_text_not_there`)."""

from __future__ import annotations

import logging

import torch

from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.mining import prepare_data
from sanitator.detect.signs import MONITOR_THRESHOLD, sign_agreement

log = logging.getLogger(__name__)


def monitor_check(scan, sentences: list[str], corpus: str) -> None:
    """Set `false_alarms` and `withheld` on every accepted finding of the calibrated scan."""
    decision = scan.config.decision
    scan.completion["false_alarm_corpus"] = corpus
    for feature, view in scan.views.items():
        mine = [f for f in scan.accepted if f.feature == feature]
        if not mine:
            continue
        data = prepare_data(scan.encoder, sentences, view.search_config,
                            seed=scan.config.seed + 11)
        points = torch.stack([f.point for f in mine])
        flagged = sign_agreement(data.clean, points) > MONITOR_THRESHOLD   # [n, K]
        for finding, rate in zip(mine, flagged.float().mean(dim=0).tolist(), strict=True):
            finding.false_alarms = rate
            finding.withheld = rate > decision.max_false_alarms


def _own_corpus(config: ScanConfig) -> str:
    """The name of the corpus the scan reads (a path when the user gave one)."""
    return str(config.mining.corpus or "wikitext")


def false_alarm_text(config: ScanConfig, fallback: list[str], *, exclude: list[str] = ()
                     ) -> tuple[str, list[str]]:
    """Clean text from another corpus than the scan's (the scan's own training sentences,
    said so, where no other corpus is on this machine); never a sentence of `exclude` (the
    fresh rows, which only the confirmation reads)."""
    decision = config.decision
    banned = set(exclude)
    for corpus in decision.false_alarm_corpora:
        if corpus == _own_corpus(config):
            continue
        try:
            rows = load_sentences(corpus, n=decision.false_alarm_sentences + len(banned),
                                  seed=config.seed)
        except (OSError, ValueError) as exc:  # DataNotFoundError, CorpusError
            log.warning("false-alarm corpus %s unavailable: %s", corpus, exc)
            continue
        return corpus, [s for s in rows if s not in banned][:decision.false_alarm_sentences]
    return ("the scan's own training sentences (no other corpus available)",
            [s for s in fallback if s not in banned])


def _key(sentence: str) -> str:
    """What a sentence says, whatever its case and spacing: a fresh row copied into
    another corpus is still the fresh row."""
    return " ".join(sentence.lower().split())


class Elsewhere:
    """Clean sentences of every configured corpus but the scan's own (`elsewhere_corpora`),
    read the first time a side condition needs them; never a sentence of `exclude` (the
    fresh rows). A corpus missing from this machine is skipped, said so in the log."""

    def __init__(self, config: ScanConfig, *, exclude: list[str] = ()):
        self.config, self.banned = config, {_key(s) for s in exclude}
        self._texts: list[tuple[str, list[str]]] | None = None

    @property
    def texts(self) -> list[tuple[str, list[str]]]:
        if self._texts is None:
            decision, own = self.config.decision, _own_corpus(self.config)
            self._texts = []
            for corpus in decision.elsewhere_corpora:
                if corpus == own:
                    continue  # the fresh rows already stand for it
                try:
                    rows = load_sentences(corpus, n=decision.elsewhere_sentences
                                          + len(self.banned), seed=self.config.seed + 13)
                except (OSError, ValueError) as exc:  # DataNotFoundError, CorpusError
                    log.warning("corpus %s unavailable for the natural-text check: %s",
                                corpus, exc)
                    continue
                kept = [s for s in rows if _key(s) not in self.banned]
                self._texts.append((corpus, kept[:decision.elsewhere_sentences]))
        return self._texts

    @property
    def read(self) -> list[str]:
        """The corpora the check read (none when no side condition was judged)."""
        return [corpus for corpus, _ in self._texts or []]
