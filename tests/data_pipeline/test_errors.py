"""data_pipeline.errors.cli_main: a UserError is one line on stderr and exit status 2; --debug or
BIGLEARN_DEBUG=1 shows the traceback instead; any other exception keeps its traceback."""
import pytest

from data_pipeline.errors import DEBUG_ENV, UserError, cli_main


def failing(exc):
    def main(argv):
        raise exc
    return main


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    message = "data.manifest: /x/manifest.json does not exist;\n  expected a manifest file"
    assert cli_main(failing(UserError(message)), "prog", ["a"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "prog: error: data.manifest: /x/manifest.json does not exist; expected a manifest file\n"
    assert captured.out == ""
    assert cli_main(lambda argv: None, "prog", []) == 0 and cli_main(lambda argv: 3, "prog", []) == 3


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = ["--debug"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError, match="bad"):
        cli_main(failing(UserError("bad")), "prog", argv)


def test_unexpected_failures_keep_their_traceback(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")
    for exc in (RuntimeError("bug"), ValueError("not a user error"), KeyError("k")):
        with pytest.raises(type(exc)):
            cli_main(failing(exc), "prog", [])


@pytest.mark.parametrize("module, argv, named", [
    ("pretrain.train.run", ["trainer.max_steps=abc"], "config key trainer.max_steps='abc': expected int"),
    ("pretrain.train.run", ["model.init_std=inf"], "model.init_std must be a finite number; got inf"),
    ("pretrain.train.evaluate", ["ckpt=/nonexistent/run"], "/nonexistent/run: no exported model"),
    ("pretrain.checkpoint.__main__", ["/nonexistent/run", "/tmp/out"], "/nonexistent/run: no exported model"),
    ("pretrain.infer", ["score", "--model", "/nonexistent/run", "--ids", "1 2"], "/nonexistent/run does not exist"),
    ("launch.hostfile", ["expand", "gpu[1-"], "node list 'gpu[1-': unclosed '['"),
    ("data_pipeline.__main__", ["inspect", "/nonexistent/manifest.json"], "/nonexistent/manifest.json: cannot read"),
])
def test_every_command_reports_a_user_mistake_in_one_line(module, argv, named, capsys, monkeypatch):
    import importlib
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    main = importlib.import_module(module).main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and named in err, err
    with pytest.raises(ValueError, match=named[:20].replace("[", r"\[")):
        main([*argv, "--debug"])
