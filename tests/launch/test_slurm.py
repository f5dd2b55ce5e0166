"""launch/slurm/*.sh and train.sbatch, run for real in DRY_RUN mode with a faked SLURM environment
(variables only): the hostfile they write and the launcher commands they print."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
NODE_LAUNCHER = REPO / "launch" / "slurm" / "node_launcher.sh"
SUBMIT = REPO / "launch" / "slurm" / "submit.sh"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "GPUS_", "LAUNCH_", "RUN_DIR", "PREFLIGHT"))}
    env.update(PYTHON=sys.executable, DEEPSPEED=DEEPSPEED, DRY_RUN="1")
    env.update(extra)
    return env


def _run_sbatch(tmp_path, *train_args, check=True, **env):
    base = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[001-002]", SLURM_SUBMIT_DIR=str(REPO),
                SLURM_JOB_CPUS_PER_NODE="96(x2)", RUN_DIR=str(tmp_path / "run"), GPUS_PER_NODE="8")
    base.update(env)
    proc = subprocess.run(["bash", str(SBATCH), *train_args], env=_clean_env(**base),
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout):
    """The '+ '-prefixed command lines, split the way the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_ssh_path(tmp_path):
    proc = _run_sbatch(tmp_path, "experiment=smoke", LAUNCH_MODE="ssh",
                       NCCL_SOCKET_IFNAME="ib0", SLURM_NODEID="0", CUDA_VISIBLE_DEVICES="0,1")
    run = tmp_path / "run"
    assert (run / "launch" / "4242.hostfile").read_text() == "gpu001 slots=8\ngpu002 slots=8\n"
    ds_env = dict(line.split("=", 1) for line in (run / "launch" / "4242.deepspeed_env").read_text().splitlines())
    assert ds_env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert ds_env["PYTHONPATH"].split(":")[0] == str(REPO)
    assert "PATH" in ds_env and "OMP_NUM_THREADS" in ds_env
    assert not any(k.startswith("SLURM_") or k == "CUDA_VISIBLE_DEVICES" for k in ds_env)

    preflight, train = _commands(proc.stdout)[:2]
    common = [DEEPSPEED, "--hostfile", str(run / "launch" / "4242.hostfile"), "--master_addr", "gpu001",
              "--master_port", "24242", "--no_local_rank", "--launcher", "pdsh"]
    assert train == common + ["--module", "pretrain.train", f"run_dir={run}", "experiment=smoke", "resume=auto"]
    assert preflight == common + ["--module", "launch.preflight", "--output-dir", str(run), "--expect-gpus", "8"]

    # data.manifest given to the trainer is what preflight checks, unless PREFLIGHT_ARGS names one
    proc = _run_sbatch(tmp_path, "data.manifest=/d/manifest.json", LAUNCH_MODE="ssh", PREFLIGHT_ARGS="--verify")
    assert _commands(proc.stdout)[0][-4:] == ["8", "--verify", "--manifest", "/d/manifest.json"]
    proc = _run_sbatch(tmp_path, "data.manifest=/d/manifest.json", LAUNCH_MODE="ssh", PREFLIGHT_ARGS="--manifest /e")
    assert _commands(proc.stdout)[0][-3:] == ["8", "--manifest", "/e"]
    proc = _run_sbatch(tmp_path, "data.manifest=/d", "data.allow_external_shards=true", LAUNCH_MODE="ssh")
    assert _commands(proc.stdout)[0][-4:] == ["8", "--manifest", "/d", "--allow-external-shards"]
    forward = _commands(proc.stdout)[2]
    assert forward[:5] == ["(on", "USR1/TERM)", "pdsh", "-S", "-w"] and forward[5] == "gpu001,gpu002"
    assert _commands(proc.stdout)[3] == ["(after", "USR1)", "scontrol", "requeue", "4242"]


def test_srun_path(tmp_path):
    proc = _run_sbatch(tmp_path, "experiment=smoke", "run_dir=/shared/x", LAUNCH_MODE="srun",
                       SLURM_JOB_NODELIST="rack[1-2]-gpu[01-02]", SLURM_GPUS_PER_NODE="h100:4",
                       GPUS_PER_NODE="", MASTER_PORT="31234", PREFLIGHT="0")
    hostfile = tmp_path / "run" / "launch" / "4242.hostfile"
    hosts = ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]
    assert hostfile.read_text() == "".join(f"{h} slots=4\n" for h in hosts)
    assert not (tmp_path / "run" / "launch" / "4242.deepspeed_env").exists()  # srun copies the env
    cmds = _commands(proc.stdout)
    assert len(cmds) == 3  # PREFLIGHT=0: training, signal forwarding, requeue
    assert cmds[0] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=96",
                       "--cpu-bind=none", "--kill-on-bad-exit=1", "bash", str(NODE_LAUNCHER), DEEPSPEED,
                       "--hostfile", str(hostfile), "--master_addr", "rack1-gpu01", "--master_port", "31234",
                       "--no_local_rank", "--no_ssh", "--module", "pretrain.train",
                       "experiment=smoke", "run_dir=/shared/x", "resume=auto"]
    assert cmds[1][:8] == ["(on", "USR1/TERM)", "srun", "--overlap", "--nodes=4", "--ntasks=4",
                           "--ntasks-per-node=1", "pkill"]


