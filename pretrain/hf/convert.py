"""Hugging Face in and out (docs/hf.md).

    biglearn convert from-hf HF_DIR OUT_DIR      Llama-family checkpoint -> our export
    biglearn convert to-hf RUN_OR_EXPORT OUT_DIR  our model -> LlamaForCausalLM directory

BigLearner's block is Llama's (pre-norm RMSNorm, SwiGLU, RoPE with the half-split rotation of
transformers' `rotate_half`, grouped-query attention), so the weights map one to one; only the
fused projections differ (`wkv` = [k; v], `w_gate_up` = [gate; up]). With an empty source and
the identity order the content stream is a causal LM, which is what makes both directions exact.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from data_pipeline.errors import HelpFormatter, UserError, add_debug_flag, cli_main
from data_pipeline.files import contained, staged_directory

from ..checkpoint.card import model_card
from ..checkpoint.export import copy_tokenizer, export_bytes, export_model, new_parameters, portable, refuse_non_finite
from ..model import BigLearner, ModelConfig
from ..model.weights import check_weights
from ..model.rope import ROPE_SCALING_KEYS

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
MODEL_TYPES = ("llama", "mistral")  # same block; Mistral only without an active sliding window
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints store; recomputed from the config


# --------------------------------------------------------------------------- from Hugging Face

def _hf_rope(cfg: dict, path: Path) -> tuple[float, dict]:
    """(rope base, scaling) from a transformers 5 `rope_parameters` or a 4.x `rope_theta` + `rope_scaling`."""
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(field) or {}
    if not isinstance(params, dict):
        raise UserError(f"{path}: {field}={params!r} is not supported (expected an object with rope_type, ...)")
    params = dict(params)
    base = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise UserError(f"{path}: rope_theta={base!r} is not supported (expected a number)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(base), {}
    if kind not in ROPE_SCALING_KEYS:
        raise UserError(f"{path}: {field}.rope_type={kind!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_SCALING_KEYS)})")
    return float(base), {"rope_type": kind, **{k: params[k] for k in ROPE_SCALING_KEYS[kind] if k in params}}


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`; a UserError naming the file when it is unreadable, not UTF-8, not
    JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


IMPORT_MAX_SEQ_LEN = 8192  # default cap of max_seq_len: the single-stream offset table has 2 * max_seq_len + 1 rows


def config_from_hf(hf_dir, streams: int = 1, max_seq_len: int | None = None, bos_id: int | None = None) -> ModelConfig:
    """ModelConfig of a Llama-family config.json; UserError naming the file and the field it cannot map.
    max_seq_len defaults to max_position_embeddings capped at IMPORT_MAX_SEQ_LEN; bos_id (the
    START row's token) to config.json's bos_token_id."""
    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise UserError(f"{path} not found: {hf_dir} is not a Hugging Face model directory")
    cfg = read_json_object(path)

    def refuse(field, why):
        raise UserError(f"{path}: {field}={cfg.get(field)!r} is not supported ({why})")

    for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if field not in cfg:
            raise UserError(f"{path}: field {field!r} missing")
        if isinstance(cfg[field], bool) or not isinstance(cfg[field], int) or cfg[field] < 1:
            refuse(field, "must be a positive integer")
    for field in ("num_key_value_heads", "max_position_embeddings", "sliding_window", "head_dim"):
        value = cfg.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            refuse(field, "must be a positive integer")

    if cfg.get("model_type") not in MODEL_TYPES:
        refuse("model_type", f"supported: {', '.join(MODEL_TYPES)}, the Llama block")
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        if cfg.get(field):
            refuse(field, "mixture-of-experts layers")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            refuse(field, "our projections have no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU")
    window = cfg.get("sliding_window")
    if window is not None and window < (cfg.get("max_position_embeddings") or 0):
        refuse("sliding_window", "attention is global; a window shorter than max_position_embeddings changes it")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        refuse("num_attention_heads", f"must divide hidden_size={cfg['hidden_size']}")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, head_dim):
        refuse("head_dim", f"must be hidden_size / num_attention_heads = {head_dim}")
    base, scaling = _hf_rope(cfg, path)
    if bos_id is None:
        bos_id = cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else 1
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max-seq-len must be a positive integer; got {max_seq_len}")
    try:
        config = ModelConfig(
            vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            ffn_hidden=cfg["intermediate_size"], rope_base=base, rope_scaling=scaling,
            max_seq_len=max_seq_len or min(cfg.get("max_position_embeddings", 2048), IMPORT_MAX_SEQ_LEN),
            norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=cfg.get("tie_word_embeddings", False),
            streams=streams, bos_id=bos_id)
    except UserError as err:  # names the model key; say which file it came from
        raise UserError(f"{path}: {err}") from None
    config.require_memory(str(path))
    return config


def read_hf_tensors(hf_dir) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of model.safetensors or of a sharded checkpoint (index + shards), and what they were read from."""
    hf_dir = Path(hf_dir)
    index = hf_dir / HF_INDEX
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: field weight_map missing")
        files = sorted(set(map(str, weight_map.values())))
        for name in files:
            if not contained(hf_dir, name, f"{index}: weight_map shard").is_file():
                raise UserError(f"{index}: shard {name} (weight_map) is missing from {hf_dir}")
        source = str(index.name)
    elif (hf_dir / HF_WEIGHTS).is_file():
        files, source = [HF_WEIGHTS], HF_WEIGHTS
    else:
        raise UserError(f"{hf_dir}: no {HF_WEIGHTS} or {HF_INDEX} (only safetensors checkpoints are read; "
                         "re-save a .bin checkpoint with save_pretrained(safe_serialization=True))")
    tensors = {}
    for name in files:
        try:
            shard = load_file(str(hf_dir / name))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{hf_dir / name}: unreadable safetensors file ({error})") from None
        check_weights(shard, {}, hf_dir / name)  # floating point and finite, before any conversion to fp32
        tensors.update(shard)
    return tensors, source


def state_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict from Llama tensor names (`model.` prefix optional)."""
    hf = {k.removeprefix("model."): v.float() for k, v in tensors.items() if not k.endswith(_IGNORED)}
    biases = sorted(k for k in hf if k.endswith(".bias"))
    if biases:
        raise UserError(f"{source}: tensor {biases[0]} is a bias; our projections have none")
    used = set()

    def take(name):
        if name not in hf:
            raise UserError(f"{source}: tensor {name} missing")
        used.add(name)
        return hf[name]

    state = {"embed.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    for i in range(config.n_layers):
        p, b = f"layers.{i}.", f"blocks.{i}."
        state[b + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        state[b + "wq.weight"] = take(p + "self_attn.q_proj.weight")
        state[b + "wkv.weight"] = torch.cat([take(p + "self_attn.k_proj.weight"), take(p + "self_attn.v_proj.weight")])
        state[b + "wo.weight"] = take(p + "self_attn.o_proj.weight")
        state[b + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        state[b + "w_gate_up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        state[b + "w_down.weight"] = take(p + "mlp.down_proj.weight")
    if "lm_head.weight" in hf:
        used.add("lm_head.weight")
        if not config.tie_embeddings:
            state["head.weight"] = hf["lm_head.weight"]
    elif not config.tie_embeddings:
        raise UserError(f"{source}: tensor lm_head.weight missing (config.json: tie_word_embeddings is false)")
    extra = sorted(set(hf) - used)
    if extra:
        raise UserError(f"{source}: tensor {extra[0]} has no counterpart in the Llama block "
                         f"({len(extra)} unmapped tensors)")
    return state


def load_hf(hf_dir, streams: int = 1, max_seq_len: int | None = None, bos_id: int | None = None
            ) -> tuple[BigLearner, str]:
    """A BigLearner holding the weights of a Llama-family directory, and the tensors' source file."""
    config = config_from_hf(hf_dir, streams, max_seq_len, bos_id)
    tensors, source = read_hf_tensors(hf_dir)
    state = state_from_hf(tensors, config, source)
    embed = state["embed.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.d_model):
        raise UserError(f"{Path(hf_dir) / source}: embed_tokens.weight has shape {tuple(embed.shape)} but "
                         f"config.json says vocab_size={config.vocab_size}, hidden_size={config.d_model}")
    model = BigLearner(config)
    check_weights(state, model.state_dict(), Path(hf_dir) / source)
    model.load_state_dict({**state, **new_parameters(model, state)}, strict=False)
    return model.eval(), source


def load_tokenizer(path):
    """data_pipeline's Tokenizer.load, its ValueError (which names the file) as a UserError."""
    from data_pipeline.tokenizer import Tokenizer

    try:
        return Tokenizer.load(path)
    except ValueError as error:
        raise UserError(str(error)) from None


def from_hf(hf_dir, out_dir, streams: int = 1, max_seq_len: int | None = None, tokenizer_path=None,
            require_tokenizer: bool = True) -> Path:
    """Import a Llama-family directory into our export format at out_dir (written completely or not at all)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_from_hf(hf_dir, streams, max_seq_len)  # the config's errors before the tokenizer's
    tokenizer = load_tokenizer(tokenizer_path or hf_dir) if tokenizer_path is not None or require_tokenizer else None
    model, source = load_hf(hf_dir, streams, max_seq_len, tokenizer.bos_id if tokenizer else None)
    if tokenizer is not None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"{tokenizer.files[tokenizer.defining_file]}: vocab_size {tokenizer.vocab_size} exceeds "
                             f"vocab_size={model.config.vocab_size} of {hf_dir / HF_CONFIG}")
    cfg = read_json_object(hf_dir / HF_CONFIG)
    meta = {"name": hf_dir.name, "progress": {"step": 0, "tokens_seen": 0},
            "source": {"format": "transformers", "model_type": cfg["model_type"], "directory": hf_dir.name,
                       "architectures": ", ".join(map(str, cfg.get("architectures") or [])), "weights": source}}
    return export_model(model, out_dir, meta, tokenizer)


# --------------------------------------------------------------------------- to Hugging Face

def hf_state(model: BigLearner) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM tensors of our model. A single-stream model's offset term at offset +1
    (what every predicting row gets at the identity order) is folded into the input embedding;
    the output head then keeps the unfolded embedding, so such an export is untied."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    c = model.config
    kv = c.n_kv_heads * c.head_dim
    embed = sd["embed.weight"]
    state = {"lm_head.weight": sd.get("head.weight", embed).clone()}
    offset = folded_offset(model)
    state["model.embed_tokens.weight"] = embed + offset if offset is not None else embed.clone()
    state["model.norm.weight"] = sd["norm.weight"]
    for i in range(c.n_layers):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        k, v = sd[b + "wkv.weight"].split(kv)
        gate, up = sd[b + "w_gate_up.weight"].split(c.ffn_hidden)
        state.update({p + "input_layernorm.weight": sd[b + "attn_norm.weight"],
                      p + "self_attn.q_proj.weight": sd[b + "wq.weight"], p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": sd[b + "wo.weight"],
                      p + "post_attention_layernorm.weight": sd[b + "mlp_norm.weight"],
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": sd[b + "w_down.weight"]})
    return {k: v.contiguous() for k, v in state.items()}


def folded_offset(model: BigLearner) -> torch.Tensor | None:
    """The single-stream offset term at offset +1, or None for a two-stream model."""
    if model.config.streams != 1:
        return None
    return model.offset_embed.weight[model.config.max_seq_len + 1].detach().float().cpu()  # index = offset + bound


def _offset_is_nonzero(model: BigLearner) -> bool:
    """Whether folding changes the input embedding (then the head, which must not change, is untied)."""
    offset = folded_offset(model)
    return offset is not None and bool(offset.any())


def hf_config(model: BigLearner, tokenizer):
    from transformers import LlamaConfig

    c = model.config
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        tie_word_embeddings=c.tie_embeddings and not _offset_is_nonzero(model),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        architectures=["LlamaForCausalLM"])


def _spm_tokenizer_object(tokenizer):
    """A `tokenizers` object that encodes like the sentencepiece model (normalizer spec, dummy
    prefix, byte fallback), via transformers' own converter, with Llama's BOS template."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(tokenizer.files["tokenizer.model"]).read_bytes())
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # legacy=True: sentencepiece puts the dummy prefix in front of every chunk between special tokens.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise UserError(f"{tokenizer.files['tokenizer.model']}: sentencepiece model type "
                         f"{proto.trainer_spec.model_type} cannot be converted (unigram and BPE can)")
    bos = proto.pieces[tokenizer.bos_id].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return backend


def write_hf_tokenizer(tokenizer, out_dir) -> None:
    """The tokenizer in a form AutoTokenizer loads without custom code. We build a plain
    PreTrainedTokenizerFast rather than LlamaTokenizerFast: the latter imposes Llama's own
    normalizer, which differs from a sentencepiece model trained with other settings. Our own
    files are copied alongside, so biglearn tools keep reading the directory as ours."""
    from transformers import PreTrainedTokenizerFast

    pieces = {}
    if tokenizer.kind == "hf":
        fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.files["tokenizer.json"]))
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=_spm_tokenizer_object(tokenizer))
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_id")
        if token_id is not None and token_id >= 0:
            pieces[f"{role}_token"] = fast.convert_ids_to_tokens(token_id)
    fast.add_special_tokens(pieces)
    fast.model_max_length = 10 ** 30  # set per use; RoPE models have no hard limit
    fast.save_pretrained(str(out_dir))
    if tokenizer.kind != "hf":
        copy_tokenizer(tokenizer, out_dir)


