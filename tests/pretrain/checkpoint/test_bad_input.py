"""Reading exports and checkpoints that are malformed or damaged, as a user types the commands
(tables): a broken export is one `error:` line naming the file and key, exit 2, before anything
the size of the model is allocated; a damaged newest checkpoint is named in one line and the
newest intact one is used; an explicitly named damaged checkpoint is refused (docs/reliability.md)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

SCORE = 'biglearn score --model {model} --ids "5 6 7"'


def with_config(edit=None, raw: bytes | None = None):
    """The tiny export with its model_config.json edited (`edit(meta)`) or replaced by `raw` bytes."""
    def make(copy):
        path = copy / "model_config.json"
        if raw is not None:
            path.write_bytes(raw)
        else:
            meta = json.loads(path.read_text())
            edit(meta)
            path.write_text(json.dumps(meta))
    return make


def model_key(**values):
    return with_config(lambda meta: meta["model"].update(values))


def with_weights(edit):
    def make(copy):
        state = load_file(str(copy / "model.safetensors"))
        edit(state)
        save_file(state, str(copy / "model.safetensors"))
    return make


def put(name, value):
    def edit(state):
        state[name] = value(state[name])
    return edit


# id, what is malformed (applied to a copy of the tiny export), the command, exit status, what the error line names
CASES = [
    ("config-not-utf8", with_config(raw=b"\xff\xfe\x00{"), SCORE, 2, ["model_config.json"]),
    ("config-a-list", with_config(raw=b"[]"), SCORE, 2, ["model_config.json", '"model" object']),
    ("config-no-model", with_config(lambda m: m.pop("model")), SCORE, 2, ["model_config.json"]),
    ("config-model-a-string", with_config(lambda m: m.update(model="big")), SCORE, 2, ["model_config.json"]),
    ("unknown-key", model_key(d_modle=3), SCORE, 2, ["model_config.json", "d_modle"]),
    ("vocab-1e9", model_key(vocab_size=10 ** 9), SCORE, 2, ["model_config.json", "vocab_size=1000000000", "GiB"]),
    ("ffn-1e9", model_key(ffn_hidden=10 ** 9), SCORE, 2, ["model_config.json", "ffn_hidden=1000000000"]),
    ("layers-1e6", model_key(n_layers=10 ** 6), SCORE, 2, ["model_config.json", "n_layers=1000000"]),
    ("max-seq-len-1e9", model_key(max_seq_len=10 ** 9), SCORE, 2, ["max_seq_len=1000000000"]),
    ("zero-heads", model_key(n_heads=0), SCORE, 2, ["model_config.json", "model.n_heads"]),
    ("indivisible-heads", model_key(n_heads=3), SCORE, 2, ["model_config.json", "model.d_model=32"]),
    ("rope-scaling-text", model_key(rope_scaling="garbage"), SCORE, 2, ["model.rope_scaling"]),
    ("rope-factor-text", model_key(rope_scaling={"rope_type": "linear", "factor": "x"}), SCORE, 2,
     ["model.rope_scaling"]),
    ("rope-base-text", model_key(rope_base="1e4"), SCORE, 2, ["model.rope_base"]),
    ("tie-text", model_key(tie_embeddings="no"), SCORE, 2, ["model.tie_embeddings"]),
    ("shapes-disagree", model_key(ffn_hidden=96), SCORE, 2, ["model.safetensors", "has shape", "config implies"]),
    ("nan-weight", with_weights(put("blocks.1.wo.weight", lambda t: t * float("nan"))), SCORE, 2,
     ["model.safetensors", "blocks.1.wo.weight", "NaN"]),
    ("nan-unused-row", with_weights(put("embed.weight", lambda t: t.index_fill(0, torch.tensor([400]), float("nan")))),
     SCORE, 2, ["embed.weight"]),
    ("int64-weight", with_weights(put("norm.weight", lambda t: t.long())), SCORE, 2, ["norm.weight", "int64"]),
    ("eval-nan-weight", with_weights(put("blocks.0.wq.weight", lambda t: t * float("inf"))),
     "biglearn eval ckpt={model} manifest={manifest} batches=1", 2, ["blocks.0.wq.weight"]),
    ("export-not-empty", lambda copy: None, "biglearn export {model} {model}", 2, ["not empty"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_export_is_refused_in_one_line(case, cli, tmp_path, tiny_export, manifest):
    _, make, command, status, names = case
    copy = tmp_path / "model"
    shutil.copytree(tiny_export, copy)
    make(copy)
    cli(command.format(model=copy, manifest=manifest)).refused(status, *names)


def damage(how: str, tag: str):
    """A damage to the checkpoint `tag` of a run directory, as a function of the run dir."""
    def apply(run):
        tag_dir = run / "checkpoints" / tag
        if how == "meta":
            (tag_dir / "meta.json").write_text('{"progress": ')
        elif how == "truncated-model":
            path = tag_dir / "mp_rank_00_model_states.pt"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif how == "missing-optimizer":
            next(tag_dir.glob("*optim_states.pt")).unlink()
        elif how == "missing-rank":
            (tag_dir / "rank_00000.pt").unlink()
        elif how in ("complete-outside", "complete-a-list"):
            record = json.loads((tag_dir / "COMPLETE").read_text())
            record["files"] = {**record["files"], "../../../../etc/passwd": 1} if how == "complete-outside" \
                else list(record["files"])
            (tag_dir / "COMPLETE").write_text(json.dumps(record))
    return apply


FALLBACKS = [
    ("meta", "meta.json"), ("truncated-model", "mp_rank_00_model_states.pt"),
    ("missing-optimizer", "optim_states.pt is missing"), ("missing-rank", "rank_00000.pt is missing"),
    ("complete-outside", "leads outside"), ("complete-a-list", "COMPLETE record is unreadable"),
]


@pytest.mark.parametrize("how, named", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_a_damaged_newest_checkpoint_is_named_and_the_intact_one_used(how, named, cli, tmp_path, trained_run,
                                                                       nothing_left):
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(trained_run, run)
    damage(how, "step_00000003")(run)
    ran = cli(f"biglearn export {run} {out} --trust-checkpoint").succeeded()
    warning = [line for line in ran.stderr.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "step_00000003" in warning[0] and named in warning[0], ran.stderr
    assert "step_00000002" in warning[0]
    assert json.loads((out / "model_config.json").read_text())["progress"]["step"] == 2
    assert not nothing_left(tmp_path)


def test_a_damaged_checkpoint_named_explicitly_is_refused(cli, tmp_path, trained_run, nothing_left):
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(trained_run, run)
    damage("truncated-model", "step_00000003")(run)
    tag = run / "checkpoints" / "step_00000003"
    cli(f"biglearn export {tag} {out} --trust-checkpoint").refused(2, str(tag), "damaged", "mp_rank_00_model_states.pt")
    for step in (1, 2):
        damage("meta", f"step_{step:08d}")(run)
    cli(f"biglearn export {run} {out} --trust-checkpoint").refused(2, "every complete checkpoint", "step_00000001")
    cli(f'biglearn score --model {run} --trust-checkpoint --ids "5 6"').refused(2, "every complete checkpoint")
    assert not out.exists() and not nothing_left(tmp_path)


def test_a_checkpoint_holding_nan_is_not_exported(cli, tmp_path, trained_run, nothing_left):
    """A NaN in the newest checkpoint's fp32 master weights (ZeRO-1's optimizer file; its size
    recorded again, so it is not "damaged"): `export` and `score` refuse it in one line."""
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(trained_run, run)
    tag = run / "checkpoints" / "step_00000003"
    path = next(tag.glob("*optim_states.pt"))
    state = torch.load(path, weights_only=False)
    state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].data[7] = float("nan")
    torch.save(state, path)
    record = json.loads((tag / "COMPLETE").read_text())
    record["files"][path.name] = path.stat().st_size
    (tag / "COMPLETE").write_text(json.dumps(record))
    cli(f"biglearn export {run} {out} --trust-checkpoint").refused(2, "step_00000003", "NaN")
    cli(f'biglearn score --model {run} --trust-checkpoint --ids "5 6"').refused(2, "step_00000003", "NaN")
    assert not out.exists() and not nothing_left(tmp_path)


@pytest.fixture
def small_fs(tmpfs):
    """A 2 MiB tmpfs (tests/conftest.py)."""
    return tmpfs("2m")


FULL_DISK = [
    ("export", "biglearn export {run} {out} --trust-checkpoint"),
    ("to-hf", "biglearn convert to-hf {export} {out}"),
    ("from-hf-round-trip", "biglearn convert from-hf {hf} {out} --no-tokenizer"),
]


@pytest.mark.parametrize("name, command", FULL_DISK, ids=[c[0] for c in FULL_DISK])
def test_an_output_that_does_not_fit_is_one_line_and_nothing(name, command, cli, small_fs, trained_run, tiny_export,
                                                             tmp_path, nothing_left):
    hf = tmp_path / "hf"
    if name.startswith("from-hf"):  # a Hugging Face directory of the tiny export's model, written where there is room
        cli(f"biglearn convert to-hf {tiny_export} {hf}").succeeded()
    with open(small_fs / "filler", "wb") as f:  # leave 256 KiB: less than any of these outputs
        f.write(b"\0" * (shutil.disk_usage(small_fs).free - (256 << 10)))
    out = small_fs / "out"
    cli(command.format(run=trained_run, export=tiny_export, hf=hf, out=out)).refused(2, "free", str(small_fs))
    assert not out.exists() and not nothing_left(small_fs)


def test_a_checkpoint_rotated_away_while_read_names_the_run_training_there(tmp_path, trained_run, monkeypatch):
    """`export` of a run that is still training: the tag found intact disappears (its rotation)
    before its files are read. The error says so and names the holder of the run's LOCK, instead
    of "holds no DeepSpeed model states"."""
    import os
    import socket

    from pretrain.checkpoint import loading
    from pretrain.checkpoint.sharded import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))

    def rotated_away(tag_dir):
        shutil.rmtree(tag_dir)
        raise FileNotFoundError(tag_dir / "mp_rank_00_model_states.pt")

    monkeypatch.setattr(loading, "consolidated_state_dict", rotated_away)
    with pytest.raises(CheckpointError, match=rf"step_00000003: it was removed while being read; process {os.getpid()}"):
        loading.load_for_inference(run, trust_checkpoint=True)
