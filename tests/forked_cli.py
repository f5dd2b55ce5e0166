"""Run command lines as `python -m MODULE ARGS ...` does, each in its own process forked from one
interpreter that has imported the project once (the `cli` fixture in tests/conftest.py).

A fresh `python -m pretrain ...` spends 4-7 s importing torch and the project on this 2-core
machine; a fork of an interpreter that already did costs milliseconds, so a table of a hundred
malformed inputs runs in seconds, each still a process of its own with its own exit status,
stdout, stderr, working directory and environment. BIGLEARN_TEST_FRESH=1 makes the fixture start
a fresh interpreter per command instead (the same results, minutes slower).

Protocol: one JSON request per line on stdin {"module", "args", "cwd", "env", "stdout", "stderr",
"timeout"}; one JSON reply per line on stdout {"status", "leftover"}: the exit status as
subprocess reports it (negative: killed by that signal; -9 also after the timeout) and whether
processes of the command's session outlived it (they are killed).
"""
import atexit
import json
import os
import runpy
import signal
import sys
import time
import traceback

# What the commands import anyway; deepspeed is not among them (DS_ACCELERATOR must be set first).
import numpy  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401

import data_pipeline.__main__  # noqa: F401
import launch.preflight  # noqa: F401
import pretrain.checkpoint.__main__  # noqa: F401
import pretrain.cli  # noqa: F401
import pretrain.hf.convert  # noqa: F401
import pretrain.infer.cli  # noqa: F401
import pretrain.train.evaluate  # noqa: F401
import pretrain.train.run  # noqa: F401


def _child(request: dict) -> None:
    """The forked process: become `python -m MODULE ARGS` and exit as it would."""
    code = 1
    try:
        os.setsid()  # its own session: what it leaves behind can be found and killed
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:  # what the interpreter prints for an uncaught exception
            traceback.print_exc()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run(request: dict) -> dict:
    pid = os.fork()
    if pid == 0:
        _child(request)
    deadline = time.monotonic() + request["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.01)
    leftover = True
    try:
        os.killpg(pid, signal.SIGKILL)  # the session's group: anything the command left running
    except ProcessLookupError:
        leftover = False
    return {"status": os.waitstatus_to_exitcode(status), "leftover": leftover}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
