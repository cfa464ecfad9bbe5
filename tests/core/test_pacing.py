"""Checkpoints call the pacer the runner installed, per thread, and survive a failing one."""

import threading

from sanitator.core.pacing import checkpoint, paced


def test_checkpoint_calls_the_installed_pacer_only_inside_its_block():
    calls = []
    checkpoint()  # no pacer: nothing happens
    with paced(lambda: calls.append(threading.get_ident())):
        checkpoint()
        checkpoint()
        other = threading.Thread(target=checkpoint)  # another thread has no pacer
        other.start()
        other.join()
    checkpoint()
    assert calls == [threading.get_ident()] * 2


def test_a_failing_pacer_is_dropped_and_the_work_goes_on():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("scheduler gone")

    with paced(broken):
        checkpoint()
        checkpoint()  # dropped after the first failure
    assert calls == [1]
