import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest

from data_pipeline import load_manifest
from data_pipeline.inspection import format_report, inspect_dataset


@pytest.fixture
def demo_copy(tiny_demo, tmp_path):
    shutil.copytree(tiny_demo.parent, tmp_path / "d")
    return tmp_path / "d" / "manifest.json"


def test_clean_dataset_is_ok(tiny_demo):
    report = inspect_dataset(tiny_demo, n_examples=2)
    manifest = load_manifest(tiny_demo)
    assert report["ok"] and not report["bad_shards"]
    for split, summary in manifest["splits"].items():
        assert report["splits"][split]["samples"] == summary["samples"]
        assert report["splits"][split]["tokens"] == summary["tokens"]
    assert len(report["examples"]) == 2 and all(e["text"] for e in report["examples"])


def test_truncated_and_altered_shards_are_reported(demo_copy):
    manifest = load_manifest(demo_copy)
    truncated, altered = manifest["shards"][0]["path"], manifest["shards"][1]["path"]
    path = demo_copy.parent / truncated
    path.write_bytes(path.read_bytes()[:-1000])
    path = demo_copy.parent / altered
    data = bytearray(path.read_bytes())
    data[600] ^= 0x01  # one token id changes, the tar stays valid
    path.write_bytes(bytes(data))
    report = inspect_dataset(demo_copy)
    bad = {b["path"]: b["error"] for b in report["bad_shards"]}
    assert set(bad) == {truncated, altered}
    assert "truncated" in bad[truncated] and "sha256" in bad[altered]
    assert f"BAD SHARD {truncated}" in format_report(report)
    cli = subprocess.run([sys.executable, "-m", "data_pipeline", "inspect", str(demo_copy)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and f"BAD SHARD {truncated}" in cli.stdout


def test_garbage_sample_is_reported_with_its_member_name(demo_copy):
    raw = json.loads(demo_copy.read_text())
    entry = raw["shards"][0]
    path = demo_copy.parent / entry["path"]
    with tarfile.open(path, "a") as tar:
        member = tarfile.TarInfo(entry["path"][:-4] + "-9999999.tokens.u16")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"\x00" * 5))
    data = path.read_bytes()
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()  # as if built that way
    demo_copy.write_text(json.dumps(raw))
    report = inspect_dataset(demo_copy)
    assert not report["ok"] and not report["bad_shards"]
    key = member.name[:-len(".tokens.u16")]
    assert [b["member"] for b in report["bad_samples"]] == [key]
    assert f"BAD SAMPLE {entry['path']} / {key}" in format_report(report)


def test_members_behind_a_damaged_header_are_counted_as_bad_samples(demo_copy):
    manifest = load_manifest(demo_copy)
    entry = max(manifest["shards"], key=lambda e: e["samples"])
    path = demo_copy.parent / entry["path"]
    with tarfile.open(path) as tar:
        tenth = tar.getmembers()[9].offset
    data = bytearray(path.read_bytes())
    data[tenth + 148] ^= 0x07  # the 10th header's checksum field
    path.write_bytes(bytes(data))
    report = inspect_dataset(demo_copy)
    assert [b["path"] for b in report["bad_shards"]] == [entry["path"]]
    assert "damaged tar header" in report["bad_shards"][0]["error"]
    assert [(b["shard"], b["count"]) for b in report["bad_samples"]] == [(entry["path"], entry["samples"] - 9)]
    assert f"1 bad shards, {entry['samples'] - 9} bad samples" in format_report(report)
