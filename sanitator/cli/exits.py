"""The exit codes of every `sanitator` subcommand: one table, one meaning each (README).

A script may rely on them: 0, 3 and 6 mean the work was done (3 and 6 only when asked to
gate on a backdoor), everything else that it was not, or not all of it.
"""

from collections.abc import Iterable

from sanitator.core.status import Status

OK = 0  # done; whatever the verdicts, unless --fail-on-backdoor
FAILED = 1  # no result: a scan with no verdict (error, unsupported), a flow that failed,
# a store that cannot be read, a PV artifact refused, the demo's verdicts wrong
USAGE = 2  # bad arguments or input: unknown option, missing folder, bad spec or task
BACKDOORED = 3  # --fail-on-backdoor and a backdoored verdict was produced or found
PARTIAL = 4  # done for part only: a registry could not be listed, the others were audited
NOT_CONVERGED = 5  # evaluate: the prompt model stayed near chance, so no ASR is reported
INCONCLUSIVE = 6  # --fail-on-backdoor, none backdoored, but a model not shown clean: its
# scan left candidates unjudged (status inconclusive); a gate must not pass it
BUSY = 7  # audit: another audit of the same store held a registry (its lease), which was
# left to it; the other registries, if any, were audited

TABLE: dict[int, str] = {
    OK: "done (whatever the verdicts, unless --fail-on-backdoor)",
    FAILED: "no result: error/unsupported scan, failed flow, unreadable store, refused artifact",
    USAGE: "bad arguments or input",
    BACKDOORED: "a backdoored model, with --fail-on-backdoor",
    PARTIAL: "a registry could not be listed (the others were audited)",
    NOT_CONVERGED: "evaluate: the prompt model did not converge, no ASR",
    INCONCLUSIVE: "an inconclusive model (not shown clean) and none backdoored, with "
                  "--fail-on-backdoor",
    BUSY: "audit: another audit of the same store held a registry; it was left to that audit",
}


def gate(statuses: Iterable[str]) -> int:
    """`--fail-on-backdoor` over the statuses found: a backdoor first, then a model whose
    scan could not show it clean; OK otherwise."""
    found = set(statuses)
    if Status.BACKDOORED in found:
        return BACKDOORED
    if Status.INCONCLUSIVE in found:
        return INCONCLUSIVE
    return OK