def _cmdline_matches(pattern, argv):
    """Does `pkill -f PATTERN` select a process with this argv? pkill matches the POSIX extended
    regex against the arguments joined by spaces; grep -E uses the same regex dialect."""
    proc = subprocess.run(["grep", "-E", "-q", "--", pattern], input=" ".join(argv), text=True)
    return proc.returncode == 0


def test_signal_forwarding_selects_only_this_runs_ranks(tmp_path):
    proc = _run_sbatch(tmp_path, LAUNCH_MODE="srun", PREFLIGHT="0", RUN_DIR=str(tmp_path / "run.v2+a"))
    forward = _commands(proc.stdout)[1]
    pattern = forward[forward.index("--") + 1]
    run = str(tmp_path / "run.v2+a")
    rank = [sys.executable, "-u", "-m", "pretrain.train", f"run_dir={run}", "resume=auto"]
    assert _cmdline_matches(pattern, rank)
    launchers = [
        [sys.executable, DEEPSPEED, "--hostfile", "h", "--no_ssh", "--module", "pretrain.train", f"run_dir={run}"],
        [sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--node_rank=0",
         "--module", "pretrain.train", f"run_dir={run}", "resume=auto"],
        forward[2:],  # the forwarding command itself
    ]
    others = [  # another job's ranks: a different or longer run dir, or a look-alike path
        [sys.executable, "-u", "-m", "pretrain.train", f"run_dir={run}2", "resume=auto"],
        [sys.executable, "-u", "-m", "pretrain.train", f"run_dir={run.replace('.v2+a', 'xv2a')}"],
    ]
    for argv in launchers + others:
        assert not _cmdline_matches(pattern, argv), argv


def test_errors(tmp_path):
    proc = _run_sbatch(tmp_path, LAUNCH_MODE="mpi", check=False)
    assert proc.returncode != 0 and "LAUNCH_MODE" in proc.stderr
    proc = _run_sbatch(tmp_path, SLURM_JOB_NODELIST="gpu[1-", check=False)
    assert proc.returncode != 0 and "gpu[1-" in proc.stderr
    proc = _run_sbatch(tmp_path, GPUS_PER_NODE="", check=False)
    assert proc.returncode != 0 and "GPUS_PER_NODE" in proc.stderr
    env = _clean_env()
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr


