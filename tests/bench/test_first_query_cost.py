"""bench/first_query_cost.py as documented: both rules timed on the same batch, and the number of
first-target query rows it reports is the brute-force count (S non-empty, first group a singleton)."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from pretrain.objectives import ObjectiveSampler

ROOT = Path(__file__).resolve().parents[2]


def test_first_query_cost_runs_and_counts_the_query_rows():
    done = subprocess.run([sys.executable, "bench/first_query_cost.py", "--length", "48", "--rounds", "1",
                           "--batch-size", "6", "--preset", "prefix_lm"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rng = np.random.default_rng(0)
    rng.integers(0, 8000, (6, 48))  # the windows the script draws first
    specs = [ObjectiveSampler("prefix_lm")(48, rng) for _ in range(6)]
    expected = sum(s.n_source > 0 and list(s.target_groups).count(s.target_groups[0]) == 1 for s in specs)
    assert re.search(rf"^{expected} of 6 samples have a first-target query row", done.stdout, re.M), done.stdout
    assert re.search(r"new / old = \d+\.\d{3}", done.stdout)