def find_tokenizer(path, meta: dict, vocab_size: int, tokenizer_path=None):
    """The tokenizer of a model: given explicitly, in the export directory, or the dataset's."""
    from data_pipeline.tokenizer import Tokenizer

    from ..checkpoint.loading import run_tokenizer

    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = None
        for directory in (path, path / "export"):  # an export, or a run dir holding one
            if tokenizer is None and (directory / "model_config.json").is_file():
                try:
                    tokenizer = Tokenizer.load(directory)
                except ValueError:
                    continue
        tokenizer = tokenizer or run_tokenizer(meta)
        if tokenizer is None:
            raise UserError(f"{path}: no tokenizer next to the model and the run's dataset tokenizer is not "
                             "found; pass --tokenizer")
    recorded = meta.get("tokenizer_sha256")
    if recorded is not None and not tokenizer.matches(recorded):
        raise UserError(f"{tokenizer.files[tokenizer.defining_file]}: sha256 {tokenizer.sha256} differs from the "
                         f"model's tokenizer_sha256 {recorded}")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{tokenizer.files[tokenizer.defining_file]}: vocab_size {tokenizer.vocab_size} exceeds "
                         f"the model's vocab_size={vocab_size}")
    return tokenizer


def to_hf(path, out_dir, tokenizer_path=None, trust_checkpoint: bool = False) -> Path:
    """Write a LlamaForCausalLM directory (weights, config, generation config, tokenizer, card)."""
    from ..checkpoint.loading import export_metadata, load_for_inference

    path, out_dir = Path(path), Path(out_dir)
    model, meta = load_for_inference(path, trust_checkpoint=trust_checkpoint)
    tokenizer = find_tokenizer(path, meta, model.config.vocab_size, tokenizer_path)
    if "checkpoint" in meta:  # a training run: the card says what an export of it would say
        meta = portable({"model": model.config.to_dict(), **export_metadata(meta)})
    state = hf_state(model)
    refuse_non_finite(state, out_dir)  # the loader refuses them too; a writer checks what it writes
    from transformers import GenerationConfig, LlamaForCausalLM  # seconds to import: after every check

    config = hf_config(model, tokenizer)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with staged_directory(out_dir, export_bytes(sum(v.numel() for v in state.values()), tokenizer)) as staging:
        hf_model.save_pretrained(str(staging))
        write_hf_tokenizer(tokenizer, staging)
        (staging / "README.md").write_text(model_card(meta, model.num_parameters(), hf=True))
    return out_dir


