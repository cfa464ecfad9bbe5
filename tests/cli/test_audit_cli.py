"""`sanitator audit` argument handling and `sanitator verdicts` on a real store.

The audit command's full run is exercised end to end in tests/flows/test_audit_flow.py.
"""

import datetime as dt
import json

import pytest

from sanitator.cli import main
from sanitator.cli.audit import format_summary, parse_assignment
from sanitator.pipeline import store


@pytest.fixture
def filled_store(tmp_path):
    def row(audit_id, repo, status, day, **extra):
        return {"audit_id": audit_id, "audited_at": dt.datetime(2026, 5, day, tzinfo=dt.UTC),
                "source": "hf", "registry": "hf:acme", "repo_id": repo,
                "revision": f"{day}" * 40, "status": status, "pv_count": 0,
                "config_hash": "c" * 16, "package_version": "0.1.0", "retryable": False,
                **extra}

    rows = [row("a1", "acme/x", "error", 1, reason="network down"),
            row("a2", "acme/x", "backdoored", 2, score=0.97, pv_count=2),
            row("b1", "acme/y", "clean", 1, score=0.01)]
    for r in rows:
        store.write_rows(tmp_path, store.VERDICTS, [r], partition=store.audit_date(
            r["audited_at"]), name=r["audit_id"])
    return tmp_path


def test_verdicts_table_shows_the_latest_row_per_model(filled_store, capsys):
    assert main(["verdicts", "--store", str(filled_store)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["registry", "repo_id", "revision", "status", "score",
                                "pv_count", "audited_at", "reason"]
    assert len(lines) == 3
    assert "acme/x" in lines[1] and "backdoored" in lines[1] and "0.970" in lines[1]
    assert "acme/y" in lines[2] and "clean" in lines[2]


def test_verdicts_json_and_filters(filled_store, capsys):
    assert main(["verdicts", "--store", str(filled_store), "--json", "--status",
                 "backdoored"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["repo_id"], r["status"], r["pv_count"]) for r in records] == [
        ("acme/x", "backdoored", 2)]
    assert records[0]["audited_at"].startswith("2026-05-02")
    assert main(["verdicts", "--store", str(filled_store), "--json", "--all"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_verdicts_fail_on_backdoor_only_when_one_is_listed(filled_store, capsys):
    assert main(["verdicts", "--store", str(filled_store), "--fail-on-backdoor"]) == 3
    assert main(["verdicts", "--store", str(filled_store), "--fail-on-backdoor",
                 "--status", "clean"]) == 0
    capsys.readouterr()


def test_verdicts_on_empty_or_missing_store(tmp_path, capsys):
    assert main(["verdicts", "--store", str(tmp_path)]) == 0
    assert "no verdicts" in capsys.readouterr().out
    assert main(["verdicts", "--store", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_audit_refuses_bad_registries_and_options_before_any_work(tmp_path, capsys):
    assert main(["audit", "--registry", "s3:bucket", "--out", str(tmp_path)]) == 2
    assert "expected hf:ORG" in capsys.readouterr().err
    assert main(["audit", "-r", f"path:{tmp_path}", "--set", "colour=red",
                 "--out", str(tmp_path)]) == 2
    assert "bad scan option" in capsys.readouterr().err
    assert main(["audit", "-r", f"path:{tmp_path}", "--reference", "hf:no-org-given",
                 "--out", str(tmp_path)]) == 2
    assert "expected hf:ORG/NAME[@REVISION]" in capsys.readouterr().err
    assert not (tmp_path / "verdicts").exists()


def test_audit_requires_a_registry(capsys):
    with pytest.raises(SystemExit):
        main(["audit"])
    assert "--registry" in capsys.readouterr().err


def test_assignments_read_json_values():
    assert parse_assignment("steps_per_seed=60") == ("steps_per_seed", 60)
    assert parse_assignment("corpus=sst2") == ("corpus", "sst2")
    assert parse_assignment("pad_to_max_length=true") == ("pad_to_max_length", True)
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_assignment("novalue")


def test_summary_text_names_backdoored_models_and_errors():
    text = format_summary({
        "store": "/s", "audited": 2, "already_audited": 1,
        "counts": {"clean": 0, "backdoored": 1, "error": 1, "unsupported": 0, "skipped": 0},
        "backdoored": [{"repo_id": "acme/x", "revision": "f" * 40, "registry": "hf:acme",
                        "score": 0.9, "pv_count": 2}],
        "inconclusive": [{"repo_id": "acme/z", "revision": "e" * 40, "registry": "hf:acme",
                          "score": 0.4, "reason": "2 candidate(s) left unjudged"}],
        "errors": [{"repo_id": "acme/y", "registry": "hf:acme", "reason": "boom"}],
        "registry_errors": {"mlflow:http://x": "down"}})
    assert "1 backdoored, 1 error" in text and "BACKDOORED acme/x@ffffffffffff" in text
    assert "INCONCLUSIVE acme/z@eeeeeeeeeeee (hf:acme): 2 candidate(s) left unjudged" in text
    assert "boom" in text and "mlflow:http://x could not be listed: down" in text


def test_the_text_summary_counts_the_errors_it_does_not_list_and_says_what_was_recovered():
    summary = {"audited": 30, "already_audited": 0, "store": "/s",
               "counts": {"error": 30}, "backdoored": [], "registry_errors": {},
               "errors": [{"repo_id": "z/0", "registry": "path:/z", "reason": "no weights"}],
               "more_errors": 29, "registry_busy": {"path:/y": "another audit holds it"},
               "recovered": {"leases": {"path:/z": "from a dead audit (pid 7 on h)"},
                             "mlflow_runs_killed": ["abc"]}}
    text = format_summary(summary)
    assert "... and 29 more error(s): sanitator verdicts --store /s --status error" in text
    assert "registry path:/y was left to another audit: another audit holds it" in text
    assert "took over the lease of path:/z from a dead audit (pid 7 on h)" in text
    assert "closed MLflow batch run abc, left RUNNING by a dead audit, as KILLED" in text


HOLD_LEASE = """
import sys, time
from sanitator.pipeline import lease
lease.acquire(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


def test_an_audit_of_a_registry_another_audit_holds_exits_busy_before_starting_anything(
        tmp_path, capsys):
    import subprocess
    import sys

    from sanitator.cli import exits
    from sanitator.pipeline.registries import parse_registry

    zoo, store = tmp_path / "zoo", tmp_path / "store"
    zoo.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(store),
                               parse_registry(f"path:{zoo}").spec],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["audit", "-r", f"path:{zoo}", "--out", str(store)]) == exits.BUSY
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"is left to another audit: another audit holds it (pid {holder.pid} on" in err
    assert not (store / "prefect-server.log").exists()  # no Prefect API was started
