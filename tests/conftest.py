import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Variables a launcher sets; a command under test must not think it runs under one.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="session")
def manifest(tmp_path_factory):
    """A tiny demo dataset (40 stdlib files, 512-token vocabulary, 32-token windows), built once."""
    import data_pipeline
    return data_pipeline.build_demo(tmp_path_factory.getbasetemp() / "tiny_demo_data", vocab_size=512, seq_len=32,
                                    stdlib_limit=40, progress=False)


@dataclass
class Ran:
    """A finished command: its exit status, output and whether it left processes running."""
    command: str
    status: int
    stdout: str
    stderr: str
    leftover: bool

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if re.search(r"(^|: )error: ", line)]

    def refused(self, status: int, *names: str) -> str:
        """Assert the project's one-line refusal: `status`, no traceback, exactly one `error:` line
        on stderr, naming every one of `names`, and no process left running. Returns the line."""
        where = f"\n$ {self.command}\n--- stderr:\n{self.stderr[-4000:]}\n--- stdout:\n{self.stdout[-2000:]}"
        assert self.status == status, f"exit status {self.status}, expected {status}{where}"
        assert "Traceback" not in self.stderr, f"a traceback{where}"
        lines = self.error_lines()
        assert len(lines) == 1, f"{len(lines)} error lines{where}"
        for name in names:
            assert name in lines[0], f"the error line does not name {name!r}{where}"
        assert not self.leftover, f"processes left running{where}"
        return lines[0]

    def succeeded(self) -> "Ran":
        """Assert exit status 0, no error line, no traceback, no process left running."""
        where = f"\n$ {self.command}\n--- stderr:\n{self.stderr[-4000:]}\n--- stdout:\n{self.stdout[-2000:]}"
        assert self.status == 0 and not self.error_lines() and "Traceback" not in self.stderr, where
        assert not self.leftover, f"processes left running{where}"
        return self


class CommandLine:
    """Runs a command line as a user types it (`biglearn ...`, `python -m MODULE ...`) from the
    repository root, in a process of its own: forked from one warm interpreter
    (tests/forked_cli.py), or a fresh interpreter per command with BIGLEARN_TEST_FRESH=1."""

    def __init__(self, scratch: Path):
        self.scratch, self.fresh = scratch, os.environ.get("BIGLEARN_TEST_FRESH", "") not in ("", "0")
        self.server, self.count = None, 0
        self.env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        self.env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def _start(self):
        # -P: the script's folder (tests/, which holds folders named like the packages) stays off sys.path
        self.server = subprocess.Popen([sys.executable, "-P", str(REPO / "tests" / "forked_cli.py")], cwd=REPO,
                                       env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, command: str, env: dict | None = None, timeout: float = 600, cwd: Path = REPO) -> Ran:
        argv = shlex.split(command)
        if argv[0] == "biglearn":
            module, args = "pretrain", argv[1:]
        elif argv[:2] == ["python", "-m"]:
            module, args = argv[2], argv[3:]
        else:
            raise ValueError(f"not a command this fixture runs: {command}")
        full_env = {**self.env, **(env or {})}
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        if self.fresh:
            with open(out, "w") as o, open(err, "w") as e:
                proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, stdout=o,
                                        stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    status = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    status = proc.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                leftover = True
            except ProcessLookupError:
                leftover = False
        else:
            if self.server is None or self.server.poll() is not None:
                self._start()
            request = {"module": module, "args": args, "cwd": str(cwd), "env": full_env, "stdout": str(out),
                       "stderr": str(err), "timeout": timeout}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            while True:
                line = self.server.stdout.readline()
                if not line:
                    raise RuntimeError("tests/forked_cli.py exited")
                if line.startswith('{"status"'):
                    reply = json.loads(line)
                    break
            status, leftover = reply["status"], reply["leftover"]
        return Ran(command, status, out.read_text(errors="replace"), err.read_text(errors="replace"), leftover)

    def close(self):
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=30)


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    """cli("biglearn export RUN OUT") -> Ran: the command run from the repository root."""
    runner = CommandLine(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


def leftovers(*directories) -> list[Path]:
    """Partial or temporary files under `directories` (what a refused or failed write must not leave)."""
    found = []
    for directory in map(Path, directories):
        if directory.is_dir():
            found += [p for p in directory.rglob("*") if re.search(r"\.partial-|\.tmp$|\.old-|\.stale-", p.name)]
    return found


@pytest.fixture(scope="session")
def nothing_left():
    return leftovers


# Settings of the tiny training runs of the command-line tests (a 2-layer, 32-wide model on `manifest`).
TINY_TRAIN = ("deepspeed=cpu model.d_model=32 model.n_layers=2 model.n_heads=2 data.batch_size=4 trainer.progress=false "
              "trainer.loggers=[jsonl] trainer.warmup_steps=2 trainer.lr=3e-3 eval.batches=1 eval.plot=false "
              "trainer.eval_every=0 data.kind=manifest")


@pytest.fixture(scope="session")
def tiny_train() -> str:
    """TINY_TRAIN, for the test modules (conftest.py is not importable under --import-mode=importlib)."""
    return TINY_TRAIN


@pytest.fixture(scope="session")
def tiny_export(manifest, tmp_path_factory):
    """An export (ours, with the dataset's tokenizer) of a random single-stream model: 2 layers, 32 wide."""
    import torch

    from data_pipeline.tokenizer import Tokenizer
    from pretrain.checkpoint.export import export_model
    from pretrain.model import BigLearner, ModelConfig

    torch.manual_seed(0)
    tokenizer = Tokenizer.load(Path(manifest).parent / "tokenizer")
    model = BigLearner(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, streams=1,
                                   max_seq_len=64, attention_backend="torch", tie_embeddings=False))
    return export_model(model, tmp_path_factory.mktemp("export") / "tiny", {"name": "tiny"}, tokenizer)


@pytest.fixture(scope="session")
def trained_run(cli, manifest, tmp_path_factory):
    """A run directory after 3 steps with a checkpoint at each (keep_last=5) and no export:
    copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cli(f"biglearn train {TINY_TRAIN} data.manifest={manifest} run_dir={run_dir} trainer.max_steps=3 "
        "trainer.save_every=1 trainer.keep_last=5 trainer.export_at_end=false").succeeded()
    return run_dir


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. '2m') under tmp_path, unmounted after the
    test: a small disk to fill up. Mounting needs root; the test is skipped with the reason otherwise."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / ("fs" if not mounted else f"fs{len(mounted)}")
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)
