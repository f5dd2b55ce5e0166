"""bench/silence.py, the 'no silent minute' measurement, against a command whose silences are
known: the longest gap, the first move of a training bar (a '\\r' redraw, as tqdm draws it on
a terminal) and a compile are reported as they happened."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, time
print("start", flush=True)
time.sleep(1.2)
sys.stdout.write("train:   0%|          | 0/5 [00:00<?, ?step/s]"); sys.stdout.flush()
time.sleep(0.4)
sys.stdout.write("\\rtrain:  20%|##        | 1/5 [00:00<00:01, 2.5step/s]\\n"); sys.stdout.flush()
print("Building extension module shm_comm...", flush=True)
"""


def test_gaps_first_step_and_compile_are_reported_as_they_happened(tmp_path):
    log, command = tmp_path / "lines.log", tmp_path / "command.py"
    command.write_text(SCRIPT)
    done = subprocess.run([sys.executable, "bench/silence.py", "--log", str(log), "--", sys.executable, str(command)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| `"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "0" and cells[5] == "yes"
    first_step = float(cells[4].removesuffix(" s"))
    gap, at = map(float, re.fullmatch(r"([\d.]+) s \(from ([\d.]+) s\)", cells[6]).groups())
    times = [float(line.split()[0]) for line in log.read_text().splitlines()]
    assert len(times) == 4 and times == sorted(times)  # start, the bar at 0/5 and at 1/5, the compile line
    start, bar_drawn, bar_moved, _ = times
    # The longest silence: the 1.2 s sleep, or the interpreter's start on a loaded machine (the
    # table rounds to 0.1 s).
    longest, longest_at = max((b - a, a) for a, b in zip([0.0] + times, times))
    assert gap >= 1.15 and abs(gap - longest) < 0.11 and abs(at - longest_at) < 0.11
    assert bar_drawn - start >= 1.15 and bar_moved - bar_drawn >= 0.35
    assert abs(first_step - bar_moved) < 0.06  # the redraw to 1/5, not the bar's first drawing at 0/5
