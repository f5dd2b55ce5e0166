"""`biglearn train` and `biglearn finetune` on malformed input, as a user types them (a table):
every case stops with one `error:` line naming the file, key or run directory, exit 2, before a
step is trained, and leaves the run directory as it was (docs/reliability.md). Most stop before
the process group starts, so a case costs a fork, not a DeepSpeed start."""
import json
import shutil
import socket
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file


# A maker builds the malformed input in tmp_path; `fixture(name)` gives it the shared fixtures it needs.

def dataset_with(edit):
    """A copy of the tiny dataset whose manifest.json went through `edit(manifest)`."""
    def make(tmp_path, fixture):
        copy = tmp_path / "data"
        shutil.copytree(fixture("manifest").parent, copy)
        meta = json.loads((copy / "manifest.json").read_text())
        edit(meta)
        (copy / "manifest.json").write_text(json.dumps(meta))
        return {"manifest": copy / "manifest.json"}
    return make


def run_with(edit):
    """A copy of the trained run (3 checkpoints) edited by `edit(run_dir)`."""
    def make(tmp_path, fixture):
        shutil.copytree(fixture("trained_run"), tmp_path / "run")
        edit(tmp_path / "run")
        return {}
    return make


def corrupt_meta(*steps):
    def edit(run):
        for step in steps:
            (run / "checkpoints" / f"step_{step:08d}" / "meta.json").write_text("{")
    return edit


def export_with(edit):
    """A copy of the tiny export whose weights went through `edit(state)`."""
    def make(tmp_path, fixture):
        copy = tmp_path / "init"
        shutil.copytree(fixture("tiny_export"), copy)
        state = load_file(str(copy / "model.safetensors"))
        edit(state)
        save_file(state, str(copy / "model.safetensors"))
        return {"init": copy}
    return make


def _infinite(state):
    state["blocks.0.wo.weight"][0, 0] = float("inf")


def _widened(state):
    state["norm.weight"] = torch.ones(48)


TRAIN = "biglearn train {tiny} data.manifest={manifest} run_dir={run} trainer.max_steps=2"
SOURCES = ("'data.sources=[{{manifest: {manifest}, weight: 1}}, {{manifest: {tmp}/missing/manifest.json, "
           "weight: 1}}]'")
# id, the malformed input (a maker taking the fixtures it names), the overrides, what the error line names
CASES = [
    ("fp16-on-cpu", None, "deepspeed.precision=fp16", ["deepspeed.precision=fp16"]),
    ("layers-1e6", None, "model.n_layers=1000000", ["n_layers=1000000", "available"]),
    ("ffn-1e9", None, "model.ffn_hidden=1000000000", ["ffn_hidden=1000000000", "available"]),
    ("max-seq-len-negative", None, "model.max_seq_len=-5", ["model.max_seq_len"]),
    ("missing-source", None, SOURCES, ["data.sources[1].manifest", "missing"]),
    ("tokenizer-path-climbs-out", dataset_with(lambda m: m["tokenizer"].update(path="../../../../etc/passwd")), "",
     ["tokenizer.path", "leads outside"]),
    ("float-tokens", dataset_with(lambda m: m.update(token_dtype="<f8")), "", ["token_dtype", "<f8"]),
    ("seq-len-1e9", dataset_with(lambda m: m.update(seq_len=1e9)), "", ["seq_len"]),
    ("negative-count", dataset_with(lambda m: m["shards"][0].update(samples=-5)), "", ["shards[0].samples"]),
    ("resume-other-width", run_with(lambda run: None), "model.d_model=64", ["model.d_model=64", "step_00000003"]),
    ("resume-other-depth", run_with(lambda run: None), "model.n_layers=3", ["model.n_layers=3"]),
    ("resume-all-damaged", run_with(corrupt_meta(1, 2, 3)), "", ["every complete checkpoint", "meta.json"]),
    ("resume-damaged-tag", run_with(corrupt_meta(3)), "resume={run}/checkpoints/step_00000003",
     ["step_00000003", "damaged", "meta.json"]),
    ("init-inf", export_with(_infinite), "model.init={init}", ["model.safetensors", "blocks.0.wo.weight", "inf"]),
    ("init-shapes", export_with(_widened), "model.init={init}", ["model.safetensors", "norm.weight", "shape"]),
]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] != "fp16-on-cpu"]
else:
    CASES.append(("cuda-without-gpu", None, "deepspeed.accelerator=cuda", ["deepspeed.accelerator=cuda"]))


def contents(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*") if p.is_file()) \
        if directory.is_dir() else None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_train_refuses_in_one_line_and_changes_nothing(case, cli, tmp_path, manifest, tiny_train, request,
                                                       nothing_left):
    _, make, overrides, names = case
    values = {"tiny": tiny_train, "manifest": manifest, "run": tmp_path / "run", "tmp": tmp_path,
              **(make(tmp_path, request.getfixturevalue) if make else {})}
    before = contents(values["run"])
    cli(f"{TRAIN} {overrides}".format(**values)).refused(2, *[n.format(**values) for n in names])
    after = contents(values["run"])
    if case[0] == "init-inf":  # NaN/inf shows when the weights are read, after the group started: train.log only
        after = None if after and [name for name, _ in after] == ["train.log"] else after
    assert after == before  # nothing written, nothing rotated away
    assert not nothing_left(tmp_path)


@pytest.fixture
def live_holder(tmp_path):
    """A run directory whose LOCK names a live process on this host (a sleeping child)."""
    sleeper = subprocess.Popen(["sleep", "600"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "since": "now"}))
    yield run, sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_a_second_writer_is_refused_naming_the_holder(cli, live_holder, manifest, tiny_train, nothing_left):
    run, pid = live_holder
    before = contents(run)
    cli(TRAIN.format(tiny=tiny_train, manifest=manifest, run=run)).refused(2, str(run), f"process {pid}",
                                                                            socket.gethostname())
    assert contents(run) == before and not nothing_left(run)
    # Another host's lock: alive while it is fresh (its holder touches it at every log step and save).
    (run / "LOCK").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": "now"}))
    cli(TRAIN.format(tiny=tiny_train, manifest=manifest, run=run)).refused(2, "node-elsewhere")


def test_a_read_only_run_dir_is_refused(cli, tmp_path, manifest, tiny_train):
    run = tmp_path / "ro"
    run.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(run)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount (needs root): {mounted.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], check=True)
        cli(TRAIN.format(tiny=tiny_train, manifest=manifest, run=run / "x")).refused(2, f"run_dir={run / 'x'}")
    finally:
        subprocess.run(["umount", str(run)], check=True)


FINETUNE = ("biglearn finetune data.train={data}/train.tsv data.dev={data}/dev.tsv tokenizer={tokenizer} "
            "init={init} data.max_len=16 data.batch_size=1 trainer.progress=false out={tmp}/out")
FINETUNE_CASES = [("init-inf", _infinite, ["blocks.0.wo.weight", "inf"]), ("init-shapes", _widened, ["shape"])]


@pytest.mark.parametrize("case", FINETUNE_CASES, ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_refuses_a_broken_init(case, cli, tmp_path, manifest, request):
    _, edit, names = case
    data = tmp_path / "text"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text("text\tlabel\na good day\tpos\na bad day\tneg\n")
    values = {"data": data, "tokenizer": manifest.parent / "tokenizer", "tmp": tmp_path,
              **export_with(edit)(tmp_path, request.getfixturevalue)}
    cli(FINETUNE.format(**values)).refused(2, "model.safetensors", *names)
    assert not list(tmp_path.glob("out/**/*.safetensors"))
