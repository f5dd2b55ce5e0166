"""launch/preflight.py on a small shard manifest + tokenizer fixture: passes on this machine
(one process, and two gloo processes under torchrun) and fails clearly on each kind of damage."""

import json
import os
import subprocess
import sys

import pytest

from launch.preflight import main

FAST = ["--min-free-gb", "0.001", "--allreduce-mb", "0.5", "--iters", "2", "--timeout-s", "60"]


@pytest.fixture(autouse=True)
def no_dist_env(monkeypatch):
    for key in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(key, raising=False)


def _preflight(capsys, shards, tok, out, *extra):
    code = main(["--manifest", str(shards), "--tokenizer", str(tok), "--output-dir", str(out), *FAST, *extra])
    return code, capsys.readouterr().out


def test_passes_single_process(dataset, capsys):
    code, report = _preflight(capsys, *dataset, "--verify")
    assert code == 0, report
    assert "preflight PASSED" in report and "[FAIL]" not in report
    assert "3 shard(s) present" in report and "3 shard(s) verified" in report
    assert "matches the manifest" in report and "all-reduce" in report
    assert (dataset[2]).is_dir()  # the output directory was created


def test_missing_shard(dataset, capsys):
    shards, tok, out = dataset
    (shards / "shard-000001.tar").unlink()
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1
    assert "[FAIL] manifest" in report and "'shard-000001.tar' missing" in report
    assert "shard-000000.tar" not in report and "preflight FAILED" in report


def test_unreadable_shard(dataset, capsys):
    shards, tok, out = dataset
    (shards / "shard-000002.tar").unlink()
    (shards / "shard-000002.tar").mkdir()  # open() fails even for root, unlike chmod 000
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1 and "'shard-000002.tar' unreadable" in report


def test_verify_detects_corruption(dataset, capsys):
    shards, tok, out = dataset
    path = shards / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[512] ^= 0x01  # the first token's low bit: same size, still a token id below 16; only the hash can tell
    path.write_bytes(bytes(data))
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 0, report  # existence, size and sample checks pass
    code, report = _preflight(capsys, shards, tok, out, "--verify")
    assert code == 1 and "'shard-000000.tar' sha256" in report
    with open(path, "ab") as f:
        f.write(b"x")
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1 and f"'shard-000000.tar' is {len(data) + 1} bytes, manifest says {len(data)}" in report


def test_size_is_checked_without_verify(dataset, capsys):
    """A shard cut to half its size fails the cheap default checks (one stat per shard)."""
    shards, tok, out = dataset
    path = shards / "shard-000001.tar"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1 and "[FAIL] manifest" in report, report
    assert f"'shard-000001.tar' is {size // 2} bytes, manifest says {size}" in report


def test_tokenizer_mismatch(dataset, capsys):
    shards, tok, out = dataset
    (tok / "tokenizer.model").write_bytes(os.urandom(512))
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1
    assert "[FAIL] tokenizer" in report and "tokenizer.model" in report and "does not match" in report


def _edit_manifest(shards, edit):
    manifest = json.loads((shards / "manifest.json").read_text())
    edit(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.clear(), "not a biglearn-token-shards v1 manifest"),
    (lambda m: m.pop("seq_len"), "manifest lacks field 'seq_len'"),
    (lambda m: m["shards"][0].pop("path"), "shards[0] has no path"),
    (lambda m: m["tokenizer"].pop("sha256"), "field 'tokenizer.sha256' is missing"),
])
def test_bad_manifest_fields(dataset, capsys, edit, message):
    shards, tok, out = dataset
    _edit_manifest(shards, edit)
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1 and message in report and "manifest.json" in report


def test_unparsable_manifest(dataset, capsys):
    shards, tok, out = dataset
    (shards / "manifest.json").write_text("{not json")
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1 and f"{shards / 'manifest.json'}: cannot read manifest" in report


@pytest.mark.parametrize("outside", ["absolute", "dotdot", "symlink"])
def test_shard_outside_the_dataset_directory(dataset, capsys, outside):
    """The check training applies (data_pipeline.manifest.load_manifest): a shard path that leads
    out of the dataset directory is refused, naming the manifest and the entry, unless opted in."""
    shards, tok, out = dataset
    moved = shards.parent / "elsewhere.tar"
    (shards / "shard-000001.tar").rename(moved)
    path = {"absolute": str(moved), "dotdot": "../elsewhere.tar", "symlink": "link.tar"}[outside]
    if outside == "symlink":
        (shards / "link.tar").symlink_to(moved)
    _edit_manifest(shards, lambda m: m["shards"][1].update(path=path))
    code, report = _preflight(capsys, shards, tok, out)
    assert code == 1, report
    line = next(line for line in report.splitlines() if "[FAIL] manifest" in line)
    assert f"{shards / 'manifest.json'}: shards[1].path {path!r} leads outside" in line
    assert "allow_external_shards" in line
    code, report = _preflight(capsys, shards, tok, out, "--allow-external-shards", "--verify")
    assert code == 0, report
    assert "3 shard(s) present" in report and "3 shard(s) verified" in report


def test_disk_and_gpu_expectations(dataset, capsys):
    shards, tok, out = dataset
    code, report = _preflight(capsys, shards, tok, out, "--min-free-gb", "1e9")
    assert code == 1 and "[FAIL] disk" in report and str(out) in report
    import torch
    n_gpus = torch.cuda.device_count()
    code, report = _preflight(capsys, shards, tok, out, "--expect-gpus", str(n_gpus + 1))
    assert code == 1 and f"{n_gpus} GPU(s) visible, expected {n_gpus + 1}" in report


def _torchrun(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "launch.preflight", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.dist
def test_two_gloo_processes(dataset):
    shards, tok, out = dataset
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "launch.preflight", "--manifest", str(shards), "--tokenizer", str(tok),
                           "--output-dir", str(out), "--verify", *FAST],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight: 2 rank(s) on 1 node(s)" in proc.stdout and "preflight PASSED" in proc.stdout
    assert "gloo, 2 rank(s)" in proc.stdout and "busbw" in proc.stdout
    # --verify splits the three shards across the two ranks: 2 on rank 0, 1 on rank 1
    assert "2 shard(s) verified on rank 0" in proc.stdout and "1 shard(s) verified on rank 1" in proc.stdout


def test_tokenizer_next_to_manifest(dataset, capsys):
    """Without --tokenizer, the copy named by the manifest's tokenizer.path is checked."""
    shards, tok, out = dataset
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = "tokenizer.model"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    (shards / "tokenizer.model").write_bytes((tok / "tokenizer.model").read_bytes())
    args = ["--manifest", str(shards), "--output-dir", str(out), *FAST]
    assert main(args) == 0
    assert f"{shards / 'tokenizer.model'}: sha256" in capsys.readouterr().out
    (shards / "tokenizer.model").write_bytes(b"another tokenizer")
    assert main(args) == 1
    assert "does not match" in capsys.readouterr().out
    del manifest["tokenizer"]["path"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert main(args) == 0
    assert "[SKIP] tokenizer" in capsys.readouterr().out
