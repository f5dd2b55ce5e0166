import io
import json
import os
import tarfile

import numpy as np
import pytest

from data_pipeline import build_shards, load_manifest
from data_pipeline.shards import ShardConfig, make_windows, split_of
from data_pipeline.shard_format import ShardError, read_shard, tar_members, write_shard
from data_pipeline.sources import SourceConfig, iter_documents
from data_pipeline.tokenizer import Tokenizer

EOS = 3


def _random_docs(rng, n):
    return [list(rng.integers(4, 100, size=rng.integers(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_concat_windows_cut_the_eos_joined_stream(seed):
    rng = np.random.default_rng(seed)
    docs, seq_len = _random_docs(rng, 30), int(rng.integers(2, 20))
    windows = make_windows(docs, seq_len, EOS, "concat")
    stream = [t for d in docs if d for t in d + [EOS]]
    assert np.concatenate(windows).tolist() == stream  # every token, in order
    assert all(2 <= len(w) <= seq_len for w in windows)
    assert all(len(w) == seq_len for w in windows[:-2])


@pytest.mark.parametrize("seed", range(5))
def test_document_windows_keep_documents_whole(seed):
    rng = np.random.default_rng(seed)
    docs, seq_len = _random_docs(rng, 30), int(rng.integers(3, 25))
    windows = make_windows(docs, seq_len, EOS, "documents")
    stream = [t for d in docs if d for t in d + [EOS]]
    assert np.concatenate(windows).tolist() == stream
    assert all(2 <= len(w) <= seq_len for w in windows)
    # A document that fits in a window is never cut: it starts and ends inside one window.
    ends = np.cumsum([len(w) for w in windows])
    position = 0
    for doc in (d for d in docs if d):
        start, stop = position, position + len(doc) + 1
        if len(doc) + 1 <= seq_len:
            assert np.searchsorted(ends, start, side="right") == np.searchsorted(ends, stop - 1, side="right")
        position = stop


def test_split_by_hash_is_deterministic_and_close_to_the_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert splits == [split_of(t, 0.1) for t in texts]
    assert 0.08 < splits.count("val") / len(texts) < 0.12
    assert all(split_of(t, 0.0) == "train" for t in texts[:100])


def test_manifest_describes_every_shard(tiny_demo):
    manifest = load_manifest(tiny_demo)
    tokenizer = Tokenizer.load(tiny_demo.parent)
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256
    assert (manifest["pad_id"], manifest["vocab_size"], manifest["seq_len"]) == (0, 400, 64)
    assert manifest["tokenizer"]["sentinel_ids"] == tokenizer.sentinel_ids
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        assert manifest["splits"][split]["samples"] == sum(s["samples"] for s in shards) > 0
    for entry in manifest["shards"]:
        samples = list(read_shard(tiny_demo.parent / entry["path"], np.uint16, seq_len=64, vocab_size=400,
                                  expected_bytes=entry["bytes"]))
        assert len(samples) == entry["samples"] and all(s.error is None for s in samples)
        assert sum(len(s.tokens) for s in samples) == entry["tokens"]
        assert [s.key for s in samples] == [f"{entry['path'][:-4]}-{i:07d}" for i in range(entry["samples"])]
    # Train and val hold different documents, chosen by content hash.
    docs = list(iter_documents(["stdlib"], SourceConfig(stdlib_limit=60)))
    n_val = sum(split_of(d, 0.1) == "val" for d in docs)
    assert sum(s["documents"] for s in manifest["shards"] if s["split"] == "val") == n_val


@pytest.fixture
def small_corpus(tmp_path):
    rng = np.random.default_rng(1)
    words = "the reader streams shards of token windows and every rank sees its own part".split()
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(5, 60)))
                                                   for _ in range(200)))
    return tmp_path / "corpus.txt"


def _build(corpus, tokenizer_dir, out, **kw):
    config = ShardConfig(seq_len=32, shard_size_mb=0.002, val_fraction=0.2, num_workers=kw.pop("num_workers", 0), **kw)
    return build_shards([corpus], tokenizer_dir, out, config, SourceConfig(txt_split="blank_line"), progress=False)


def test_rerun_skips_finished_shards_and_is_reproducible(tmp_path, small_corpus, tiny_demo):
    tokenizer_dir = tiny_demo.parent / "tokenizer"
    first = json.loads(_build(small_corpus, tokenizer_dir, tmp_path / "a").read_text())
    assert len(first["shards"]) > 3 and first["build"]["reused_shards"] == 0
    again = json.loads(_build(small_corpus, tokenizer_dir, tmp_path / "a").read_text())
    assert again["build"]["reused_shards"] == len(first["shards"]) and again["shards"] == first["shards"]
    parallel = json.loads(_build(small_corpus, tokenizer_dir, tmp_path / "b", num_workers=2).read_text())
    assert parallel["shards"] == first["shards"]  # same bytes (sha256) from worker processes
    whole = json.loads(_build(small_corpus, tokenizer_dir, tmp_path / "a", mode="documents").read_text())
    assert whole["build"]["reused_shards"] == 0  # other settings: nothing reused


