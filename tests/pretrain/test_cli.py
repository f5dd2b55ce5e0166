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
