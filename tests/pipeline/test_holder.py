"""Audit processes as leases and batch runs record them (sanitator/pipeline/holder.py)."""

import subprocess
import sys

from sanitator.pipeline import holder


def test_holders_are_gone_when_their_process_or_their_lease_is(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = holder.Holder("dead", holder.this_process().host, int(done.stdout), 1.0)
    assert holder.holder_gone(dead.to_dict(), set())
    assert not holder.holder_gone(holder.this_process(), set())
    remote = holder.Holder("remote", "another-host", 1, None)
    assert not holder.holder_gone(remote, {"remote"})
    assert holder.holder_gone(remote, set())
