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
