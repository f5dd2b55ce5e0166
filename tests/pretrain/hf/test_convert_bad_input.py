"""`biglearn convert` on malformed input, as a user types it (a table): every case exits 2 with one
`error:` line naming the file and the key, writes nothing under the output's name, leaves no
partial directory, and reads no file outside the model directory (docs/reliability.md).

The Hugging Face directories are written here as transformers writes them (config.json +
model.safetensors, or an index and shards), from a tiny model's tensors: no transformers needed."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.hf.convert import hf_state
from pretrain.model import BigLearner, ModelConfig

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def hf_dir(tmp_path, config=None, tensors=None, raw_config: bytes | None = None):
    """A Llama directory: CONFIG updated with `config`, the tiny model's tensors edited by `tensors`."""
    directory = tmp_path / "hf"
    directory.mkdir()
    torch.manual_seed(0)
    state = hf_state(BigLearner(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64,
                                            tie_embeddings=False, max_seq_len=64)))
    if tensors:
        tensors(state)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_bytes(raw_config or json.dumps({**CONFIG, **(config or {})}).encode())
    return directory


def sharded(tmp_path, target: str):
    """A sharded checkpoint whose index sends every tensor to `target` (a valid safetensors file
    there, so a converter that follows it succeeds)."""
    directory = hf_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (directory / "model.safetensors").rename(outside / "x.safetensors")
    with safe_open(str(outside / "x.safetensors"), "pt") as weights:
        weight_map = dict.fromkeys(weights.keys(), target.format(outside=outside))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def scaled(name, value):
    def edit(state):
        state[name] = state[name] * value
    return edit


def retyped(name, dtype):
    def edit(state):
        state[name] = state[name].to(dtype)
    return edit


FROM_HF = "biglearn convert from-hf {hf} {out} --no-tokenizer"
# id, the malformed input (tmp_path -> HF directory), the command, exit status, what the error line names
CASES = [
    ("index-climbs-out", lambda t: sharded(t, "../outside/x.safetensors"), FROM_HF, 2, ["weight_map", "leads outside"]),
    ("index-absolute", lambda t: sharded(t, "{outside}/x.safetensors"), FROM_HF, 2, ["weight_map", "leads outside"]),
    ("config-not-utf8", lambda t: hf_dir(t, raw_config=b'\xff\xfe{"a": 1}'), FROM_HF, 2, ["config.json"]),
    ("config-a-list", lambda t: hf_dir(t, raw_config=b"[1, 2]"), FROM_HF, 2, ["config.json", "JSON object"]),
    ("config-not-json", lambda t: hf_dir(t, raw_config=b"{model_type: llama"), FROM_HF, 2, ["config.json"]),
    ("no-hidden-size", lambda t: hf_dir(t, {"hidden_size": None}), FROM_HF, 2, ["config.json", "hidden_size"]),
    ("hidden-size-text", lambda t: hf_dir(t, {"hidden_size": "32"}), FROM_HF, 2, ["config.json", "hidden_size"]),
    ("sliding-window-text", lambda t: hf_dir(t, {"sliding_window": "4096"}), FROM_HF, 2, ["sliding_window"]),
    ("rope-parameters-text", lambda t: hf_dir(t, {"rope_parameters": "garbage"}), FROM_HF, 2, ["rope_parameters"]),
    ("rope-factor-text", lambda t: hf_dir(t, {"rope_scaling": {"rope_type": "linear", "factor": "x"}}), FROM_HF, 2,
     ["config.json", "rope_scaling"]),
    ("rope-theta-list", lambda t: hf_dir(t, {"rope_theta": [1]}), FROM_HF, 2, ["rope_theta"]),
    ("zero-heads", lambda t: hf_dir(t, {"num_attention_heads": 0}), FROM_HF, 2, ["num_attention_heads"]),
    ("indivisible-heads", lambda t: hf_dir(t, {"num_attention_heads": 3}), FROM_HF, 2, ["num_attention_heads"]),
    ("kv-heads-indivisible", lambda t: hf_dir(t, {"num_key_value_heads": 3}), FROM_HF, 2, ["n_kv_heads"]),
    ("vocab-1e9", lambda t: hf_dir(t, {"vocab_size": 10 ** 9}), FROM_HF, 2, ["config.json", "vocab_size=1000000000",
                                                                            "available"]),
    ("vocab-1e9-float", lambda t: hf_dir(t, {"vocab_size": 1e9}), FROM_HF, 2, ["config.json", "vocab_size"]),
    ("ffn-1e9", lambda t: hf_dir(t, {"intermediate_size": 10 ** 9}), FROM_HF, 2, ["ffn_hidden=1000000000"]),
    ("layers-1e6", lambda t: hf_dir(t, {"num_hidden_layers": 10 ** 6}), FROM_HF, 2, ["n_layers=1000000"]),
    ("max-seq-len-negative", hf_dir, FROM_HF + " --max-seq-len -5", 2, ["--max-seq-len"]),
    ("max-seq-len-1e9", hf_dir, FROM_HF + " --max-seq-len 1000000000", 2, ["max_seq_len=1000000000", "available"]),
    ("int64-weights", lambda t: hf_dir(t, tensors=retyped("model.norm.weight", torch.int64)), FROM_HF, 2,
     ["model.safetensors", "model.norm.weight", "int64"]),
    ("nan-weight", lambda t: hf_dir(t, tensors=scaled("model.layers.1.mlp.up_proj.weight", float("nan"))), FROM_HF, 2,
     ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "NaN"]),
    ("shape-mismatch", lambda t: hf_dir(t, {"intermediate_size": 96}), FROM_HF, 2, ["shape"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_from_hf_refuses_in_one_line_and_writes_nothing(case, cli, tmp_path, nothing_left):
    _, make, command, status, names = case
    values = {"hf": make(tmp_path), "out": tmp_path / "out"}
    cli(command.format(**values)).refused(status, *names)
    assert not values["out"].exists() and not nothing_left(tmp_path)


def exported_with(tmp_path, tiny_export, edit):
    """A copy of `tiny_export` whose weights went through `edit`."""
    import shutil

    from safetensors.torch import load_file
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    state = load_file(str(copy / "model.safetensors"))
    edit(state)
    save_file(state, str(copy / "model.safetensors"))
    return copy


TO_HF = "biglearn convert to-hf {model} {out}"
TO_HF_CASES = [
    ("nan-weight", scaled("blocks.0.wq.weight", float("nan")), ["blocks.0.wq.weight", "NaN"]),
    ("inf-weight", scaled("head.weight", float("inf")), ["head.weight"]),
    ("int32-weight", retyped("norm.weight", torch.int32), ["norm.weight", "int32"]),
]


@pytest.mark.parametrize("case", TO_HF_CASES, ids=[c[0] for c in TO_HF_CASES])
def test_to_hf_refuses_broken_weights(case, cli, tmp_path, tiny_export, nothing_left):
    _, edit, names = case
    values = {"model": exported_with(tmp_path, tiny_export, edit), "out": tmp_path / "out"}
    cli(TO_HF.format(**values)).refused(2, "model.safetensors", *names)
    assert not values["out"].exists() and not nothing_left(tmp_path)