# --------------------------------------------------------------------------- command line

def _main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0] + " (docs/hf.md)",
        formatter_class=HelpFormatter,
        epilog="examples:\n  biglearn convert from-hf ~/models/TinyLlama-1.1B runs/tinyllama\n"
               "  python -m pretrain.train model.init=runs/tinyllama data.kind=manifest data.manifest=...\n"
               "  biglearn convert to-hf runs/my_run runs/my_run_hf")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("from-hf", help="import a Llama-family checkpoint as a biglearn export",
                            formatter_class=HelpFormatter,
                            description="Read HF_DIR (config.json, model.safetensors or a sharded index, tokenizer "
                                        "files) and write our export format to OUT_DIR, complete or not at all.")
    p.add_argument("hf_dir", help="directory written by transformers' save_pretrained (Llama, Mistral, ...)")
    p.add_argument("out_dir", help="new directory for the export (must not exist or be empty)")
    p.add_argument("--streams", type=int, choices=(1, 2), default=1,
                   help="stream mode of the export (1 computes exactly what the checkpoint computes at the identity "
                        "order; model.init can switch)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"model.max_seq_len (default: max_position_embeddings, at most {IMPORT_MAX_SEQ_LEN})")
    p.add_argument("--tokenizer", default=None, help="tokenizer to bundle instead of the one in HF_DIR")
    p.add_argument("--no-tokenizer", action="store_true", help="import weights only (HF_DIR has no tokenizer)")
    add_debug_flag(p)
    p = commands.add_parser("to-hf", help="export a run or biglearn export as a LlamaForCausalLM directory",
                            formatter_class=HelpFormatter,
                            description="Write OUT_DIR with config.json, model.safetensors, generation_config.json, "
                                        "tokenizer files and README.md; transformers loads it without custom code.")
    p.add_argument("path", help="run dir, checkpoint or exported model dir")
    p.add_argument("out_dir", help="new directory (must not exist or be empty)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the export's, else the run's dataset's)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a DeepSpeed checkpoint when PATH holds no export (its .pt files are pickles)")
    add_debug_flag(p)
    args = parser.parse_args(argv)
    if args.command == "from-hf":
        out = from_hf(args.hf_dir, args.out_dir, args.streams, args.max_seq_len, args.tokenizer, not args.no_tokenizer)
    else:
        out = to_hf(args.path, args.out_dir, args.tokenizer, args.trust_checkpoint)
    print(out)
    return 0


def main(argv=None, prog: str = "python -m pretrain.hf") -> int:
    """Entry point: a UserError (bad input) is one line on stderr and exit status 2."""
    return cli_main(lambda args: _main(args, prog), prog, argv)


if __name__ == "__main__":
    raise SystemExit(main())
