"""SentencePiece tokenizer: training with reserved special tokens, loading, batched encode/decode.

An output directory holds ``tokenizer.model`` (the sentencepiece model) and ``tokenizer.json``:
vocab size, special ids, the model file's sha256 and the training arguments. Special ids are
fixed: pad 0, unk 1, bos 2, eos 3, then ``n_sentinels`` control tokens ``<sentinel_i>`` (label
slots and segment separators for multi-segment samples; never produced by encoding text).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from .sources import SourceConfig, SourceStats, iter_documents

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
MODEL_TYPES = ("unigram", "bpe")
SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
_MAX_LINE_CHARS = 2000  # sentencepiece silently drops sentences over max_sentence_length bytes


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    input_sentence_size: int = 1_000_000  # reservoir sample of training lines for large corpora
    n_sentinels: int = 16
    byte_fallback: bool = True  # unseen characters become byte tokens instead of <unk>
    seed: int = 0
    num_threads: int = os.cpu_count() or 1

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {self.model_type!r}")
        if not 0 < self.character_coverage <= 1:
            raise ValueError(f"character_coverage must be in (0, 1]; got {self.character_coverage!r}")
        if self.n_sentinels < 0:
            raise ValueError(f"n_sentinels must be >= 0; got {self.n_sentinels!r}")
        if self.input_sentence_size < 1:
            raise ValueError(f"input_sentence_size must be >= 1; got {self.input_sentence_size!r}")
        minimum = len(SPECIAL_IDS) + self.n_sentinels + (256 if self.byte_fallback else 0) + 1
        if self.vocab_size < minimum:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: the {len(SPECIAL_IDS)} special tokens, "
                             f"{self.n_sentinels} sentinels{' and 256 byte-fallback tokens' if self.byte_fallback else ''} "
                             f"need at least {minimum}")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; the result must read like open()'s
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _training_lines(text: str):
    """Split a document into sentencepiece 'sentences': its lines, long lines cut at spaces."""
    for line in text.splitlines():
        # Walk an index through the line: re-slicing the remainder after each cut would copy it
        # every time, quadratic in the line's length (a 50 MB line took over ten minutes).
        stripped = line.strip()
        start, end = 0, len(stripped)
        while start < end:
            if end - start <= _MAX_LINE_CHARS:
                yield stripped[start:]
                break
            cut = stripped.rfind(" ", start, start + _MAX_LINE_CHARS)
            cut = cut if cut > start else start + _MAX_LINE_CHARS
            yield stripped[start:cut]
            start = cut
            while stripped[start].isspace():  # never runs off the end: `stripped` ends in non-space
                start += 1


def _sample_lines(documents, size: int, seed: int) -> tuple[list[str], int]:
    """Uniform reservoir sample (Algorithm R) of at most `size` lines, deterministic in `seed`."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for document in documents:
        if not isinstance(document, str):  # a multi-segment sample: its text fields
            document = "\n".join(v for v in document if isinstance(v, str))
        for line in _training_lines(document):
            if len(reservoir) < size:
                reservoir.append(line)
            else:
                slot = rng.randrange(seen + 1)
                if slot < size:
                    reservoir[slot] = line
            seen += 1
    return reservoir, seen


def train_tokenizer(inputs, output_dir, config: TokenizerConfig | None = None,
                    source_config: SourceConfig | None = None, progress: bool = False) -> "Tokenizer":
    """Train a sentencepiece model on the documents of `inputs` and write it to `output_dir`."""
    config = config or TokenizerConfig()
    output_dir = Path(output_dir)
    stats = SourceStats()
    documents = iter_documents(inputs, source_config, stats)
    if progress:
        from tqdm import tqdm
        documents = tqdm(documents, desc="reading documents", unit="doc")
    lines, n_lines = _sample_lines(documents, config.input_sentence_size, config.seed)
    if not lines:
        raise ValueError(f"no usable text in inputs {[str(i) for i in inputs]}: {stats.report()}")
    output_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(config.seed)
    sentinels = [f"<sentinel_{i}>" for i in range(config.n_sentinels)]
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".train-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=config.vocab_size,
                model_type=config.model_type, character_coverage=config.character_coverage,
                input_sentence_size=config.input_sentence_size, shuffle_input_sentence=True,
                byte_fallback=config.byte_fallback, normalization_rule_name="identity",
                control_symbols=sentinels, num_threads=max(1, config.num_threads),
                pad_id=SPECIAL_IDS["pad_id"], unk_id=SPECIAL_IDS["unk_id"],
                bos_id=SPECIAL_IDS["bos_id"], eos_id=SPECIAL_IDS["eos_id"], minloglevel=2)
        except RuntimeError as error:
            raise ValueError(f"sentencepiece could not train a {config.vocab_size}-token {config.model_type} model "
                             f"on {n_lines} lines ({stats.report()}): {error}") from None
        model_bytes = (Path(tmp) / "sp.model").read_bytes()
    atomic_write_bytes(output_dir / MODEL_FILE, model_bytes)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    # Characters per token on (part of) the training sample: used to size shards.
    probe = lines[:5000]
    n_tokens = sum(len(ids) for ids in processor.encode(probe))
    info = {
        "vocab_size": processor.get_piece_size(),
        "model_type": config.model_type,
        **SPECIAL_IDS,
        "sentinel_ids": [processor.piece_to_id(s) for s in sentinels],
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "chars_per_token": sum(map(len, probe)) / max(1, n_tokens),
        "training": {**asdict(config), "lines_seen": n_lines, "lines_used": len(lines),
                     "inputs": [str(i) for i in inputs], "sources": stats.to_dict()},
    }
    info["training"].pop("num_threads")  # does not change the model
    atomic_write_bytes(output_dir / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    return Tokenizer.load(output_dir)


class Tokenizer:
    """A trained tokenizer directory: the sentencepiece processor plus its recorded info."""

    def __init__(self, model_bytes: bytes, info: dict):
        self.info = info
        self.processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        for key in ("vocab_size", "pad_id", "unk_id", "bos_id", "eos_id", "sha256"):
            setattr(self, key, info[key])
        self.sentinel_ids = list(info["sentinel_ids"])

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        directory = Path(directory)
        model_path, info_path = directory / MODEL_FILE, directory / INFO_FILE
        for path in (model_path, info_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: {directory} is not a tokenizer directory "
                                 f"(train one with `python -m data_pipeline tokenizer`)")
        info = json.loads(info_path.read_text())
        model_bytes = model_path.read_bytes()
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != info.get("sha256"):
            raise ValueError(f"{model_path}: sha256 {digest} does not match {info_path} ({info.get('sha256')})")
        return cls(model_bytes, info)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=num_threads)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids`; padding is dropped, eos becomes a newline between documents."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        pieces, start = [], 0
        for stop in [i for i, t in enumerate(ids) if t == self.eos_id] + [len(ids)]:
            pieces.append(self.processor.decode(ids[start:stop]))
            start = stop + 1
        return "\n".join(pieces)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]
