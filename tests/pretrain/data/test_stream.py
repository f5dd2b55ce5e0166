"""BatchStream: round trip from text, rank x worker partition, equal batch counts, exact resume
in a new process, corrupt data skipped and counted."""
import hashlib
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from data_pipeline import build_demo, load_manifest
from data_pipeline.shards import SPLITS, split_of
from data_pipeline.shard_format import write_shard
from data_pipeline.sources import SourceConfig, iter_documents
from data_pipeline.tokenizer import Tokenizer
from pretrain.data import BatchStream
from pretrain.objectives import ObjectiveSampler

SEQ_LEN, VOCAB = 16, 50


def write_dataset(root, sizes: dict, seed=0):
    """Shards of random windows (lengths 2..SEQ_LEN) in the manifest format of docs/data.md.
    Returns (manifest path, {key: tokens})."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries, contents = [], {}
    for split in SPLITS:
        for index, n in enumerate(sizes.get(split, [])):
            stem = f"{split}-{index:06d}"
            windows = [rng.integers(4, VOCAB, size=rng.integers(2, SEQ_LEN + 1)) for _ in range(n)]
            info = write_shard(root / f"{stem}.tar", stem, windows, np.uint16)
            entries.append({"path": f"{stem}.tar", "split": split, "documents": n, **info})
            contents.update({f"{stem}-{i:07d}": w for i, w in enumerate(windows)})
    tokenizer = {"path": "tokenizer.model", "sha256": "0" * 64, "vocab_size": VOCAB, "pad_id": 0, "unk_id": 1,
                 "bos_id": 2, "eos_id": 3, "sentinel_ids": []}
    manifest = {"format": "biglearn-token-shards", "version": 1, "seq_len": SEQ_LEN, "mode": "concat",
                "token_dtype": "<u2", "pad_id": 0, "eos_id": 3, "vocab_size": VOCAB, "tokenizer": tokenizer,
                "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json", contents


def windows_of(batch):
    """The stored windows back from a batch made with the clm sampler (identity order)."""
    rows = []
    for b in range(batch.batch_size):
        n = int(batch.n_source[b] + batch.n_target[b])
        assert batch.positions[b, :n].tolist() == list(range(n))
        rows.append(batch.tokens[b, :n])
    return rows


def read(stream, n):
    iterator = iter(stream)
    out = []
    for _ in range(n):
        batch = next(iterator)
        out.append((list(stream.last_keys), batch))
    stream.close()
    return out


@pytest.fixture(scope="module")
def text_demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("text"), vocab_size=400, seq_len=64, stdlib_limit=40,
                      shard_size_mb=0.02, val_fraction=0.2, num_workers=0, progress=False)


def test_round_trip_text_to_batches_in_order(text_demo):
    manifest = load_manifest(text_demo)
    tokenizer = Tokenizer.load(text_demo.parent)
    documents = [d for d in iter_documents(["stdlib"], SourceConfig(stdlib_limit=40)) if split_of(d, 0.2) == "train"]
    expected = [t for ids in tokenizer.encode_batch(documents) for t in ids + [tokenizer.eos_id]]

    stream = BatchStream(text_demo, sampler=ObjectiveSampler("clm"), batch_size=1, shuffle=False)
    assert (stream.pad_id, stream.vocab_size, stream.seq_len) == (0, 400, 64)
    assert len(stream) == manifest["splits"]["train"]["samples"]  # batch size 1: nothing left over
    batches = read(stream, len(stream))
    got = np.concatenate([w for _, batch in batches for w in windows_of(batch)])
    assert got.tolist() == expected  # every token, in order
    keys = [k for ks, _ in batches for k in ks]
    assert keys == [f"{s['path'][:-4]}-{i:07d}" for s in manifest["shards"] if s["split"] == "train"
                    for i in range(s["samples"])]
    normalise = lambda text: " ".join(text.split())  # sentencepiece collapses runs of spaces
    assert normalise(tokenizer.decode(got)) == normalise(" ".join(documents))


def test_val_split_is_one_pass_and_repeatable(text_demo):
    stream = BatchStream(text_demo, split="val", sampler=ObjectiveSampler("plm"), batch_size=2, shuffle=False)
    first = [(list(stream.last_keys), b.tokens.copy(), b.groups.copy()) for b in stream]
    second = [(list(stream.last_keys), b.tokens.copy(), b.groups.copy()) for b in stream]
    assert len(first) == len(stream) == load_manifest(text_demo)["splits"]["val"]["samples"] // 2
    for (k1, t1, g1), (k2, t2, g2) in zip(first, second, strict=True):
        assert k1 == k2 and np.array_equal(t1, t2) and np.array_equal(g1, g2)


@pytest.mark.parametrize("sizes, batch_size", [([6] * 8, 3), ([8, 8], 2)])
def test_two_ranks_by_two_workers_partition_the_split(tmp_path, sizes, batch_size):
    manifest, contents = write_dataset(tmp_path, {"train": sizes})
    per_rank = []
    for rank in range(2):
        stream = BatchStream(manifest, sampler=ObjectiveSampler("clm"), batch_size=batch_size, rank=rank,
                             world_size=2, num_workers=2, seed=5, shuffle=True)
        batches = read(stream, 2 * len(stream))  # two epochs
        for keys, batch in batches:
            assert [w.tolist() for w in windows_of(batch)] == [contents[k].tolist() for k in keys]
        keys = [k for ks, _ in batches for k in ks]
        per_rank.append((keys[:len(keys) // 2], keys[len(keys) // 2:]))
    for epoch in range(2):
        first, second = per_rank[0][epoch], per_rank[1][epoch]
        assert not set(first) & set(second) and len(set(first)) == len(first)
        assert sorted(first + second) == sorted(contents)  # the union is the whole split
    assert per_rank[0][0] != per_rank[0][1]  # each epoch reshuffles


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    rng = np.random.default_rng(7)
    manifest, contents = write_dataset(tmp_path, {"val": rng.integers(1, 12, size=5).tolist()})
    counts, seen = [], []
    for rank in range(3):
        stream = BatchStream(manifest, split="val", sampler=ObjectiveSampler("biglearn"), batch_size=2,
                             rank=rank, world_size=3, num_workers=2, seed=1)
        keys = [k for b in stream for k in stream.last_keys]
        counts.append(len(keys) // 2)
        seen.extend(keys)
    assert counts == [len(stream)] * 3 and counts[0] > 0
    assert len(set(seen)) == len(seen) and set(seen) <= set(contents)


RESUME_SCRIPT = """
import pickle, sys
import numpy as np
from pretrain.data import BatchStream
from pretrain.objectives import ObjectiveSampler
manifest, n, state_in, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
stream = BatchStream(manifest, sampler=ObjectiveSampler("biglearn"), batch_size=3, num_workers=2, seed=11,
                     shuffle_buffer=7)
