"""Check a built dataset: counts per split, shard checksums, readable samples, decoded examples."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import load_manifest, shard_file
from .shard_format import ShardError, read_shard
from .files import file_sha256
from .tokenizer import Tokenizer


def inspect_dataset(manifest_path, n_examples: int = 3, verify: bool = True, progress: bool = False,
                    allow_external_shards: bool = False) -> dict:
    """Read every shard of the manifest; report counts, bad shards (with the reason) and examples.

    Members a bad shard could not deliver (all of a missing shard, those behind a damaged tar
    header) are reported as one bad-sample entry with their `count`.
    verify=True also recomputes each shard's sha256 and compares it with the manifest."""
    from tqdm import tqdm

    manifest = load_manifest(manifest_path, allow_external_shards)
    dtype = np.dtype(manifest["token_dtype"])
    tokenizer = None
    tokenizer_dir = Path(manifest["root"])
    if (tokenizer_dir / manifest["tokenizer"]["path"]).is_file():
        tokenizer = Tokenizer.load(tokenizer_dir)
        if not tokenizer.matches(manifest["tokenizer"]["sha256"]):
            raise ValueError(f"{tokenizer_dir}: tokenizer sha256 {tokenizer.sha256} differs from the manifest's "
                             f"{manifest['tokenizer']['sha256']}")
    report = {"manifest": str(Path(manifest["root"]) / "manifest.json"), "seq_len": manifest["seq_len"],
              "vocab_size": manifest["vocab_size"], "pad_id": manifest["pad_id"],
              "splits": {}, "bad_shards": [], "bad_samples": [], "examples": []}
    for entry in tqdm(manifest["shards"], desc="checking shards", unit="shard", disable=not progress):
        split = report["splits"].setdefault(entry["split"], {"shards": 0, "samples": 0, "tokens": 0,
                                                             "manifest_samples": 0, "manifest_tokens": 0})
        split["shards"] += 1
        split["manifest_samples"] += entry["samples"]
        split["manifest_tokens"] += entry["tokens"]
        path = shard_file(manifest, entry)
        problems = []
        samples = tokens = seen = 0
        try:
            for sample in read_shard(path, dtype, seq_len=manifest["seq_len"], vocab_size=manifest["vocab_size"],
                                     expected_bytes=entry["bytes"]):
                seen += 1
                if sample.tokens is None:
                    report["bad_samples"].append({"shard": entry["path"], "member": sample.key, "count": 1,
                                                  "error": sample.error})
                    continue
                samples += 1
                tokens += len(sample.tokens)
                if len(report["examples"]) < n_examples and entry["split"] == "train":
                    text = tokenizer.decode(sample.tokens) if tokenizer is not None else None
                    report["examples"].append({"key": sample.key, "tokens": len(sample.tokens), "text": text})
        except ShardError as error:
            problems.append(str(error))
            if entry["samples"] > seen:
                report["bad_samples"].append({"shard": entry["path"], "member": f"members {seen}..{entry['samples'] - 1}",
                                              "count": entry["samples"] - seen, "error": "unreadable: " + str(error)})
        if not problems and verify and file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        if not problems and (samples, tokens) != (entry["samples"], entry["tokens"]):
            problems.append(f"{path}: {samples} good samples / {tokens} tokens, manifest says "
                            f"{entry['samples']} / {entry['tokens']}")
        if problems:
            report["bad_shards"].append({"path": entry["path"], "error": "; ".join(problems)})
        split["samples"] += samples
        split["tokens"] += tokens
    report["ok"] = not report["bad_shards"] and not report["bad_samples"]
    return report


def format_report(report: dict) -> str:
    lines = [f"manifest {report['manifest']}: seq_len {report['seq_len']}, vocab {report['vocab_size']}, "
             f"pad_id {report['pad_id']}"]
    for name, split in report["splits"].items():
        lines.append(f"  {name:5s}: {split['shards']} shards, {split['samples']} samples, {split['tokens']} tokens "
                     f"readable (manifest: {split['manifest_samples']} samples, {split['manifest_tokens']} tokens)")
    for bad in report["bad_shards"]:
        lines.append(f"  BAD SHARD {bad['path']}: {bad['error']}")
    for bad in report["bad_samples"]:
        count = f" ({bad['count']} samples)" if bad["count"] > 1 else ""
        lines.append(f"  BAD SAMPLE {bad['shard']} / {bad['member']}{count}: {bad['error']}")
    for example in report["examples"]:
        text = example["text"]
        shown = "(no tokenizer next to the manifest)" if text is None else repr(text[:300])
        lines.append(f"  example {example['key']} ({example['tokens']} tokens): {shown}")
    lines.append("OK" if report["ok"] else
                 f"PROBLEMS: {len(report['bad_shards'])} bad shards, "
                 f"{sum(bad['count'] for bad in report['bad_samples'])} bad samples")
    return "\n".join(lines)
