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


def test_the_command_sets_openmp_threads_to_sleep_before_torch_loads(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads: the command sets it first, and
    keeps a user's own choice."""
    import os
    import subprocess
    import sys

    probe = ("import os, sys\n"
             "from sanitator.cli import main\n"
             "main(['verdicts', '--store', sys.argv[1]])\n"
             "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def run(**extra):
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], text=True,
                              capture_output=True, env={**env, **extra}, check=True)
        return done.stdout.split()[-2:]

    assert run() == ["False", "PASSIVE"]  # set, and torch not loaded before it
    assert run(OMP_WAIT_POLICY="ACTIVE") == ["False", "ACTIVE"]
