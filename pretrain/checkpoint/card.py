"""The model card (README.md of an export) and the evaluation matrix's text format."""
from __future__ import annotations

import json
from pathlib import Path


def format_matrix(matrix: dict, baseline: dict | None = None) -> str:
    """{task: {"nll", "ppl"}} as a text table, with the untrained model's NLL when given."""
    lines = [f"{'task':<14}{'NLL/token':>11}{'perplexity':>12}" + (f"{'untrained NLL':>15}" if baseline else "")]
    for task, row in matrix.items():
        line = f"{task:<14}{row['nll']:>11.4f}{row['ppl']:>12.2f}"
        lines.append(line + (f"{baseline[task]['nll']:>15.4f}" if baseline else ""))
    return "\n".join(lines)


def manifest_summary(manifest_path) -> dict | None:
    """What a model card says about the data: splits, sources, tokenizer (None if unreadable)."""
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    tokenizer = manifest.get("tokenizer", {})
    return {"name": Path(manifest_path).parent.name, "seq_len": manifest.get("seq_len"),
            "mode": manifest.get("mode"), "splits": manifest.get("splits"), "sources": manifest.get("sources"),
            "tokenizer": {k: tokenizer.get(k) for k in ("kind", "sha256", "vocab_size")}}


def _table(rows: list[tuple]) -> list[str]:
    return ["| key | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def model_card(meta: dict, n_parameters: int, hf: bool = False) -> str:
    """README.md: architecture, stream mode, objective mix, data summary, tokens seen, evaluation."""
    m = meta["model"]
    streams = m.get("streams", 2)
    config = meta.get("config", {})
    progress = meta.get("progress", {})
    lines = [f"# {meta.get('name') or config.get('run_name') or 'biglearn model'}", "",
             "A big-learning model: one transformer p(x_T | x_S) trained on many (source, target) splits "
             "of each sequence (\"Big Learning\", eq. 6), exported by biglearn.", ""]
    if hf:
        lines += ["This directory is a plain `LlamaForCausalLM` (no custom code): left to right it computes what "
                  "the big-learning model computes for the identity order with an empty source. Any-order and "
                  "infilling inference need the biglearn export (`pretrain.infer`).", ""]
        if streams != 1:
            lines += ["**Not exact: two-stream model.** Its predictions come from the query stream, which "
                      "`LlamaForCausalLM` has no counterpart for; this export reads the content stream through "
                      "the head, so its logits are not the model's predictions. Train with `model.streams=1` "
                      "for an exact export.", ""]
    lines += ["## Architecture", "", *_table([
        ("parameters", f"{n_parameters / 1e6:.2f}M"), ("layers", m["n_layers"]), ("d_model", m["d_model"]),
        ("heads / kv heads", f"{m['n_heads']} / {m['n_kv_heads']}"), ("SwiGLU hidden", m["ffn_hidden"]),
        ("vocabulary", m["vocab_size"]), ("RoPE base", m["rope_base"]), ("RoPE scaling", m.get("rope_scaling") or "none"),
        ("RMSNorm eps", m["norm_eps"]), ("tied embeddings", m["tie_embeddings"]), ("max sequence", m["max_seq_len"]),
        ("stream mode", "single-stream (streams=1)" if streams == 1 else "two-stream (streams=2)")]), ""]
    objective = config.get("objective", {})
    if objective:
        mix = objective.get("mixture") or {objective.get("name"): 1.0}
        lines += ["## Training", "", *_table([
            ("objective mix", ", ".join(f"{k} {v:g}" for k, v in mix.items())),
            ("steps", progress.get("step", 0)), ("tokens seen", progress.get("tokens_seen", 0)),
            ("tokens predicted", progress.get("predicted_seen", 0)),
            ("initialised from", (config.get("model") or {}).get("init") or "random weights")]), ""]
    if meta.get("source"):
        lines += ["## Origin", "", *_table(sorted(meta["source"].items())), ""]
    data = meta.get("data")
    if data:
        splits = data.get("splits") or {}
        lines += ["## Data", "", f"Dataset `{data.get('name')}`, windows of {data.get('seq_len')} tokens "
                  f"({data.get('mode')}); tokenizer {data['tokenizer'].get('kind') or 'biglearn'} "
                  f"sha256 {data['tokenizer'].get('sha256')}.", "",
                  "| split | windows | tokens |", "|---|---|---|",
                  *[f"| {name} | {s.get('samples')} | {s.get('tokens')} |" for name, s in splits.items()], ""]
    if meta.get("eval"):
        lines += ["## Evaluation (validation, fixed (S, T) draws)", "", "```", format_matrix(meta["eval"]), "```", ""]
    lines += [f"Tokenizer sha256: {meta.get('tokenizer_sha256')}", ""]
    return "\n".join(lines)