if state_in != "-":
    stream.load_state_dict(pickle.load(open(state_in, "rb")))
it, got = iter(stream), []
for _ in range(n):
    batch = next(it)
    got.append((list(stream.last_keys), batch.tokens, batch.groups, batch.labels))
pickle.dump({"batches": got, "state": stream.state_dict()}, open(out, "wb"))
stream.close()
"""


def _run_resume_script(tmp_path, manifest, n, state, out):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(manifest), str(n), str(state), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return pickle.load(open(out, "rb"))


def test_resume_in_a_new_process_continues_exactly(tmp_path):
    manifest, _ = write_dataset(tmp_path / "data", {"train": [9, 4, 13, 7, 5]})
    stream = BatchStream(manifest, sampler=ObjectiveSampler("biglearn"), batch_size=3, num_workers=2, seed=11,
                         shuffle_buffer=7)
    total, k = len(stream) + 4, len(stream) - 2  # the resumed part crosses an epoch boundary
    reference = read(stream, total)
    first = _run_resume_script(tmp_path, manifest, k, "-", tmp_path / "a.pkl")
    assert first["state"]["batch"] == k  # prefetching did not move the cursor
    with open(tmp_path / "state.pkl", "wb") as f:
        pickle.dump(first["state"], f)
    second = _run_resume_script(tmp_path, manifest, total - k, tmp_path / "state.pkl", tmp_path / "b.pkl")
    resumed = first["batches"] + second["batches"]
    assert [keys for keys, *_ in resumed] == [keys for keys, _ in reference]
    for (_, tokens, groups, labels), (_, batch) in zip(resumed, reference, strict=True):
        assert np.array_equal(tokens, batch.tokens) and np.array_equal(groups, batch.groups)
        assert np.array_equal(labels, batch.labels)


@pytest.mark.parametrize("k", [0, 1, 4, 5, 9])
def test_resume_at_any_batch_in_process(tmp_path, k):
    manifest, _ = write_dataset(tmp_path, {"train": [5, 9, 6]})
    make = lambda: BatchStream(manifest, sampler=ObjectiveSampler("span"), batch_size=2, seed=3, shuffle_buffer=4)
    reference = [keys for keys, _ in read(make(), 12)]
    stream = make()
    head = [keys for keys, _ in read(stream, k)]
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [keys for keys, _ in read(resumed, 12 - k)] == reference


def test_state_from_other_settings_is_refused(tmp_path):
    manifest, _ = write_dataset(tmp_path, {"train": [6, 6]})
    state = BatchStream(manifest, batch_size=2, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(manifest, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 0 given to rank 1"):
        BatchStream(manifest, batch_size=2, rank=1, world_size=2).load_state_dict(
            BatchStream(manifest, batch_size=2, rank=0, world_size=2).state_dict())
    other, _ = write_dataset(tmp_path / "other", {"train": [6, 7]})
    with pytest.raises(ValueError, match="dataset changed"):
        BatchStream(other, batch_size=2).load_state_dict(state)


@pytest.mark.parametrize("new_world, new_workers, k", [(1, 0, 5), (3, 0, 6), (3, 2, 6)])
def test_resume_on_another_world_size_finishes_the_epoch_exactly(tmp_path, new_world, new_workers, k):
    manifest, contents = write_dataset(tmp_path, {"train": [12, 12, 12, 12]})
    make = lambda rank, world, workers: BatchStream(manifest, sampler=ObjectiveSampler("clm"), batch_size=2,
                                                    rank=rank, world_size=world, num_workers=workers, seed=9,
                                                    shuffle_buffer=5)
    before, states = [], []
    for rank in range(2):  # two ranks run k steps of epoch 0 and save
        stream = make(rank, 2, 0)
        before += [key for keys, _ in read(stream, k) for key in keys]
        states.append(pickle.loads(pickle.dumps(stream.state_dict())))
    after = []
    for rank in range(new_world):  # the new layout resumes from rank 0's state
        stream = make(rank, new_world, new_workers)
        stream.load_state_dict(states[0])
        iterator, mine = iter(stream), []
        while stream.stats["epoch"] == 0:
            next(iterator)
            mine.append(list(stream.last_keys))
        next(iterator)  # epoch 1 begins under the new layout
        assert stream.stats["epoch"] == 1
        stream.close()
        after.append(mine)
    probe = make(0, new_world, new_workers)  # the resized epoch saved and resumed on its new layout
    probe.load_state_dict(states[0])
    head = [keys for keys, _ in read(probe, 1)]
    again = make(0, new_world, new_workers)
    again.load_state_dict(pickle.loads(pickle.dumps(probe.state_dict())))
    assert head + [keys for keys, _ in read(again, len(after[0]) - 1)] == after[0]
    assert len({len(m) for m in after}) == 1  # the same number of batches on every new rank
    after = [key for mine in after for keys in mine for key in keys]
    assert len(set(before + after)) == len(before + after)  # nothing repeated
    assert sorted(before + after) == sorted(contents)  # nothing skipped: the whole epoch


def _add_garbage_sample(path):
    """Append a member that is not a token array; returns the shard's new size and sha256."""
    with tarfile.open(path, "a") as tar:
        member = tarfile.TarInfo(path.stem + "-9999999.tokens.u16")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"\x00\x01\x02"))
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def test_corrupt_shard_and_sample_are_skipped_and_counted(tmp_path, caplog):
    manifest_path, contents = write_dataset(tmp_path, {"val": [6, 6, 6]})
    manifest = json.loads(manifest_path.read_text())
    truncated = tmp_path / manifest["shards"][0]["path"]
    truncated.write_bytes(truncated.read_bytes()[:-2048])
    garbage = tmp_path / manifest["shards"][1]["path"]
    manifest["shards"][1]["bytes"], manifest["shards"][1]["sha256"] = _add_garbage_sample(garbage)
    manifest_path.write_text(json.dumps(manifest))

    stream = BatchStream(manifest_path, split="val", sampler=ObjectiveSampler("clm"), batch_size=2, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        keys = [k for batch in stream for k in stream.last_keys]
    good = [k for k in contents if not k.startswith("val-000000")]
    assert len(keys) == 2 * len(stream) == 18  # the batches promised from the manifest's counts ...
    assert keys[:12] == good  # ... are made of the readable samples, in order,
    assert keys[12:] == good[:6]  # then the reader re-reads its shards to fill the pass (a "wrap")
    # Problems are counted each time they are met: once per pass over the shards.
    assert (stream.stats["skipped_shards"], stream.stats["skipped_samples"], stream.stats["wraps"]) == (2, 2, 1)
    assert "val-000000.tar" in caplog.text and "val-000001.tar" in caplog.text


DIST_SCRIPT = """
import os, sys, datetime
import torch, torch.distributed as dist
from pretrain.data import BatchStream
from pretrain.objectives import ObjectiveSampler
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
for split in ("val", "train"):
    stream = BatchStream(sys.argv[1], split=split, sampler=ObjectiveSampler("biglearn"), batch_size=2,
                         rank=rank, world_size=2, num_workers=1, seed=4)
    steps = 0
    for batch in stream:  # one collective per batch: a rank with an extra batch would wait forever
        dist.all_reduce(torch.tensor([batch.n_target.sum()]))
        steps += 1
        if split == "train" and steps == 2 * len(stream) + 1:  # cross two epoch boundaries
            break
    print(split, steps, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_uneven_shards_do_not_hang_a_distributed_run(tmp_path):
    manifest, _ = write_dataset(tmp_path / "data", {"train": [3, 11, 4], "val": [9, 2, 5]})
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    port = str(29500 + int(np.random.default_rng().integers(0, 2000)))
    procs = [subprocess.Popen([sys.executable, str(script), str(manifest)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port})
             for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith("val ")


EXIT_SCRIPT = """
import signal, sys, time
import psutil
from pretrain.data import BatchStream
from pretrain.objectives import ObjectiveSampler
flag = {"signum": 0}
for signum in (signal.SIGTERM, signal.SIGUSR1):  # like the trainer: note it, act at the next batch
    signal.signal(signum, lambda s, f: flag.update(signum=s))
stream = BatchStream(sys.argv[1], sampler=ObjectiveSampler("clm"), batch_size=2, num_workers=int(sys.argv[2]))
batches = iter(stream)
next(batches)
print(" ".join(str(c.pid) for c in psutil.Process().children()), flush=True)
while not flag["signum"]:
    next(batches)
    time.sleep(0.01)
next(batches)  # the batch in flight when the signal came still arrives
if sys.argv[3] == "close":
    stream.close()
print("stopped by", flag["signum"], flush=True)  # then exits, with or without close()
"""


def _start(tmp_path, script_text, *args):
    script = tmp_path / "script.py"
    script.write_text(script_text)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, [int(pid) for pid in line.split()]


def _wait_gone(pids, seconds=30.0):
    import time

    import psutil

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("num_workers, signum, close", [
    (2, signal.SIGTERM, "close"), (2, signal.SIGTERM, "no-close"), (0, signal.SIGTERM, "close"),
    (1, signal.SIGUSR1, "no-close")])  # about 3 s each
def test_a_stop_signal_to_the_process_group_ends_the_run_and_its_workers(tmp_path, num_workers, signum, close):
    manifest, _ = write_dataset(tmp_path, {"train": [40, 40]})
    proc, workers = _start(tmp_path, EXIT_SCRIPT, manifest, num_workers, close)
    assert len(workers) == num_workers
    os.killpg(proc.pid, signum)  # as a scheduler's pre-emption does: the workers get it too
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"stopped by {int(signum)}" in out
    assert _wait_gone(workers) == []


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """Batches big enough that the prefetched ones fill the pipe to the dead parent (a worker's
    exit then waits for the queue's feeder thread, blocked on that pipe, unless the kernel kills it)."""
    manifest, _ = write_dataset(tmp_path, {"train": [200, 200]})
    script = EXIT_SCRIPT.replace("while not flag", "time.sleep(600)\nwhile not flag").replace("batch_size=2", "batch_size=16")
    proc, workers = _start(tmp_path, script, manifest, 2, "close")
    assert len(workers) == 2
    proc.kill()
    proc.wait(timeout=10)
    left = _wait_gone(workers)
    for pid in left:  # a failure leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    assert left == []  # the kernel kills them with their parent (PR_SET_PDEATHSIG)


def test_samples_behind_a_damaged_tar_header_are_counted(tmp_path, caplog):
    manifest_path, contents = write_dataset(tmp_path, {"val": [6, 6, 6]})
    shard = tmp_path / "val-000001.tar"
    with tarfile.open(shard) as tar:
        fourth = tar.getmembers()[3].offset
    data = bytearray(shard.read_bytes())
    data[fourth + 148] ^= 0x07  # header checksum: tarfile (and webdataset) end the archive here, quietly
    shard.write_bytes(bytes(data))  # same size: only reading finds it
    stream = BatchStream(manifest_path, split="val", sampler=ObjectiveSampler("clm"), batch_size=2, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        keys = [k for batch in stream for k in stream.last_keys]
    good = [k for k in contents if not k.startswith("val-000001") or int(k[-7:]) < 3]
    assert len(keys) == 18 and keys[:15] == good and keys[15:] == good[:3]
    assert (stream.stats["skipped_shards"], stream.stats["skipped_samples"], stream.stats["wraps"]) == (2, 6, 1)  # met in both passes
    assert "val-000001.tar: 3 of its samples unreadable (damaged tar header)" in caplog.text


def test_segments_reach_the_sampler_and_the_batch(tmp_path):
    from pretrain.objectives import ObjectiveConfig, SegmentRule
    rng = np.random.default_rng()
    windows = [rng.integers(4, VOCAB, size=rng.integers(3, SEQ_LEN + 1)) for _ in range(12)]
    segments = [np.repeat([0, 1], [1, len(w) - 1]) for w in windows]  # a label slot, then text
    info = write_shard(tmp_path / "train-000000.tar", "train-000000", windows, np.uint16, segments)
    manifest_path, _ = write_dataset(tmp_path, {})
    manifest = json.loads(manifest_path.read_text())
    manifest.update(segments=["label", "text"], shards=[{"path": "train-000000.tar", "split": "train", **info}])
    manifest_path.write_text(json.dumps(manifest))
    label_in_target = ObjectiveConfig(name="biglearn", segments=[SegmentRule(p_target=1.0), SegmentRule()])
    stream = BatchStream(manifest_path, sampler=ObjectiveSampler(label_in_target), batch_size=3, shuffle=False)
    for batch in stream:
        for b, key in enumerate(stream.last_keys):
            window, segs = windows[int(key[-7:])], segments[int(key[-7:])]
            n_keep = int(batch.n_source[b] + batch.n_target[b])
            positions = batch.positions[b, :n_keep]
            assert batch.positions[b, n_keep - 1] == 0  # the label slot is the last target, always
            assert batch.segments[b, :n_keep].tolist() == segs[positions].tolist()
            assert batch.tokens[b, :n_keep].tolist() == window[positions].tolist()
        if stream.stats["batches"] == len(stream):
            break
    with pytest.raises(ValueError, match="objective.segments has 1 rules .* 2 segments"):
        BatchStream(manifest_path, sampler=ObjectiveSampler(ObjectiveConfig(segments=[SegmentRule()])))


def test_weighted_mix_interleaves_the_sources_and_resumes_exactly(tmp_path):
    from pretrain.data.mixing import MixedStream
    (path_a, contents_a), (path_b, contents_b) = (write_dataset(tmp_path / "a", {"train": [10, 7]}, seed=1),
                                                  write_dataset(tmp_path / "b", {"train": [9, 9, 4]}, seed=2))
    args = dict(sampler=ObjectiveSampler("clm"), batch_size=2, seed=4, shuffle_buffer=3)
    make = lambda: MixedStream([(path_a, 3.0), (path_b, 1.0)], **args)
    alone = {name: [keys for keys, _ in read(BatchStream(path, **args), 200)] for name, path in (("a", path_a), ("b", path_b))}
    stream, taken = make(), {"a": [], "b": []}
    mixed = read(stream, 200)
    for keys, batch in mixed:  # every batch is one source's next batch, in that source's own order
        windows = [w.tolist() for w in windows_of(batch)]
        stored = {name: [c[k].tolist() if k in c else None for k in keys]
                  for name, c in (("a", contents_a), ("b", contents_b))}
        name = "a" if windows == stored["a"] else "b"
        assert windows == stored[name]
        taken[name].append(keys)
    assert taken["a"] == alone["a"][:len(taken["a"])] and taken["b"] == alone["b"][:len(taken["b"])]
    assert 125 <= len(taken["a"]) <= 175  # weight 3/4 of 200 batches, +-4 standard deviations
    assert stream.stats["tokens_per_source"] == {str(path_a): len(taken["a"]) * 2 * SEQ_LEN,
                                                 str(path_b): len(taken["b"]) * 2 * SEQ_LEN}
    first = make()
    head = [keys for keys, _ in read(first, 37)]
    resumed = make()
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert head + [keys for keys, _ in read(resumed, 200 - 37)] == [keys for keys, _ in mixed]
    with pytest.raises(ValueError, match="same sources and weights"):
        MixedStream([(path_a, 1.0), (path_b, 1.0)], **args).load_state_dict(first.state_dict())
    raw = json.loads(path_b.read_text())
    raw["tokenizer"]["sha256"] = "1" * 64
    path_b.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="another tokenizer"):
        make()


def test_weights_whose_sum_overflows_mix_as_their_ratios(tmp_path):
    from pretrain.data.mixing import MixedStream
    paths = [write_dataset(tmp_path / name, {"train": [6]}, seed=i)[0] for i, name in enumerate("ab")]
    stream = MixedStream([(paths[0], 1.5e308), (paths[1], 0.5e308)], sampler=ObjectiveSampler("clm"), batch_size=2)
    assert stream.weights.tolist() == [0.75, 0.25]  # 2e308 overflows to inf: dividing by the sum gave NaNs
    assert {stream.source_of(i) for i in range(50)} == {0, 1}
