"""pretrain.convert: Llama-family checkpoints in, LlamaForCausalLM directories out.

Every reference is transformers' own output on a random-init model written by save_pretrained
into a temp dir (no download)."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pretrain.collate import collate  # noqa: E402
from pretrain.convert import from_hf, load_hf, main  # noqa: E402
from pretrain.export import load_exported  # noqa: E402
from pretrain.objectives import TASKS, SplitSpec  # noqa: E402

VOCAB = 96


def write_llama(directory, *, tied=False, vocab=VOCAB, rope_scaling=None, shard=False, seed=0, **overrides):
    """A random LlamaForCausalLM (GQA: 4 query heads, 2 kv heads) saved with save_pretrained."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, rope_scaling=rope_scaling,
        max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **overrides)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a norm mapped to the wrong place shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "10GB")
    return model


def causal_batch(tokens: np.ndarray):
    """S empty, every token a target in the identity order, one group each: a causal layout."""
    n = tokens.shape[1]
    spec = SplitSpec(order=np.arange(n, dtype=np.int32), n_source=0, n_target=n,
                     target_groups=np.arange(1, n + 1, dtype=np.int32), task_id=TASKS.index("clm"))
    return collate(list(tokens), [spec] * len(tokens), pad_id=0).to_torch()


def content_states(model, batch):
    """Final content-stream states [B, N, d]: every block run as a non-last block, then the norm."""
    from pretrain.model import rope_tables

    c = model.config
    h = model.embed(batch.tokens)
    g = model.query_start.expand(h.shape[0], batch.target_groups.shape[1], -1)
    rope = rope_tables(batch.positions, c, h.dtype)
    rope_q = rope_tables(batch.positions.gather(1, batch.target_index), c, h.dtype)
    for block in model.blocks:
        h, g = block(h, g, batch.groups, batch.target_groups, rope, rope_q, last=False)
    return model.norm(h)


@pytest.mark.parametrize("tied, rope_scaling, shard", [
    (False, None, False),
    (True, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, True),
    (False, {"rope_type": "linear", "factor": 2.0}, False),
])
def test_two_stream_content_states_equal_transformers(tmp_path, tied, rope_scaling, shard):
    reference = write_llama(tmp_path / "hf", tied=tied, rope_scaling=rope_scaling, shard=shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _ = load_hf(tmp_path / "hf", streams=2)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(3, 40))
    with torch.no_grad():
        ours = content_states(model, causal_batch(tokens))
        theirs = reference.model(torch.from_numpy(tokens)).last_hidden_state
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert model.config.tie_embeddings == tied


@pytest.mark.parametrize("tied", [False, True])
def test_single_stream_identity_order_logits_equal_transformers(tmp_path, tied):
    """S empty, identity order, the BOS START row: our logits for x_t are transformers' logits
    after [BOS, x_0 .. x_{t-1}]."""
    reference = write_llama(tmp_path / "hf", tied=tied, seed=3)
    model, _ = load_hf(tmp_path / "hf", streams=1)
    assert model.config.bos_id == 1 and model.config.streams == 1
    tokens = np.random.default_rng(2).integers(3, VOCAB, size=(2, 30))
    with torch.no_grad():
        ours = model(causal_batch(tokens))
        bos = torch.full((2, 1), 1, dtype=torch.long)
        theirs = reference(torch.cat([bos, torch.from_numpy(tokens)], 1)).logits[:, :-1]
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def our_tokenizer(manifest):
    from data_pipeline.tokenizer import Tokenizer
    return Tokenizer.load(manifest.parent / "tokenizer")


def write_hf_tokenizer_only(tokenizer, directory):
    """An HF-style tokenizer (tokenizer.json + tokenizer_config.json) as a Llama directory has it."""
    from pretrain.convert import write_hf_tokenizer
    write_hf_tokenizer(tokenizer, directory)
    for name in ("biglearn_tokenizer.json", "tokenizer.model"):
        (directory / name).unlink()


def test_import_then_export_round_trips_weights_and_tokenizer(tmp_path, our_tokenizer):
    reference = write_llama(tmp_path / "hf", vocab=our_tokenizer.vocab_size, shard=True)
    write_hf_tokenizer_only(our_tokenizer, tmp_path / "hf")
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    model, meta = load_exported(tmp_path / "ours")
    exported = {p.name for p in (tmp_path / "ours").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= exported
    for path in (tmp_path / "ours").glob("*.json"):
        assert str(tmp_path) not in path.read_text()  # no absolute paths
    assert meta["tokenizer_sha256"] == our_tokenizer.__class__.load(tmp_path / "hf").sha256

    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    original = reference.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    text = "Return the  value of the attribute.\n  Ünïcode ☃"
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == our_tokenizer.encode(text)
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == our_tokenizer.eos_id


def _edit_config(directory, **fields):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def _word_tokenizer(directory, size):
    from tokenizers import Tokenizer, models
    vocab = {f"w{i}": i for i in range(size)}
    vocab["</s>"] = vocab.pop("w2")
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _edit_config(d, model_type="qwen2"), "config.json: model_type='qwen2' is not supported"),
    (lambda d: _edit_config(d, model_type="mistral", sliding_window=16), "config.json: sliding_window=16"),
    (lambda d: _edit_config(d, attention_bias=True), "config.json: attention_bias=True"),
    (lambda d: _edit_config(d, num_local_experts=8), "config.json: num_local_experts=8"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 10.0, "factor": 2.0}),
     "config.json: rope_parameters.rope_type='yarn'"),
    (lambda d: sorted(d.glob("model-*.safetensors"))[1].unlink(), "model.safetensors.index.json: shard model-00002-of"),
    (lambda d: _edit_config(d, vocab_size=VOCAB - 1), "embed_tokens.weight has shape"),
    (lambda d: _word_tokenizer(d, VOCAB + 4), "tokenizer.json: vocab_size 100 exceeds vocab_size=96"),
])
def test_bad_checkpoints_fail_in_one_line_and_write_nothing(tmp_path, capsys, damage, message):
    write_llama(tmp_path / "hf", shard=True)
    _word_tokenizer(tmp_path / "hf", VOCAB)
    damage(tmp_path / "hf")
    capsys.readouterr()
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
