"""`biglearn data` on malformed input and small corpora, as a user types it: a manifest that names
files outside its dataset or has fields of the wrong kind is one `error:` line naming the field
(exit 2); the shard builder gives a validation split at least one document whenever
--val-fraction > 0 and there are two documents, and says loudly when it cannot; a full disk is
one line, with no temporary file left (docs/reliability.md)."""
import json
import shutil

import pytest

from data_pipeline.shards import split_of


def manifest_with(edit):
    def make(tmp_path, manifest):
        copy = tmp_path / "data"
        shutil.copytree(manifest.parent, copy)
        meta = json.loads((copy / "manifest.json").read_text())
        edit(meta)
        (copy / "manifest.json").write_text(json.dumps(meta))
        return copy / "manifest.json"
    return make


INSPECT = "biglearn data inspect {manifest} --no-verify"
# id, the malformed manifest, what the error line names
CASES = [
    ("tokenizer-path-climbs-out", manifest_with(lambda m: m["tokenizer"].update(path="../../../../etc/passwd")),
     ["tokenizer.path", "leads outside"]),
    ("tokenizer-files-absolute", manifest_with(lambda m: m["tokenizer"].update(files=["/etc/passwd"])),
     ["tokenizer.files", "leads outside"]),
    ("shard-climbs-out", manifest_with(lambda m: m["shards"][0].update(path="../x.tar")), ["shards[0].path"]),
    ("float-tokens", manifest_with(lambda m: m.update(token_dtype="<f8")), ["token_dtype"]),
    ("big-endian-tokens", manifest_with(lambda m: m.update(token_dtype=">u2")), ["token_dtype"]),
    ("seq-len-1e9", manifest_with(lambda m: m.update(seq_len=10 ** 9)), ["seq_len"]),
    ("seq-len-text", manifest_with(lambda m: m.update(seq_len="32")), ["seq_len"]),
    ("vocab-beyond-dtype", manifest_with(lambda m: m.update(vocab_size=70000)), ["vocab_size 70000", "<u2"]),
    ("pad-beyond-vocab", manifest_with(lambda m: m.update(pad_id=600)), ["pad_id"]),
    ("negative-count", manifest_with(lambda m: m["shards"][1].update(tokens=-1)), ["shards[1].tokens"]),
    ("shards-not-a-list", manifest_with(lambda m: m.update(shards={"a": 1})), ["shards"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_manifest_is_refused_in_one_line(case, cli, tmp_path, manifest):
    _, make, names = case
    cli(INSPECT.format(manifest=make(tmp_path, manifest))).refused(2, "manifest.json", *names)


def corpus(directory, texts):
    directory.mkdir()
    for i, text in enumerate(texts):
        (directory / f"doc{i}.txt").write_text(text)
    return directory


SHARDS = "biglearn data shards --input {input} --tokenizer {tokenizer} --seq-len 32 --workers 0 --output {out}"


@pytest.mark.parametrize("flags, names", [("--seq-len 1000000000", ["seq_len", "1000000000", "16777216"]),
                                          ("--val-fraction 1.5", ["val_fraction"]),
                                          ("--shard-size-mb -1", ["shard_size_mb"])])
def test_shards_refuses_flags_out_of_range(flags, names, cli, tmp_path, manifest):
    """Refused before anything is written, including what the manifest reader would refuse later."""
    out = tmp_path / "out"
    ran = cli(SHARDS.format(input=corpus(tmp_path / "in", ["one text", "another text"]),
                            tokenizer=manifest.parent / "tokenizer", out=out) + " " + flags)
    ran.refused(2, *names)
    assert not out.exists()


def test_a_small_corpus_still_gets_a_validation_document(cli, tmp_path, manifest):
    texts = [f"document number {i}: the quick brown fox jumps over the lazy dog " * 3 for i in range(5)]
    assert all(split_of(t, 0.01) == "train" for t in texts)  # the hash split alone gives no validation document
    out = tmp_path / "out"
    ran = cli(SHARDS.format(input=corpus(tmp_path / "in", texts), tokenizer=manifest.parent / "tokenizer", out=out))
    ran.succeeded()
    assert "note: no document fell into the validation split" in ran.stderr
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert splits["val"]["shards"] == 1 and splits["train"]["shards"] == 1
    assert splits["val"]["samples"] >= 1


def test_one_document_says_why_there_is_no_validation_split(cli, tmp_path, manifest):
    out = tmp_path / "out"
    ran = cli(SHARDS.format(input=corpus(tmp_path / "in", ["just one document here"]),
                            tokenizer=manifest.parent / "tokenizer", out=out))
    ran.succeeded()
    warning = [line for line in ran.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "no validation split" in warning[0] and "1 usable document" in warning[0]
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["shards"] == 0


@pytest.fixture
def tiny_fs(tmpfs):
    """A 600 KiB tmpfs (tests/conftest.py)."""
    return tmpfs("600k")


def test_shards_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(cli, tmp_path, tiny_fs, manifest,
                                                                        nothing_left):
    texts = [f"text {i} " + " ".join(f"w{(i * j) % 997}" for j in range(2000)) for i in range(60)]
    out = tiny_fs / "out"
    ran = cli(SHARDS.format(input=corpus(tmp_path / "in", texts), tokenizer=manifest.parent / "tokenizer", out=out)
              + " --shard-size-mb 0.05")
    ran.refused(2, "no space left on device", str(out), "re-run continues")
    assert not nothing_left(tiny_fs) and not (out / "manifest.json").exists()