def test_interrupted_build_leaves_no_partial_shard(tmp_path, small_corpus, tiny_demo, monkeypatch):
    tokenizer_dir = tiny_demo.parent / "tokenizer"
    calls = {"n": 0}
    original = tarfile.TarFile.addfile

    def failing_addfile(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt  # the build dies in the middle of a shard
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(KeyboardInterrupt):
        _build(small_corpus, tokenizer_dir, tmp_path / "out")
    monkeypatch.setattr(tarfile.TarFile, "addfile", original)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    finished = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    for name in finished:  # every shard under its final name is complete
        assert tarfile.open(out / name).getnames()
    manifest = json.loads(_build(small_corpus, tokenizer_dir, out).read_text())
    assert manifest["build"]["reused_shards"] == len(finished) > 0
    reference = json.loads(_build(small_corpus, tokenizer_dir, tmp_path / "ref").read_text())
    assert manifest["shards"] == reference["shards"]


def test_read_shard_reports_bad_samples_and_truncation(tmp_path):
    windows = [np.arange(5, 15), np.arange(20, 23)]
    info = write_shard(tmp_path / "s.tar", "s", windows, np.uint16)
    with tarfile.open(tmp_path / "s.tar", "a") as tar:  # append garbage: odd byte count, then a foreign file
        for name, data in (("s-0000002.tokens.u16", b"\x01\x02\x03"), ("s-0000003.txt", b"hello")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    samples = list(read_shard(tmp_path / "s.tar", np.uint16, seq_len=16))
    assert [s.tokens.tolist() for s in samples[:2]] == [w.tolist() for w in windows]
    assert [s.tokens for s in samples[2:]] == [None, None] and "whole number" in samples[2].error
    assert list(read_shard(tmp_path / "s.tar", np.uint16, start=1))[0].key == "s-0000001"
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[:700])
    with pytest.raises(ShardError, match="t.tar"):
        list(read_shard(tmp_path / "t.tar", np.uint16, expected_bytes=info["bytes"]))
    with pytest.raises(ShardError, match="t.tar"):
        list(read_shard(tmp_path / "t.tar", np.uint16))  # no size to compare: tar itself fails
    with pytest.raises(ShardError, match="missing"):
        list(read_shard(tmp_path / "missing.tar", np.uint16))


@pytest.mark.parametrize("bad_path", ["../outside.tar", "/etc/passwd", "sub/../../outside.tar", "link/s.tar"])
def test_manifest_shard_paths_must_stay_inside_the_dataset(tmp_path, bad_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    info = write_shard(tmp_path / "elsewhere" / "s.tar", "s", [np.arange(4, 9)], np.uint16)
    (root / "link").symlink_to(tmp_path / "elsewhere")
    manifest = {"format": "biglearn-token-shards", "version": 1, "seq_len": 8, "pad_id": 0, "vocab_size": 50,
                "token_dtype": "<u2", "tokenizer": {},
                "shards": [{"path": bad_path, "split": "train", "samples": 1, "tokens": 5, **info}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shards\[0\]\.path .* leads outside .*allow_external_shards"):
        load_manifest(root)
    assert load_manifest(root, allow_external_shards=True)["shards"][0]["path"] == bad_path


def test_damaged_tar_header_is_an_error_not_a_quiet_end(tmp_path):
    windows = [np.arange(4, 4 + n) for n in range(2, 30)]
    write_shard(tmp_path / "s.tar", "s", windows, np.uint16)
    with tarfile.open(tmp_path / "s.tar") as tar:
        tenth = tar.getmembers()[9].offset
    data = bytearray((tmp_path / "s.tar").read_bytes())
    data[tenth + 3] ^= 0xFF  # a byte of the 10th member's name: its header checksum no longer matches
    (tmp_path / "s.tar").write_bytes(bytes(data))
    reader = read_shard(tmp_path / "s.tar", np.uint16)
    assert [next(reader).key for _ in range(9)] == [f"s-{i:07d}" for i in range(9)]
    with pytest.raises(ShardError, match=f"damaged tar header at byte {tenth} after 9 samples"):
        next(reader)


def test_plain_webdataset_reads_every_sample_with_the_manifest_counts(tiny_demo):
    import webdataset
    manifest = load_manifest(tiny_demo)
    for split, summary in manifest["splits"].items():
        urls = [str(tiny_demo.parent / s["path"]) for s in manifest["shards"] if s["split"] == split]
        samples = list(webdataset.WebDataset(urls, shardshuffle=False))
        assert len(samples) == summary["samples"]
        assert sum(len(s["tokens.u16"]) // 2 for s in samples) == summary["tokens"]
        assert len({s["__key__"] for s in samples}) == len(samples)


def test_labelled_jsonl_becomes_multi_segment_samples(tmp_path, tiny_demo):
    import webdataset
    tokenizer = Tokenizer.load(tiny_demo.parent / "tokenizer")
    rng = np.random.default_rng()
    words = "the reader streams shards of token windows and every rank sees its own part".split()
    records = [{"label": int(rng.integers(0, 3)), "text": " ".join(rng.choice(words, rng.integers(1, 6)))}
               for _ in range(120)]
    lines = [json.dumps(r) for r in records] + [json.dumps({"text": "no label"}),
                                                 json.dumps({"label": 1, "text": " ".join(["window"] * 200)})]
    (tmp_path / "labelled.jsonl").write_text("\n".join(lines) + "\n")
    path = build_shards([tmp_path / "labelled.jsonl"], tiny_demo.parent / "tokenizer", tmp_path / "out",
                        ShardConfig(seq_len=32, val_fraction=0.0, num_workers=0),
                        SourceConfig(segments=["label", "text"]), progress=False)
    manifest = load_manifest(path)
    # Independent rule: a record is kept whole when its tokens fit one window, else dropped and
    # counted (the random texts can themselves pass 32 tokens when the tiny tokenizer spells
    # words out, so the count is computed, not assumed).
    encoded = [[tokenizer.sentinel_ids[r["label"]]] + tokenizer.encode(r["text"]) for r in records]
    expected = [e for e in encoded if 2 <= len(e) <= 32]
    dropped = len(encoded) - len(expected) + 1  # + the 200-word record
    assert manifest["segments"] == ["label", "text"] and manifest["build"]["too_long_samples"] == dropped
    assert manifest["sources"]["missing_text_field"] == 1
    got = [s for entry in manifest["shards"]
           for s in read_shard(tmp_path / "out" / entry["path"], np.uint16, seq_len=32, n_segments=2)]
    assert [s.tokens.tolist() for s in got] == expected
    assert [s.segments.tolist() for s in got] == [[0] + [1] * (len(e) - 1) for e in expected]
    urls = [str(tmp_path / "out" / s["path"]) for s in manifest["shards"]]
    plain = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [np.frombuffer(s["segments.u8"], np.uint8).tolist() for s in plain] == [s.segments.tolist() for s in got]
    (tmp_path / "corpus.txt").write_text("plain text has no fields")
    with pytest.raises(ValueError, match="corpus.txt.*jsonl files only"):
        list(iter_documents([tmp_path / "corpus.txt"], SourceConfig(segments=["label", "text"])))


def _tarfile_members(path):
    """Reference for tar_members: Python's tarfile (what webdataset's tar expansion uses), file members only."""
    with tarfile.open(path, "r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("seed", range(8))
def test_tar_members_reads_what_tarfile_reads(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "s.tar"
    tar_format = (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)[seed % 3]
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i in range(int(rng.integers(1, 40))):
            if rng.random() < 0.1:
                info = tarfile.TarInfo(f"d{i}")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)  # not a file: skipped by both
                continue
            data = rng.bytes(int(rng.integers(0, 2000)))
            name = f"{'p' * int(rng.integers(0, 3))}x/" * int(rng.integers(0, 2)) + f"k-{i:07d}.f{rng.integers(9)}"
            if tar_format != tarfile.USTAR_FORMAT and rng.random() < 0.2:
                # GNU long-name or pax headers before the member: read by webdataset's expansion
                name = ("é" if tar_format == tarfile.PAX_FORMAT else "long") * 40 + name
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(rng.integers(0, 2**30)), 0o644
            tar.addfile(info, io.BytesIO(data))
    assert [(m["fname"], m["data"]) for m in tar_members(path, chunk=int(rng.integers(1, 8)))] == _tarfile_members(path)
    assert all(m["__url__"] == str(path) for m in tar_members(path))
    names = [name for name, _ in _tarfile_members(path)]
    assert [m["fname"] for m in tar_members(path, select=set(names[::2]).__contains__)] == names[::2]


def test_tar_members_end_at_a_damaged_header_like_tarfile_and_report_broken_shards(tmp_path):
    windows = [np.arange(i, i + 7) for i in range(6)]
    write_shard(tmp_path / "s.tar", "s", windows, np.uint16)
    with tarfile.open(tmp_path / "s.tar") as tar:
        offsets = [m.offset for m in tar.getmembers()]
    data = bytearray((tmp_path / "s.tar").read_bytes())
    for flip in (148, 0, 130):  # checksum field, a name byte, a size digit: each makes the checksum wrong
        damaged = bytearray(data)
        damaged[offsets[4] + flip] ^= 0x01
        (tmp_path / "d.tar").write_bytes(bytes(damaged))
        names = [m["fname"] for m in tar_members(tmp_path / "d.tar", chunk=3)]
        assert names == [name for name, _ in _tarfile_members(tmp_path / "d.tar")] == [
            f"s-{i:07d}.tokens.u16" for i in range(4)]
    errors = []
    (tmp_path / "t.tar").write_bytes(bytes(data[:offsets[3] + 512 + 5]))  # the 4th member's data cut short
    assert len(list(tar_members(tmp_path / "t.tar", handler=errors.append))) == 3
    assert len(errors) == 1 and "t.tar" in str(errors[0]) and "past the end" in str(errors[0])
    with pytest.raises(ShardError, match="t.tar"):
        list(tar_members(tmp_path / "t.tar"))
