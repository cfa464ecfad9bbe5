"""The exit codes of every `sanitator` subcommand: one table, one meaning each (README).

A script may rely on them: 0 and 3 mean the work was done (3 only when asked to gate on a
backdoor), everything else that it was not, or not all of it.
"""

OK = 0  # done; whatever the verdicts, unless --fail-on-backdoor
FAILED = 1  # no result: a scan with no verdict (error, unsupported), a flow that failed,
# a store that cannot be read, a PV artifact refused, the demo's verdicts wrong
USAGE = 2  # bad arguments or input: unknown option, missing folder, bad spec or task
BACKDOORED = 3  # --fail-on-backdoor and a backdoored verdict was produced or found
PARTIAL = 4  # done for part only: a registry could not be listed, the others were audited
NOT_CONVERGED = 5  # evaluate: the prompt model stayed near chance, so no ASR is reported
BUSY = 6  # audit: another audit of the same store held a registry (its lease), which was
# left to it; the other registries, if any, were audited

TABLE: dict[int, str] = {
    OK: "done (whatever the verdicts, unless --fail-on-backdoor)",
    FAILED: "no result: error/unsupported scan, failed flow, unreadable store, refused artifact",
    USAGE: "bad arguments or input",
    BACKDOORED: "a backdoored model, with --fail-on-backdoor",
    PARTIAL: "a registry could not be listed (the others were audited)",
    NOT_CONVERGED: "evaluate: the prompt model did not converge, no ASR",
    BUSY: "audit: another audit of the same store held a registry; it was left to that audit",
}
