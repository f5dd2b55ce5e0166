"""`biglearn preflight` on datasets whose every sample is unreadable or whose manifest lies, as a
user types it (a table): exit 1 and exactly one [FAIL] line, naming the field or the shard, and
no file outside the dataset read (docs/reliability.md, "Preflight")."""
import json
import shutil

import numpy as np
import pytest

from data_pipeline.shard_format import write_shard

PREFLIGHT = ("biglearn preflight --manifest {manifest} --output-dir {out} --min-free-gb 0.001 --allreduce-mb 0.5 "
             "--iters 2 --timeout-s 60")


def manifest_with(edit):
    def make(data):
        meta = json.loads((data / "manifest.json").read_text())
        edit(meta, data)
        (data / "manifest.json").write_text(json.dumps(meta))
    return make


def _wide_ids(meta, data):
    """Rewrite train-000000.tar with ids up to 600 (the manifest says vocab_size 512), sizes recorded."""
    shard = next(s for s in meta["shards"] if s["path"] == "train-000000.tar")
    info = write_shard(data / shard["path"], "train-000000", [np.arange(580, 600)] * 3, np.dtype("<u2"))
    shard.update({k: info[k] for k in ("bytes", "sha256", "samples")})


def _fewer_samples(meta, data):
    meta["shards"][0]["samples"] += 7


# id, the malformed dataset (edit of a copy), what the one [FAIL] line names
CASES = [
    ("tokenizer-path-climbs-out", manifest_with(lambda m, d: m["tokenizer"].update(path="../../../../etc/passwd")),
     ["[FAIL] manifest", "tokenizer.path", "leads outside"]),
    ("float-tokens", manifest_with(lambda m, d: m.update(token_dtype="<f8")), ["[FAIL] manifest", "token_dtype"]),
    ("seq-len-1e9", manifest_with(lambda m, d: m.update(seq_len=1e9)), ["[FAIL] manifest", "seq_len"]),
    ("negative-count", manifest_with(lambda m, d: m["shards"][0].update(samples=-4)), ["[FAIL] manifest", "samples"]),
    ("vocab-below-ids", manifest_with(lambda m, d: m.update(vocab_size=100)), ["[FAIL] samples", ">= vocab_size 100"]),
    ("ids-above-vocab", manifest_with(_wide_ids), ["[FAIL] samples", "train-000000.tar", ">= vocab_size 512"]),
    ("seq-len-below-windows", manifest_with(lambda m, d: m.update(seq_len=8)), ["[FAIL] samples", "expected 2..8"]),
    ("count-wrong", manifest_with(_fewer_samples), ["[FAIL] samples", "manifest says"]),
    ("dtype-wider-than-written", manifest_with(lambda m, d: m.update(token_dtype="<u4")), ["[FAIL] samples"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_preflight_fails_the_dataset_in_one_line(case, cli, tmp_path, manifest):
    _, make, names = case
    data = tmp_path / "data"
    shutil.copytree(manifest.parent, data)
    make(data)
    ran = cli(PREFLIGHT.format(manifest=data, out=tmp_path / "out"))
    failed = [line for line in ran.stdout.splitlines() if "[FAIL]" in line]
    assert ran.status == 1 and "Traceback" not in ran.stderr, ran.stdout + ran.stderr
    assert len(failed) == 1 and all(name in failed[0] for name in names), ran.stdout
    assert "passwd" not in ran.stdout.replace("../../../../etc/passwd", "")  # named, never read or hashed


def test_preflight_passes_the_intact_dataset(cli, tmp_path, manifest):
    ran = cli(PREFLIGHT.format(manifest=manifest.parent, out=tmp_path / "out"))
    assert ran.status == 0 and "[PASS] samples" in ran.stdout, ran.stdout + ran.stderr


def test_an_all_reduce_buffer_larger_than_memory_is_refused_before_the_group(cli, tmp_path, manifest):
    cli(PREFLIGHT.replace("--allreduce-mb 0.5", "--allreduce-mb 1000000000").format(
        manifest=manifest.parent, out=tmp_path / "out")).refused(2, "--allreduce-mb 1e+09", "available")
