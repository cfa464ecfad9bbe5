"""How the verdict's fresh confirmations are shared out, so no candidate source can spend
them all (issue 35).

The calibrated test is Bonferroni-corrected over a budget fixed in advance
(`DecisionConfig.confirmation_budget`). An attacker who plants decoy triggers that
collapse the output but fail a side condition could make the searches propose them until
the budget is gone, before the real trigger is judged. Three rules stop that:

* each source (vocabulary screen, reference stage, token screen, context search, mining,
  any later stage) may spend at most its own quota of the budget, fixed in advance
  (`confirmation_quotas`, `default_quota` for a source not named there);
* a candidate whose point matches a point already judged at its feature (sign agreement
  at least `merge_agreement` in the raw and the centred frame) and that pins the search
  rows no tighter is the same hypothesis: it costs nothing;
* a candidate that clearly fails a side condition on the search rows (the bounds loosened
  by `screen_slack`) costs nothing: it could not be accepted on fresh rows either.

A candidate that is still due a confirmation when its quota is spent is *unjudged*, and a
scan that ends with one before any trigger was accepted is `inconclusive`, never `clean`.
Dropping candidates never raises the false-alarm rate: the bound is over the budget, not
over what was proposed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sanitator.core.status import Status
from sanitator.detect.signs import sign_agreement

SCREENED = "fails on the search rows: "
MERGED = "same point as judged "
OUTCOMES = ("confirmed", "screened", "merged", "below_floor", "unjudged", "other")


def outcome(finding) -> str:
    """What became of a candidate, for the evidence's counts."""
    if finding.confirmation is not None:
        return "confirmed"
    if finding.unjudged:
        return "unjudged"
    if finding.note.startswith(SCREENED):
        return "screened"
    if finding.note.startswith(MERGED):
        return "merged"
    if finding.search_margin <= 0:
        return "below_floor"
    return "other"    # a blend of an accepted trigger, an accepted point reached again


class Allocation:
    """The verdict's budget per source, and what each source spent of it."""

    def __init__(self, decision) -> None:
        self.decision = decision
        self.spent: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.spent.values())

    def refusal(self, source: str) -> str | None:
        """Why `source` may not spend another verdict confirmation (None: it may)."""
        if self.total >= self.decision.confirmation_budget:
            return f"confirmation budget spent ({self.decision.confirmation_budget})"
        quota = self.decision.quota(source)
        if self.spent[source] >= quota:
            return f"confirmation quota of {source} spent ({quota})"
        return None

    def spend(self, source: str) -> None:
        self.spent[source] += 1

    def summary(self, findings) -> dict[str, Any]:
        """Per source: its quota and how many candidates it proposed, how many were
        confirmed, screened out or merged on the search rows, fell below the floor, or
        were left unjudged; before the verdict was settled (the quotas' scope)."""
        by_source: dict[str, dict[str, int]] = {}
        for finding in findings:
            if finding.after_verdict:
                continue
            counts = by_source.setdefault(finding.source, {
                "quota": self.decision.quota(finding.source), "proposed": 0,
                **dict.fromkeys(OUTCOMES, 0)})
            counts["proposed"] += 1
            counts[outcome(finding)] += 1
        unjudged = sum(c["unjudged"] for c in by_source.values())
        proposed = sum(c["proposed"] for c in by_source.values())
        return {"budget": self.decision.confirmation_budget, "spent": self.total,
                "quotas": dict(self.decision.confirmation_quotas),
                "default_quota": self.decision.default_quota, "proposed": proposed,
                "judged": proposed - unjudged, "unjudged": unjudged, "by_source": by_source}


def completion_summary(findings) -> dict[str, int]:
    """The same counts after the verdict (the PV set's own budget)."""
    after = [f for f in findings if f.after_verdict]
    counts = Counter(outcome(f) for f in after)
    return {"proposed": len(after), **{name: counts.get(name, 0) for name in OUTCOMES}}


def status(accepted: bool, unjudged: int) -> str:
    """Backdoored on an accepted trigger; else inconclusive while a candidate due a
    confirmation went without one; else clean."""
    if accepted:
        return Status.BACKDOORED.value
    return Status.INCONCLUSIVE.value if unjudged else Status.CLEAN.value


def reason(summary: dict[str, Any]) -> str:
    """Why a scan is inconclusive, in one line."""
    spent = [f"{source} {c['unjudged']}" for source, c in summary["by_source"].items()
             if c["unjudged"]]
    return (f"{summary['unjudged']} candidate(s) left unjudged when their confirmation "
            f"quota was spent ({', '.join(spent)}); no trigger was accepted, so the model "
            "is not shown clean: review it, or re-audit with a larger confirmation budget")


def worth_confirming(findings, finding, view, decision) -> bool:
    """False (with the reason noted on `finding`) for a repeat of a point already judged at
    its feature that pins the search rows no tighter, or a candidate that clearly fails a
    side condition on the search rows: neither could be accepted where the judged one was
    not. `view` gives the search rows' centre and the screen (calibrated_view.py)."""
    centre = view.search_centre
    for judged in findings:
        if judged.confirmation is None or judged.feature != finding.feature \
                or judged.search_margin < finding.search_margin:
            continue
        raw = float(sign_agreement(finding.point[None], judged.point[None])[0, 0])
        centred = float(sign_agreement((finding.point - centre)[None],
                                       (judged.point - centre)[None])[0, 0])
        if raw >= decision.merge_agreement and centred >= decision.merge_agreement:
            finding.note = MERGED + " ".join(judged.tokens)
            return False
    side = view.screen(finding.token_ids, finding.placement, finding.point)
    if side.failed:
        finding.note = SCREENED + ", ".join(side.failed)
        return False
    return True
