"""Two "nodes" on one machine: two network namespaces joined by a veth pair, one DeepSpeed
launcher per namespace started the way launch/slurm/node_launcher.sh starts them under srun
(`--no_ssh --node_rank`, master address on the first namespace's veth address, gloo).

experiment=smoke with ZeRO-2 trains with checkpoints; every process of node 2 is SIGKILLed
mid-run; node 1's ranks must exit non-zero within a bound (deepspeed.dist_timeout_s is set, so
nothing can hang), and relaunching both nodes resumes from the last complete checkpoint with
per-step losses equal to an uninterrupted two-node run. Needs root (namespaces); the test
deletes its namespaces (and with them the veth pair and its addresses) and leaves no process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.checkpoint.sharded import complete_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.dist]

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS, SAVE_EVERY = 12, 4
DIST_TIMEOUT_S = 60
SMOKE = ["experiment=smoke", "data.demo_max_files=60", "data.demo_vocab_size=512"]  # a smaller corpus: faster
TRAIN = [*SMOKE, "deepspeed=cpu", "deepspeed.zero_stage=2", f"deepspeed.dist_timeout_s={DIST_TIMEOUT_S}",
         f"trainer.max_steps={STEPS}", f"trainer.save_every={SAVE_EVERY}", "trainer.log_every=1",
         "trainer.deterministic=true", "trainer.keep_last=10", "trainer.progress=false", "trainer.loggers=[jsonl]",
         "trainer.export_at_end=false", "eval.plot=false", "eval.batches=1"]


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """[(namespace, interface, address)] for node 0 and node 1, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    nodes = [(f"bln{tag}a", f"blv{tag}a", f"{subnet}.1"), (f"bln{tag}b", f"blv{tag}b", f"{subnet}.2")]
    made = ip("netns", "add", nodes[0][0])
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        steps = [("netns", "add", nodes[1][0]),
                 ("link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1])]
        for ns, dev, addr in nodes:
            steps += [("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                      ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield nodes
    finally:
        for ns, _, _ in nodes:  # deleting a namespace destroys its end of the veth pair, and so the pair
            ip("netns", "del", ns)
        left = ip("netns", "list").stdout
        assert all(ns not in left for ns, _, _ in nodes) and nodes[0][1] not in ip("link").stdout


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The smoke experiment's demo data, built before the launch (rank 0 would otherwise build it
    while the other ranks wait at a barrier bounded by the short dist timeout)."""
    import data_pipeline
    from pretrain.train.config import load_config
    root = tmp_path_factory.mktemp("two_nodes_data")
    d = load_config(SMOKE).data
    data_pipeline.build_demo(root / f"vocab{d.demo_vocab_size}_len{d.demo_seq_len}_files{d.demo_max_files}",
                             vocab_size=d.demo_vocab_size, seq_len=d.demo_seq_len, stdlib_limit=d.demo_max_files,
                             progress=False)
    return root


def launch(nodes, run_dir: Path, demo: Path, port: int, log_dir: Path) -> list[subprocess.Popen]:
    hostfile = log_dir / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(len(nodes))))
    procs = []
    for node_rank, (ns, dev, _) in enumerate(nodes):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "1",
               "GLOO_SOCKET_IFNAME": dev, "SLURM_NODEID": str(node_rank), "PYTHONPATH": str(REPO),
               "PATH": f"{DEEPSPEED.parent}:{os.environ['PATH']}"}
        command = ["ip", "netns", "exec", ns, "bash", str(REPO / "launch/slurm/node_launcher.sh"), str(DEEPSPEED),
                   "--hostfile", str(hostfile), "--master_addr", nodes[0][2], "--master_port", str(port),
                   "--no_local_rank", "--no_ssh", "--module", "pretrain.train", *TRAIN, f"run_dir={run_dir}",
                   f"data.demo_dir={demo}"]
        log = open(log_dir / f"{run_dir.name}-{port}-node{node_rank}.log", "w")
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it (ranks included), no clean-up."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def train_losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def finish(procs, logs: Path, timeout=600) -> list[int]:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            kill_node(proc)
            raise AssertionError(f"a node launcher hung past {timeout} s; logs in {logs}") from None
    return codes


def test_losing_a_node_fails_fast_and_both_nodes_resume_exactly(two_nodes, demo_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []
    try:
        reference = tmp_path / "reference"
        started += launch(two_nodes, reference, demo_dir, 29501, logs)
        assert finish(started[-2:], logs) == [0, 0], f"uninterrupted run failed; logs in {logs}"
        expected = train_losses(reference)
        assert sorted(expected) == list(range(1, STEPS + 1))

        run_dir = tmp_path / "interrupted"
        node0, node1 = launch(two_nodes, run_dir, demo_dir, 29502, logs)
        started += [node0, node1]
        deadline = time.time() + 600
        while not (complete_checkpoints(run_dir / "checkpoints") and max(train_losses(run_dir), default=0) > SAVE_EVERY):
            assert time.time() < deadline and node0.poll() is None and node1.poll() is None, f"see {logs}"
            time.sleep(0.1)
        killed_at = max(train_losses(run_dir))
        kill_node(node1)
        # Node 0's rank sees the peer's sockets close (or, at worst, the collective times out).
        code = node0.wait(timeout=DIST_TIMEOUT_S + 120)
        assert code != 0, f"node 0 exited 0 after losing node 1; logs in {logs}"
        assert not descendants(node0.pid)
        saved = complete_checkpoints(run_dir / "checkpoints")[-1]
        assert SAVE_EVERY <= int(saved.name.split("_")[1]) < STEPS and killed_at < STEPS

        started += launch(two_nodes, run_dir, demo_dir, 29503, logs)
        assert finish(started[-2:], logs) == [0, 0], f"resumed run failed; logs in {logs}"
        assert f"resumed from {saved}" in (logs / "interrupted-29503-node0.log").read_text()
        assert train_losses(run_dir) == expected  # every step, before and after the loss of node 1
    finally:
        for proc in started:
            if proc.poll() is None:
                kill_node(proc)
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(tmp_path))]
    assert not leftover, leftover


def _mentions(proc_dir: Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
