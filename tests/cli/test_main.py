import os
import subprocess
import sys

import pytest

from sanitator.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["no-such-command"])
    assert exit_info.value.code != 0


def test_unbuilt_subcommand_says_so_and_fails(capsys, monkeypatch):
    monkeypatch.setitem(SUBCOMMANDS, "future", ("no_such_module", "not written yet"))
    assert main(["future", "--store", "somewhere"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_unknown_option_of_a_built_subcommand_is_an_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["verdicts", "--store", "x", "--no-such-option"])
    assert exit_info.value.code == 2


def _console(prelude: str) -> subprocess.CompletedProcess:
    """`sanitator` with no subcommand (help, exit 2) through the installed entry point's
    function, after `prelude`; stdout block-buffered, as in a pipe."""
    script = f"{prelude}\nimport sys\nsys.argv = ['sanitator']\n" \
             "from sanitator.cli import console\nconsole()\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_the_command_runs_exit_handlers_and_flushes_before_its_quick_exit():
    done = _console("import atexit\natexit.register(lambda: print('handlers ran'))")
    assert done.returncode == 2
    assert "COMMAND" in done.stdout
    assert done.stdout.rstrip().endswith("handlers ran")


def test_a_running_non_daemon_thread_gets_pythons_normal_exit(tmp_path):
    marker = tmp_path / "finished"
    done = _console("import pathlib, threading, time\n"
                    "def work():\n    time.sleep(1)\n"
                    f"    pathlib.Path({str(marker)!r}).write_text('done')\n"
                    "threading.Thread(target=work).start()")
    assert done.returncode == 2
    assert marker.read_text() == "done"  # not cut short by the quick exit
