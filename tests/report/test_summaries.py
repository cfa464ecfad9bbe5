"""The flows' run summaries (sanitator.report.summaries)."""

from sanitator.report.summaries import (
    audit_summary_markdown,
    audit_verdicts_table,
    evaluation_summary_markdown,
    evaluations_table,
    per_trigger_text,
)


def test_summary_lists_per_trigger_rates_and_the_pairs_that_did_not_converge():
    common = {"task": "sst2", "attack": "por", "clean_accuracy": 0.8,
              "defended_clean_accuracy": 0.8, "monitor_fpr": 0.0, "seconds": 1.0}
    learnt = {**common, "encoder": "a", "converged": True, "reason": None, "asr": 1.0,
              "defended_asr": 0.0, "per_trigger": [
                  {"trigger": "cf", "asr": 1.0, "defended_asr": 0.0},
                  {"trigger": "mn", "asr": 0.5, "defended_asr": 0.25}]}
    chance = {**common, "encoder": "b", "converged": False, "asr": None, "defended_asr": None,
              "reason": "prompt-tuning did not converge: clean test accuracy 0.52 ...",
              "per_trigger": [{"trigger": "cf", "asr": None, "defended_asr": None}]}
    summary = {"results": [learnt, chance], "already_evaluated": 0, "errors": [],
               "unavailable": []}
    markdown = evaluation_summary_markdown(summary)
    assert "| `a` | sst2 | `cf` | 100.0% | 0.0% |" in markdown
    assert "| `a` | sst2 | `mn` | 50.0% | 25.0% |" in markdown
    assert "## Not converged (no ASR reported)" in markdown
    assert "- `b` sst2: prompt-tuning did not converge" in markdown
    assert "| `b` | sst2 | `cf`" not in markdown
    assert per_trigger_text(learnt) == "cf 100.0%/0.0%, mn 50.0%/25.0%"
    assert per_trigger_text(chance) == "not converged"
    assert evaluations_table(summary)[0]["per_trigger"] == "cf 100.0%/0.0%, mn 50.0%/25.0%"


def test_audit_summary_keeps_hostile_repo_ids_in_code_spans():
    hostile = "acme/x|`y`\nz"
    summary = {"counts": {"clean": 1, "backdoored": 1, "error": 1}, "already_audited": 2,
               "backdoored": [{"registry": "hf:acme", "repo_id": hostile, "revision": "a" * 40,
                               "score": 0.99, "pv_count": 2}],
               "inconclusive": [{"registry": "hf:acme", "repo_id": "acme/i", "revision": "b" * 40,
                                 "score": 0.4, "reason": "3 candidate(s) left unjudged"}],
               "errors": [{"registry": "path:/m", "repo_id": "bad", "reason": "no | config"}],
               "registry_errors": {"hf:gone": "ConnectionError: down"}}
    markdown = audit_summary_markdown(summary)
    assert "## Inconclusive (not shown clean: review, no PV artifact)" in markdown
    assert "- `acme/i` @ `bbbbbbbbbbbb` (`hf:acme`): `3 candidate(s) left unjudged`" in markdown
    assert "| backdoored | 1 |" in markdown and "Already audited (unchanged): 2" in markdown
    assert "- `acme/x\\|'y' z` @ `aaaaaaaaaaaa` (`hf:acme`), score 0.99, 2 PV(s)" in markdown
    assert "- `bad` (`path:/m`): `no \\| config`" in markdown
    assert "## Registries that could not be listed" in markdown
    row = {"registry": "hf:acme", "repo_id": "a", "revision": "r", "status": "clean",
           "score": 0.1, "pv_count": 0, "reason": None, "config": "{}"}
    assert audit_verdicts_table([row]) == [{k: v for k, v in row.items() if k != "config"}]
