"""The store's lease on a registry (sanitator/pipeline/lease.py), with real processes: the
atomic create under a race, a dead holder's lease taken over once, a live one left alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sanitator.pipeline import holder, lease

REGISTRY = "path:/srv/models"


RACE = """
import os, sys, time
from pathlib import Path
from sanitator.pipeline import holder, lease
go = Path(sys.argv[1]) / "go"
while not go.exists():
    time.sleep(0.005)
taken, holder = lease.acquire(sys.argv[1], sys.argv[2])
print(os.getpid(), taken is not None, holder.holder.pid if holder else None, flush=True)
time.sleep(0.5)  # hold it while the others look
"""


def test_of_audits_started_together_exactly_one_takes_the_lease(tmp_path):
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), REGISTRY],
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(0.5)  # most of them are waiting for the go by now
    (tmp_path / "go").touch()
    outcomes = [process.communicate(timeout=120)[0].split() for process in processes]
    winners = [pid for pid, won, _ in outcomes if won == "True"]
    assert len(winners) == 1, outcomes
    # every loser was told who holds it
    assert {holder for _, won, holder in outcomes if won == "False"} == set(winners)
    # the winner ended without giving it back: its lease is stale now
    assert lease.lease_path(tmp_path, REGISTRY).exists() and not lease.live_holders(tmp_path)


HOLD = """
import sys, time
from sanitator.pipeline import holder, lease
taken, _ = lease.acquire(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder_process(tmp_path):
    """Another process holding the lease (killed at the end if still alive)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), REGISTRY],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_live_holder_keeps_it_and_a_dead_ones_lease_is_taken_over(tmp_path, holder_process):
    taken, record = lease.acquire(tmp_path, REGISTRY)
    assert taken is None and record.holder.pid == holder_process.pid
    assert f"pid {holder_process.pid}" in record.describe()
    assert lease.live_holders(tmp_path) == {record.holder.id}

    holder_process.send_signal(signal.SIGKILL)  # dies holding it
    holder_process.wait()
    taken, record = lease.acquire(tmp_path, REGISTRY)
    assert record is None and taken.taken_over.holder.pid == holder_process.pid
    holding = lease.Holding(leases={REGISTRY: taken})
    assert f"pid {holder_process.pid}" in holding.taken_over()[REGISTRY]
    saved = json.loads(lease.lease_path(tmp_path, REGISTRY).read_text())
    assert saved["holder"]["pid"] == os.getpid() and saved["registry"] == REGISTRY
    holding.release()
    assert not lease.lease_path(tmp_path, REGISTRY).exists()


def test_a_waiting_audit_gets_the_lease_once_its_holder_ends(tmp_path, holder_process,
                                                            monkeypatch):
    monkeypatch.setattr(lease, "WAIT_POLL_SECONDS", 0.1)

    def end_soon():
        time.sleep(1.0)
        holder_process.terminate()

    import threading

    threading.Thread(target=end_soon, daemon=True).start()
    started = time.monotonic()
    holding = lease.hold(tmp_path, [REGISTRY], wait=60)
    assert holding.held == [REGISTRY] and time.monotonic() - started < 30
    holding.release()


def _foreign(path, heartbeat, holder_id="elsewhere-1"):
    record = lease.Record(REGISTRY, holder.Holder(holder_id, "another-host", 1, 0.0), heartbeat,
                          heartbeat, ttl=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.to_json())


def test_another_hosts_lease_counts_until_its_heartbeat_expires(tmp_path):
    path = lease.lease_path(tmp_path, REGISTRY)
    _foreign(path, time.time())
    holding = lease.hold(tmp_path, [REGISTRY, "hf:acme"])
    assert holding.held == ["hf:acme"] and list(holding.busy) == [REGISTRY]
    assert "another-host" in holding.busy_reasons(tmp_path)[REGISTRY]
    holding.release()
    _foreign(path, time.time() - 61)  # silent for longer than its ttl
    holding = lease.hold(tmp_path, [REGISTRY])
    assert holding.held == [REGISTRY] and holding.leases[REGISTRY].taken_over is not None
    holding.release()


def test_one_process_holds_a_registry_once_and_beats_until_the_last_release(tmp_path):
    first, _ = lease.acquire(tmp_path, REGISTRY)
    second, _ = lease.acquire(tmp_path, REGISTRY)  # the flow inside the CLI: shared
    assert second is first and first.users == 2
    before = first.record.heartbeat
    time.sleep(0.01)
    first.beat()
    assert first.record.heartbeat > before
    assert json.loads(first.path.read_text())["heartbeat"] == first.record.heartbeat
    lease.release(second)
    assert first.path.exists()
    lease.release(first)
    assert not first.path.exists()


def test_a_holder_whose_lease_was_taken_over_learns_it_at_its_next_beat(tmp_path):
    taken, _ = lease.acquire(tmp_path, REGISTRY)
    _foreign(taken.path, time.time())  # as if another host had taken it over
    with pytest.raises(lease.LeaseLost, match="another-host"):
        taken.beat()
    lease.release(taken)
    assert taken.path.exists()  # not ours any more: left alone
