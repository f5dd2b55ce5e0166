"""pretrain.hf.convert: Llama-family checkpoints in, LlamaForCausalLM directories out.

Every reference is transformers' own output on a random-init model written by save_pretrained
into a temp dir (no download)."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pretrain.layout import collate  # noqa: E402
from pretrain.hf.convert import load_hf, main  # noqa: E402
from pretrain.checkpoint.export import load_exported  # noqa: E402
from pretrain.objectives import TASKS, SplitSpec  # noqa: E402

VOCAB = 96


def write_llama(directory, *, tied=False, vocab=VOCAB, rope_scaling=None, shard=False, seed=0, mistral=False,
                **overrides):
    """A random LlamaForCausalLM (GQA: 4 query heads, 2 kv heads) saved with save_pretrained
    (MistralForCausalLM without a sliding window when `mistral`)."""
    torch.manual_seed(seed)
    if mistral:
        overrides["sliding_window"] = None
    config = (transformers.MistralConfig if mistral else transformers.LlamaConfig)(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, rope_scaling=rope_scaling,
        max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **overrides)
    model = (transformers.MistralForCausalLM if mistral else transformers.LlamaForCausalLM)(config).eval()
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
    from pretrain.model.rope import RotaryRows, rope_inv_freq
    from pretrain.model.rows import BatchRows

    c = model.config
    h = model.embed(batch.tokens)
    x = torch.cat([h, model.query_start.expand(h.shape[0], batch.target_groups.shape[1], -1)], dim=1)
    positions = torch.cat([batch.positions, batch.positions.gather(1, batch.target_index)], dim=1)
    rows = BatchRows(batch.groups, batch.target_groups,
                     RotaryRows(positions, rope_inv_freq(c.head_dim, c.rope_base, c.rope_scaling), h.dtype))
    for i, block in enumerate(model.blocks):
        x = block(x, rows, i, content_out=True)
    return model.norm(x[:, :h.shape[1]])


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


@pytest.mark.parametrize("tied, mistral", [(False, False), (True, False), (False, True)])
def test_single_stream_identity_order_logits_equal_transformers(tmp_path, tied, mistral):
    """S empty, identity order, the BOS START row: our logits for x_t are transformers' logits
    after [BOS, x_0 .. x_{t-1}]."""
    reference = write_llama(tmp_path / "hf", tied=tied, seed=3, mistral=mistral)
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
    from pretrain.hf.convert import write_hf_tokenizer
    write_hf_tokenizer(tokenizer, directory)
    for name in ("biglearn_tokenizer.json", "tokenizer.model"):
        (directory / name).unlink()


def test_our_tokenizer_converted_to_tokenizer_json_is_the_same_tokenizer(tmp_path, our_tokenizer):
    """Identical pieces, ids and encodings in Hugging Face's format: the same sha256 (another file
    hash), so a model trained with ours accepts it."""
    from pretrain.checkpoint.export import export_model
    from pretrain.checkpoint.loading import load_model
    from pretrain.model import BigLearner, ModelConfig

    write_hf_tokenizer_only(our_tokenizer, tmp_path / "hf")
    converted = our_tokenizer.__class__.load(tmp_path / "hf")
    assert converted.kind == "hf" and converted.file_sha256 != our_tokenizer.file_sha256
    assert converted.sha256 == our_tokenizer.sha256
    model = BigLearner(ModelConfig(vocab_size=our_tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2))
    export_model(model, tmp_path / "model", tokenizer=our_tokenizer)
    load_model(tmp_path / "model", tokenizer=converted)  # no "token ids would not match"


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


def test_model_init_refuses_other_tokens_and_a_non_export(tmp_path):
    from pretrain.checkpoint.export import init_config
    from pretrain.model import ModelConfig

    write_llama(tmp_path / "hf")
    _word_tokenizer(tmp_path / "hf", VOCAB)
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "init"), "--streams", "2"]) == 0
    config = init_config(ModelConfig(init=str(tmp_path / "init"), streams=1, dropout=0.1), VOCAB, None)
    assert (config.streams, config.dropout, config.d_model, config.vocab_size) == (1, 0.1, 64, VOCAB)
    with pytest.raises(ValueError, match="model.init=.*tokenizer sha256 .* but the data's tokenizer has 0000"):
        init_config(ModelConfig(init=str(tmp_path / "init")), VOCAB, "0000")
    with pytest.raises(ValueError, match="vocab_size=96 is smaller than the data's tokenizer"):
        init_config(ModelConfig(init=str(tmp_path / "init")), VOCAB + 1, None)
    with pytest.raises(ValueError, match="model.init=.*hf: not an exported model"):
        init_config(ModelConfig(init=str(tmp_path / "hf")), VOCAB, None)


def greedy_ours(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Identity-order greedy decoding, one full forward per token (the definition, no cache): the
    next token is a target after the sequence so far (its value is not read)."""
    tokens = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(causal_batch(np.array([tokens + [0]])))
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == eos:
            break
    return tokens[len(prompt):]


