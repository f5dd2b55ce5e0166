"""One command line: `biglearn <command>` reaches every entry point, each with --help whose usage
line names the command the user typed; `python -m pretrain` is the same program."""
import subprocess
import sys

import pytest

from pretrain.cli import COMMANDS, main

EXPECTED = {"data", "train", "finetune", "eval", "score", "complete", "classify", "export", "convert", "preflight",
            "hostfile"}


def test_every_command_is_listed(capsys):
    assert set(COMMANDS) == EXPECTED
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in EXPECTED:
        assert f"\n  {name} " in listing


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_help_names_the_command_typed(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: biglearn {command} ")


def test_unknown_command_and_python_m(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "pretrain", "hostfile", "expand", "n[1-3]"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["n1", "n2", "n3"]


class _Parsed(Exception):
    pass


def parsers_of(command, monkeypatch) -> list:
    """Every argparse parser `biglearn <command>` builds (subcommands included), caught when it parses."""
    import argparse

    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(_Parsed):
        main([command, "x"] if command not in ("score", "complete", "classify") else [command])
    parsers = list(caught)
    for parser in caught:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return parsers


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_every_help_shows_the_defaults(command, monkeypatch):
    """Each option that takes a value and has a default shows it in --help, written by the
    parser's own formatter (argparse's ArgumentDefaultsHelpFormatter rule, or the help text)."""
    import argparse

    missing = []
    for parser in parsers_of(command, monkeypatch):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (action.nargs == 0 or action.required or action.default in (None, [], argparse.SUPPRESS)
                    or action.help == argparse.SUPPRESS or not action.option_strings):
                continue
            if "default" not in formatter._get_help_string(action):
                missing.append(f"{parser.prog} {'/'.join(action.option_strings)} (default {action.default!r})")
    assert not missing, missing