@pytest.mark.parametrize("script", [SBATCH, NODE_LAUNCHER, SUBMIT])
def test_help(script):
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_node_launcher_inserts_node_rank_and_ignores_usr1(tmp_path):
    # Stands in for the deepspeed executable: reports the arguments and USR1 disposition it got.
    launcher = tmp_path / "launcher"
    launcher.write_text(f"#!{sys.executable}\nimport signal, sys\n"
                        "print(sys.argv[1:], signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)\n")
    launcher.chmod(0o755)
    proc = subprocess.run(["bash", str(NODE_LAUNCHER), str(launcher), "--no_ssh", "a=1"],
                          env={**os.environ, "SLURM_NODEID": "3"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['--node_rank=3', '--no_ssh', 'a=1'] True"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_NODEID"}
    proc = subprocess.run(["bash", str(NODE_LAUNCHER), str(launcher)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "SLURM_NODEID" in proc.stderr


def test_submit_builds_sbatch_command():
    env = _clean_env(NODES="4", GPUS_PER_NODE="8", TIME="02:00:00", ACCOUNT="acct1", PARTITION="gpu",
                     SBATCH_EXTRA="--qos=high --mail-type=END")
    proc = subprocess.run(["bash", str(SUBMIT), "experiment=smoke"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [[
        "sbatch", "--job-name=biglearn", "--nodes=4", "--gpus-per-node=8", "--time=02:00:00",
        "--account=acct1", "--partition=gpu", "--qos=high", "--mail-type=END",
        str(SUBMIT.parent / "train.sbatch"), "experiment=smoke"]]


# SLURM itself is not installed here. These two stand-ins play its part on one node so that the
# real batch script, node_launcher.sh and DeepSpeed launcher run unchanged around the ranks.
FAKE_SRUN = r"""#!/usr/bin/env bash
# srun on one node: drop srun's own options, run the command as node 0.
overlap=0
while [[ "$1" == --* ]]; do [[ "$1" == --overlap ]] && overlap=1; shift; done
if (( overlap )); then
    # The batch script's signal forwarding (pkill -USR1 -u UID -f -- PATTERN): select with pgrep,
    # which matches exactly like pkill, record the matches, and signal them by pid, but only
    # processes descended from the batch shell that started this step.
    pattern="${@: -1}"
    pgrep -f -- "$pattern" > "$FAKE_DIR/matched" || true
    while read -r pid; do
        p=$pid
        while [[ "$p" -gt 1 && "$p" != "$PPID" ]]; do p=$(awk '{print $4}' "/proc/$p/stat"); done
        [[ "$p" == "$PPID" ]] && kill -USR1 "$pid"
    done < "$FAKE_DIR/matched"
    exit 0
fi
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = '#!/usr/bin/env bash\necho "$@" >> "$FAKE_DIR/scontrol.log"\n'


def _fake_slurm(tmp_path, repo_dir, **env):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    return fake, _clean_env(DRY_RUN="0", LAUNCH_MODE="srun", PREFLIGHT="0", SLURM_JOB_NODELIST="localhost",
                            REPO_DIR=str(repo_dir), DS_ACCELERATOR="cpu", FAKE_DIR=str(fake),
                            PATH=f"{fake / 'bin'}:{os.environ['PATH']}", **env)


def _preempt(env, args, ready, cwd, timeout=600):
    """Run the batch script, send it USR1 once ready() holds (as SLURM does 120 s before the time
    limit), and return (exit status, output)."""
    import signal
    import time

    batch = subprocess.Popen(["bash", str(SBATCH), *args], env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while not ready() and batch.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert ready(), "training never got going"
        batch.send_signal(signal.SIGUSR1)
        out, _ = batch.communicate(timeout=timeout)
    finally:
        if batch.poll() is None:
            batch.kill()
    return batch.returncode, out


# A training rank that does what pretrain.train promises on USR1: checkpoint, exit 0.
RANK = """import os, signal, sys, time
run_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir=")][0]
def checkpoint(signum, frame):
    open(os.path.join(run_dir, "checkpoint"), "w").write(" ".join(sys.argv[1:]))
    sys.exit(0)
signal.signal(signal.SIGUSR1, checkpoint)
os.makedirs(run_dir, exist_ok=True)
open(os.path.join(os.environ["FAKE_DIR"], "rank.pid"), "w").write(str(os.getpid()))
time.sleep(120)
sys.exit(3)
"""


@pytest.mark.dist
def test_usr1_checkpoints_and_requeues(tmp_path):
    repo = tmp_path / "repo"  # the real launch/ next to a pretrain/ holding the rank above
    (repo / "pretrain").mkdir(parents=True)
    (repo / "launch").symlink_to(REPO / "launch")
    (repo / "pretrain" / "__init__.py").write_text("")
    (repo / "pretrain" / "train.py").write_text(RANK)
    run = tmp_path / "run"
    fake, env = _fake_slurm(tmp_path, repo, SLURM_JOB_ID="777", GPUS_PER_NODE="1", RUN_DIR=str(run))
    status, out = _preempt(env, ["experiment=smoke"], lambda: (fake / "rank.pid").exists(), tmp_path, timeout=60)
    assert status == 0, out
    rank_pid = (fake / "rank.pid").read_text()
    assert (fake / "matched").read_text().split() == [rank_pid]  # the rank and nothing else
    assert (run / "checkpoint").read_text() == f"run_dir={run} experiment=smoke resume=auto"
    assert (fake / "scontrol.log").read_text() == "requeue 777\n"


@pytest.mark.dist
@pytest.mark.slow
def test_preemption_with_real_trainer(tmp_path):
    """The real trainer, 2 CPU ranks: USR1 -> checkpoint -> exit 0 -> requeue; the requeued job
    (same id, same run_dir) resumes from that checkpoint."""
    run = tmp_path / "run"
    fake, env = _fake_slurm(tmp_path, REPO, SLURM_JOB_ID="778", GPUS_PER_NODE="2", RUN_DIR=str(run))
    args = ["experiment=smoke", "deepspeed=cpu", "trainer.max_steps=100000", "trainer.save_every=0"]
    metrics = run / "metrics.jsonl"
    status, out = _preempt(env, args, lambda: metrics.exists() and '"kind": "train"' in metrics.read_text(), REPO)
    assert status == 0, out[-5000:]
    assert len((fake / "matched").read_text().split()) == 2  # both ranks, no launcher
    assert (fake / "scontrol.log").read_text() == "requeue 778\n"
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert saved, out[-5000:]
    step = int(saved[-1].name.split("_")[1])

    env["SLURM_RESTART_COUNT"] = "1"
    args[2] = f"trainer.max_steps={step + 2}"
    proc = subprocess.run(["bash", str(SBATCH), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    log = (run / "train.log").read_text()
    assert f"(step {step})" in log and "resumed from" in log
    assert f'"step": {step + 2}' in proc.stdout  # rank 0's summary: it trained on to the new end