def check_hf_export_matches(model, hf_dir, tokenizer, rng):
    """transformers' logits on [BOS] + tokens equal our identity-order logits, greedy continuations
    agree, and AutoTokenizer encodes and decodes as our tokenizer does."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = rng.integers(4, tokenizer.vocab_size, size=(2, 24))
    with torch.no_grad():
        ours = model(causal_batch(tokens))
        bos = torch.full((2, 1), tokenizer.bos_id, dtype=torch.long)
        theirs = loaded(torch.cat([bos, torch.from_numpy(tokens)], 1)).logits[:, :-1]
    assert (ours - theirs).abs().max().item() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "Return the value of the  attribute.\n\tÜnïcode ☃ too"
    ids = hf_tokenizer(text).input_ids
    assert ids == [tokenizer.bos_id] + tokenizer.encode(text)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids[1:])
    prompt = tokenizer.encode("def read(path):")
    generated = loaded.generate(torch.tensor([[tokenizer.bos_id] + prompt]), max_new_tokens=20, do_sample=False)
    assert generated[0, 1 + len(prompt):].tolist() == greedy_ours(model, prompt, 20, tokenizer.eos_id)


def test_single_stream_export_folds_the_offset_term(tmp_path, our_tokenizer):
    from pretrain.checkpoint.export import export_model
    from pretrain.model import BigLearner, ModelConfig

    torch.manual_seed(5)
    model = BigLearner(ModelConfig(vocab_size=our_tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                   n_kv_heads=2, max_seq_len=64, streams=1, bos_id=our_tokenizer.bos_id,
                                   tie_embeddings=True, init_std=0.2)).eval()
    with torch.no_grad():
        model.offset_embed.weight.normal_(0, 0.5)  # as after training: the fold must carry it
    export_model(model, tmp_path / "ours", {}, our_tokenizer)
    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the folded input embedding differs from the head
    check_hf_export_matches(model, tmp_path / "hf", our_tokenizer, np.random.default_rng(0))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "single-stream" in card and "Not exact" not in card


def test_infer_reads_the_tokenizer_bundled_in_an_export(tmp_path, our_tokenizer, capsys):
    """`pretrain.infer score` without --tokenizer uses the export's own; its log p of a text
    (S empty, identity order) equals transformers' causal log-likelihood after BOS."""
    from pretrain.checkpoint.export import export_model
    from pretrain.infer.cli import main as infer_main
    from pretrain.model import BigLearner, ModelConfig

    torch.manual_seed(6)
    model = BigLearner(ModelConfig(vocab_size=our_tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2,
                                   max_seq_len=64, streams=1, bos_id=our_tokenizer.bos_id)).eval()
    export_model(model, tmp_path / "ours", {}, our_tokenizer)
    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    text = "Return the value of the attribute."
    assert infer_main(["score", "--model", str(tmp_path / "ours"), "--text", text]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["log_prob"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[our_tokenizer.bos_id] + our_tokenizer.encode(text)])
    with torch.no_grad():
        log_p = loaded(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
    assert abs(ours - log_p) <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("streams", [1, 2])
def test_import_big_learn_20_steps_export_loads_in_transformers(tmp_path, manifest, our_tokenizer, streams):
    """from-hf, then `pretrain.train objective=biglearn model.init=...` for 20 steps, then to-hf."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_llama(tmp_path / "hf", vocab=our_tokenizer.vocab_size, seed=4)
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "init"), "--streams", "1", "--max-seq-len", "64",
                 "--tokenizer", str(manifest.parent / "tokenizer")]) == 0
    repo = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "deepspeed=cpu", "objective=biglearn", f"model.init={tmp_path / 'init'}",
         f"model.streams={streams}", "data.kind=manifest", f"data.manifest={manifest}", f"run_dir={tmp_path / 'run'}",
         "data.batch_size=4", "trainer.max_steps=20", "trainer.warmup_steps=2", "trainer.progress=false",
         "trainer.loggers=[jsonl]", "eval.batches=1", "eval.plot=false", "trainer.eval_every=0"],
        cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trained, meta = load_exported(tmp_path / "run" / "export")
    assert meta["progress"]["step"] == 20 and trained.config.streams == streams
    assert main(["to-hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    card = (tmp_path / "back" / "README.md").read_text()
    assert "biglearn 1" in card and "tokens seen" in card and "left_to_right" in card
    if streams == 1:
        check_hf_export_matches(trained, tmp_path / "back", our_tokenizer, np.random.default_rng(1))
    else:  # the two-stream export loads; its card says why its logits are not the model's predictions
        assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")).__name__ == "LlamaForCausalLM"
        assert "Not exact: two-stream model" in card
