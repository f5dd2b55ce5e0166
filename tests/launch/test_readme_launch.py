"""The README's DeepSpeed launch line for CPUs, run as a user types it: from the repository root,
through the deepspeed launcher, 2 CPU ranks training experiment=smoke to its end."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_line(prefix: str) -> str:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, lines
    return lines[0].split("  #")[0].strip()


@pytest.mark.dist
@pytest.mark.slow
def test_readme_cpu_deepspeed_line_trains_the_smoke_config(tmp_path):
    command = readme_line("DS_ACCELERATOR=cpu deepspeed ")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(["bash", "-c", f"{command} run_dir={shlex.quote(str(run_dir))}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| 2 ranks | cpu |" in (run_dir / "train.log").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "train") == 30  # experiment=smoke's max_steps
    assert (run_dir / "export" / "model.safetensors").is_file()
