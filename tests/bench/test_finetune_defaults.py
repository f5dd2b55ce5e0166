"""bench/finetune_defaults.py's task, as the docs run it: a TSV pair that the fine-tuning reader
reads, three balanced labels, no dev text in train."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

from pretrain.infer import read_examples

ROOT = Path(__file__).resolve().parents[2]


def test_task_only_writes_a_tsv_task_the_reader_reads(tmp_path):
    done = subprocess.run([sys.executable, "bench/finetune_defaults.py", "--task-only", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train, dev = read_examples(tmp_path / "train.tsv"), read_examples(tmp_path / "dev.tsv")
    assert Counter(e.label for e in train) == {"tkinter": 140, "xml": 140, "unittest": 140}
    assert set(e.label for e in dev) == {"tkinter", "xml", "unittest"} and len(dev) >= 120
    assert not {e.text for e in train} & {e.text for e in dev}
    majority = max(Counter(e.label for e in dev).values()) / len(dev)
    assert f"majority class {100 * majority:.1f}%" in done.stdout
