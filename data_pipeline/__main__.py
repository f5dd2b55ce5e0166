"""Data pipeline: train a tokenizer, build token shards, inspect them, or build the demo dataset.

Each command has --help; docs/data.md describes the formats."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import add_debug_flag, cli_main

from . import build_demo
from .inspection import format_report, inspect_dataset
from .shards import MODES, ShardConfig, build_shards
from .sources import NORMALIZATIONS, STDLIB, TXT_SPLITS, SourceConfig, SourceStats
from .tokenizer import MODEL_TYPES, TokenizerConfig, train_tokenizer


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs")
    group.add_argument("--input", nargs="+", default=[], metavar="PATH",
                       help=f"text files of any name (.jsonl: one JSON record per line; optionally .gz/.zst), "
                            f"directories (searched recursively; files that are not UTF-8 text are skipped and "
                            f"counted by kind), or the word {STDLIB!r} for the built-in standard-library docstring corpus")
    group.add_argument("--include", nargs="+", default=[], metavar="GLOB",
                       help="read only the files of a searched directory that match one of these globs (a glob with "
                            "'/' matches the path below the directory, e.g. 'doc/*.txt'; one without, the file name)")
    group.add_argument("--exclude", nargs="+", default=[], metavar="GLOB",
                       help="leave out the files of a searched directory that match one of these globs")
    group.add_argument("--stdlib", action="store_true", help="add the built-in standard-library corpus")
    group.add_argument("--text-field", default="text", help="JSON key of the text in .jsonl records")
    group.add_argument("--txt-split", choices=TXT_SPLITS, default="file",
                       help="a .txt file is one document, or one per blank-line separated block")
    group.add_argument("--normalize", choices=NORMALIZATIONS, default="NFC", help="unicode normalisation")
    group.add_argument("--segments", default="", metavar="FIELD,FIELD",
                       help="multi-segment samples from .jsonl fields, e.g. label,text: one window per record, "
                            "an integer field is a label (sentinel token), a string field is text")


def _inputs(args) -> tuple[list[str], SourceConfig]:
    inputs = list(args.input) + ([STDLIB] if args.stdlib else [])
    if not inputs:
        raise SystemExit("error: give --input PATH... and/or --stdlib")
    segments = [name.strip() for name in args.segments.split(",")] if args.segments else []
    return inputs, SourceConfig(text_field=args.text_field, txt_split=args.txt_split, normalize=args.normalize,
                                segments=segments, include=args.include, exclude=args.exclude)


def _print_sources(stats: SourceStats) -> None:
    """What was read and skipped, one line per kind; a loud line on stderr when most files were skipped."""
    print(f"sources: {stats.report(separator=chr(10) + '  ')}")
    warning = stats.warning()
    if warning:
        print(warning, file=sys.stderr)


def main(argv=None, prog: str = "python -m data_pipeline") -> int:
    """Entry point (also `biglearn data`): bad input is reported in one line, not a traceback
    (the pipeline's ValueErrors all name the file, field or flag); --debug shows it."""
    return cli_main(lambda args: _run(args, prog), prog, argv, user_errors=(ValueError,))


def _run(argv, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults_shown = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    p = commands.add_parser("tokenizer", **defaults_shown, help="train a sentencepiece tokenizer",
                            description="Train a sentencepiece model; writes DIR/tokenizer.model and DIR/biglearn_tokenizer.json.")
    _add_inputs(p)
    defaults = TokenizerConfig()
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="pieces, special tokens included")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=defaults.model_type, help="sentencepiece algorithm")
    p.add_argument("--character-coverage", type=float, default=defaults.character_coverage,
                   help="share of characters the vocabulary must cover (rarer ones fall back to bytes)")
    p.add_argument("--input-sentence-size", type=int, default=defaults.input_sentence_size,
                   help="train on a uniform sample of at most this many lines")
    p.add_argument("--sentinels", type=int, default=defaults.n_sentinels,
                   help="number of reserved <sentinel_i> label/segment tokens")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unseen characters to <unk> instead of bytes")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the line sample and of sentencepiece")
    p.add_argument("--threads", type=int, default=defaults.num_threads, help="sentencepiece training threads")
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/tokenizer.model and DIR/biglearn_tokenizer.json")

    p = commands.add_parser("shards", **defaults_shown, help="tokenize text into webdataset shards",
                            description="Tokenize inputs into DIR/{train,val}-NNNNNN.tar and DIR/manifest.json; "
                                        "a re-run skips shards that are already complete.")
    _add_inputs(p)
    defaults = ShardConfig()
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="directory written by the tokenizer command, a Hugging Face tokenizer.json, or a "
                        "sentencepiece .model (e.g. Llama's)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="window length in tokens")
    p.add_argument("--mode", choices=MODES, default=defaults.mode,
                   help="concat: eos-joined stream cut into windows; documents: whole documents, padded")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="share of documents (chosen by content hash) in the val split")
    p.add_argument("--shard-size-mb", type=float, default=defaults.shard_size_mb, help="target token payload per shard")
    p.add_argument("--workers", type=int, default=defaults.num_workers, help="tokenizer processes (0: in-process)")
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/*.tar and DIR/manifest.json")

    p = commands.add_parser("inspect", **defaults_shown, help="check a built dataset",
                            description="Print counts per split, verify shard checksums, decode a few samples; "
                                        "exits with status 1 when a shard or sample is bad.")
    p.add_argument("manifest", help="DIR/manifest.json (or DIR)")
    p.add_argument("--examples", type=int, default=3, help="samples to decode")
    p.add_argument("--no-verify", action="store_true", help="skip recomputing sha256 checksums")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-external-shards", action="store_true",
                   help="accept shard paths outside the manifest's directory (absolute or with ..)")

    p = commands.add_parser("demo", **defaults_shown, help="tokenizer + shards from the built-in stdlib corpus",
                            description="Build the demo dataset (standard-library docstrings, no download) in DIR; "
                                        "work already done is reused.")
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory (tokenizer in DIR/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents in the val split")
    p.add_argument("--shard-size-mb", type=float, default=0.125, help="target token payload per shard")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (None: one per core)")
    for command in commands.choices.values():
        add_debug_flag(command)

    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        inputs, source = _inputs(args)
        config = TokenizerConfig(vocab_size=args.vocab_size, model_type=args.model_type,
                                 character_coverage=args.character_coverage,
                                 input_sentence_size=args.input_sentence_size, n_sentinels=args.sentinels,
                                 byte_fallback=not args.no_byte_fallback, seed=args.seed, num_threads=args.threads)
        tokenizer = train_tokenizer(inputs, args.output, config, source, progress=True)
        _print_tokenizer(tokenizer)
    elif args.command == "shards":
        inputs, source = _inputs(args)
        config = ShardConfig(seq_len=args.seq_len, mode=args.mode, val_fraction=args.val_fraction,
                             shard_size_mb=args.shard_size_mb, num_workers=args.workers)
        path = build_shards(inputs, args.tokenizer, args.output, config, source, progress=True)
        _print_summary(path)
    elif args.command == "inspect":
        report = inspect_dataset(args.manifest, n_examples=args.examples, verify=not args.no_verify, progress=True,
                                 allow_external_shards=args.allow_external_shards)
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        return 0 if report["ok"] else 1
    else:
        path = build_demo(args.output, vocab_size=args.vocab_size, seq_len=args.seq_len,
                          val_fraction=args.val_fraction, shard_size_mb=args.shard_size_mb, num_workers=args.workers)
        _print_summary(path)
    return 0


def _print_tokenizer(tokenizer) -> None:
    """A few lines, not the metadata file: where it is, what it holds, what it read."""
    info, training = tokenizer.info, tokenizer.info["training"]
    sentinels = tokenizer.sentinel_ids
    print(f"tokenizer: {', '.join(str(path) for path in tokenizer.files.values())}")
    print(f"  {tokenizer.vocab_size} pieces ({info['model_type']}): pad {tokenizer.pad_id}, unk {tokenizer.unk_id}, "
          f"bos {tokenizer.bos_id}, eos {tokenizer.eos_id}"
          + (f", {len(sentinels)} sentinels (ids {sentinels[0]}-{sentinels[-1]})" if sentinels else "")
          + f"; {info['chars_per_token']:.2f} characters per token")
    print(f"  trained on {training['lines_used']:,} of {training['lines_seen']:,} lines; sha256 {tokenizer.sha256}")
    _print_sources(SourceStats(**training["sources"]))


def _print_summary(path) -> None:
    manifest = json.loads(open(path).read())
    for split, summary in manifest["splits"].items():
        print(f"{split}: {summary['shards']} shards, {summary['samples']} windows, {summary['tokens']} tokens")
    _print_sources(SourceStats(**manifest["sources"]))
    if manifest["build"].get("too_long_samples"):
        print(f"dropped {manifest['build']['too_long_samples']} multi-segment samples longer than seq_len")
    print(f"manifest: {path}")


if __name__ == "__main__":
    sys.exit(main())
