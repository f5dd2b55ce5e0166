"""Tokenizers: our sentencepiece training, and loading ours or an existing one, batched encode/decode.

Three kinds load through ``Tokenizer.load`` (a directory or a file):

- ours: a directory with ``tokenizer.model`` (sentencepiece) and ``biglearn_tokenizer.json``
  (vocab size, special ids, the model file's sha256, the training arguments). Special ids are
  fixed: pad 0, unk 1, bos 2, eos 3, then ``n_sentinels`` control tokens ``<sentinel_i>`` (label
  slots and segment separators for multi-segment samples; never produced by encoding text).
  Directories written before the metadata file was renamed hold it as ``tokenizer.json``, the
  name of Hugging Face's own format; they still load.
- an existing sentencepiece ``.model`` (e.g. Llama's, Mistral's), read by sentencepiece;
- a Hugging Face ``tokenizer.json``, read by the ``tokenizers`` library; special tokens come from
  the ``tokenizer_config.json`` next to it, else from the usual names (``<s>``, ``</s>``, ...).

Whatever the kind, ``sha256`` identifies what the tokenizer maps, not the bytes of a file: the
hash of its pieces in id order, its special ids and the ids it gives a fixed probe of texts
(which shows its normalisation: whitespace, Unicode forms, byte fallback). A vocabulary saved in
another format or built in another directory is recognised as the same; a model refuses a
tokenizer whose sha256 differs from the one it was trained with. Records written before this
identity (exports, manifests, checkpoints: the defining file's sha256) are still accepted:
``Tokenizer.matches`` takes either, and ``file_sha256`` is that file's hash.

Training is reproducible: the same inputs, seed and thread count give byte-identical files (the
model is trained from memory, so no temporary path is recorded in it).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from .files import atomic_write
from .progress import heartbeat
from .sources import SourceConfig, SourceStats, iter_documents

MODEL_FILE = "tokenizer.model"
INFO_FILE = "biglearn_tokenizer.json"  # ours; "tokenizer.json" is the name of Hugging Face's format
LEGACY_INFO_FILE = "tokenizer.json"  # our metadata in directories written before the rename
HF_FILE = "tokenizer.json"
HF_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")  # special tokens of an HF tokenizer.json
KINDS = ("biglearn", "sentencepiece", "hf")
# Usual spellings of special tokens, for an HF tokenizer.json without a tokenizer_config.json.
_SPECIAL_NAMES = {"bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "<|endoftext|>"),
                  "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
                  "unk": ("<unk>", "<|unk|>"), "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")}
MODEL_TYPES = ("unigram", "bpe")
SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
_MAX_LINE_CHARS = 2000  # sentencepiece silently drops sentences over max_sentence_length bytes
IDENTITY_VERSION = 1
# Texts whose ids are part of a tokenizer's identity: they show its normalisation (runs of spaces,
# tabs, newlines, compatibility characters, combining accents), byte fallback and segmentation.
_PROBE = ("Hello, world!  Two  spaces\tand a tab.\n", "  leading and trailing  ", "a\n\nb\r\nc",
          "\ufb01ne caf\u00e9 \u00c5ngstr\u00f6m \u216b \u2460 x\u00b2", "na\u00efve e\u0301",
          "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \U0001f600", "def f(x):\n    return x ** 2  # done",
          "UPPER lower 12345 3.14 -0.5e10")


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
    """Train a sentencepiece model on the documents of `inputs` and write it to `output_dir`
    (byte-identical for the same inputs, seed and threads). progress=True shows the documents
    read and a line every 5 s while sentencepiece trains."""
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
    spm.set_random_generator_seed(config.seed)
    sentinels = [f"<sentinel_{i}>" for i in range(config.n_sentinels)]
    if progress:
        print(f"training a {config.vocab_size}-piece {config.model_type} model on {len(lines):,} lines "
              f"({config.num_threads} threads)", file=sys.stderr, flush=True)
    model = io.BytesIO()
    with heartbeat("sentencepiece training", enabled=progress):
        try:
            # From memory to memory: a model trained from a file records that file's path.
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=config.vocab_size,
                model_type=config.model_type, character_coverage=config.character_coverage,
                input_sentence_size=config.input_sentence_size, shuffle_input_sentence=True,
                byte_fallback=config.byte_fallback, normalization_rule_name="identity",
                control_symbols=sentinels, num_threads=max(1, config.num_threads),
                pad_id=SPECIAL_IDS["pad_id"], unk_id=SPECIAL_IDS["unk_id"],
                bos_id=SPECIAL_IDS["bos_id"], eos_id=SPECIAL_IDS["eos_id"], minloglevel=2)
        except RuntimeError as error:
            raise ValueError(f"sentencepiece could not train a {config.vocab_size}-token {config.model_type} model "
                             f"on {n_lines} lines ({stats.report()}): {error}") from None
    model_bytes = model.getvalue()
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / MODEL_FILE, model_bytes)
    backend = _SentencePiece(model_bytes)
    # Characters per token on (part of) the training sample: used to size shards.
    probe = lines[:5000]
    n_tokens = sum(len(ids) for ids in backend.processor.encode(probe))
    info = {
        "vocab_size": backend.processor.get_piece_size(),
        "model_type": config.model_type,
        **SPECIAL_IDS,
        "sentinel_ids": [backend.processor.piece_to_id(s) for s in sentinels],
        "sha256": mapping_sha256(backend, SPECIAL_IDS),
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "chars_per_token": sum(map(len, probe)) / max(1, n_tokens),
        "training": {**asdict(config), "lines_seen": n_lines, "lines_used": len(lines),
                     "inputs": [str(i) for i in inputs], "sources": stats.to_dict()},
    }
    atomic_write(output_dir / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    return Tokenizer.load(output_dir)


def mapping_sha256(backend, special_ids: dict) -> str:
    """The identity of a tokenizer (module docstring): sha256 of its pieces in id order, its pad,
    unk, bos and eos ids and its ids for the probe texts."""
    special = {key: int(special_ids[key]) for key in SPECIAL_IDS}
    canonical = {"identity": IDENTITY_VERSION, "pieces": backend.pieces(), "special_ids": special,
                 "probe": backend.encode_batch(list(_PROBE), 1)}
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


class _SentencePiece:
    def __init__(self, model_bytes: bytes):
        self.processor = spm.SentencePieceProcessor(model_proto=model_bytes)

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=num_threads)

    def pieces(self) -> list[str]:
        return [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


class _HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # No BOS/EOS template: shards join documents with eos themselves, as for sentencepiece.
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def pieces(self) -> list[str]:
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return [self.tokenizer.id_to_token(i) or "" for i in range(size)]  # "" for an unused id

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # as sentencepiece drops control pieces


def _special_content(value):
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A loaded tokenizer of any kind: encode/decode, special ids, and the files that define it
    (``files``: name in a copy -> source path; the shard builder and exports copy them)."""

    def __init__(self, backend, info: dict, files: dict[str, Path], file_sha256: str):
        self.backend = backend
        self.files = files
        self.file_sha256 = file_sha256  # of the defining file: what records written before mapping_sha256 hold
        self.info = {"kind": "biglearn", **info, "sha256": mapping_sha256(backend, info)}
        self.kind = self.info["kind"]
        for key in ("vocab_size", "pad_id", "unk_id", "bos_id", "eos_id", "sha256"):
            setattr(self, key, self.info[key])
        self.sentinel_ids = list(self.info.get("sentinel_ids", []))

    def matches(self, recorded: str | None) -> bool:
        """Whether a recorded tokenizer sha256 names this tokenizer: its identity, or (a record
        written before identities) its defining file's hash."""
        return recorded in (self.sha256, self.file_sha256)

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The sentencepiece processor (ours and plain sentencepiece kinds)."""
        if not isinstance(self.backend, _SentencePiece):
            raise ValueError(f"a {self.kind} tokenizer has no sentencepiece processor")
        return self.backend.processor

    @property
    def defining_file(self) -> str:
        """Name of the file that defines the token ids (file_sha256 is its hash)."""
        return HF_FILE if self.kind == "hf" else MODEL_FILE

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Ours (a directory), an HF tokenizer.json, or a sentencepiece .model (the file, or a
        directory holding it); a directory is read in that order of preference."""
        path = Path(path)
        if path.is_dir():
            for info_path in (path / INFO_FILE, path / LEGACY_INFO_FILE):
                info = _our_info(info_path)
                if info is not None:
                    return cls._load_ours(path, info_path, info)
            if (path / HF_FILE).is_file():
                return cls._load_hf(path / HF_FILE)
            if (path / MODEL_FILE).is_file():
                return cls._load_sentencepiece(path / MODEL_FILE)
            raise ValueError(f"{path} is not a tokenizer directory: expected {MODEL_FILE} + {INFO_FILE} (train one "
                             f"with `python -m data_pipeline tokenizer`), an HF {HF_FILE} or a sentencepiece {MODEL_FILE}")
        if path.is_file():
            return cls._load_hf(path) if path.suffix == ".json" else cls._load_sentencepiece(path)
        raise ValueError(f"tokenizer {path} not found: give a tokenizer directory, an HF {HF_FILE} or a "
                         f"sentencepiece .model file")

    @classmethod
    def _load_ours(cls, directory: Path, info_path: Path, info: dict) -> "Tokenizer":
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise ValueError(f"{model_path} not found: {info_path} describes a sentencepiece model that is missing")
        model_bytes = model_path.read_bytes()
        digest = hashlib.sha256(model_bytes).hexdigest()
        expected = info.get("model_sha256", info.get("sha256"))  # "sha256" in files written before identities
        if digest != expected:
            raise ValueError(f"{model_path}: sha256 {digest} does not match {info_path} ({expected})")
        return cls(_SentencePiece(model_bytes), info, {MODEL_FILE: model_path, INFO_FILE: info_path}, digest)

    @classmethod
    def _load_sentencepiece(cls, path: Path) -> "Tokenizer":
        model_bytes = path.read_bytes()
        try:
            backend = _SentencePiece(model_bytes)
        except RuntimeError as error:
            raise ValueError(f"{path} is not a sentencepiece model: {str(error).splitlines()[0]}") from None
        p = backend.processor
        ids = {"unk_id": p.unk_id(), "bos_id": p.bos_id(), "eos_id": p.eos_id(), "pad_id": p.pad_id()}
        return cls(backend, _external_info("sentencepiece", path, p.get_piece_size(), ids),
                   {MODEL_FILE: path}, hashlib.sha256(model_bytes).hexdigest())

    @classmethod
    def _load_hf(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        data = path.read_bytes()
        try:
            tokenizer = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {str(error).splitlines()[0]}") from None
        companions = {name: path.parent / name for name in HF_COMPANIONS if (path.parent / name).is_file()}
        declared = {}
        for companion in companions.values():
            try:
                settings = json.loads(companion.read_text())
            except (ValueError, UnicodeDecodeError) as error:
                raise ValueError(f"{companion}: not valid JSON ({error})") from None
            for role in _SPECIAL_NAMES:
                declared.setdefault(role, _special_content(settings.get(f"{role}_token")))
        ids = {}
        for role, names in _SPECIAL_NAMES.items():
            candidates = [declared[role]] if declared.get(role) else list(names)
            found = [tokenizer.token_to_id(name) for name in candidates if tokenizer.token_to_id(name) is not None]
            ids[f"{role}_id"] = found[0] if found else -1
        return cls(_HFTokenizer(tokenizer),
                   _external_info("hf", path, tokenizer.get_vocab_size(with_added_tokens=True), ids),
                   {HF_FILE: path, **companions}, hashlib.sha256(data).hexdigest())

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.backend.encode_batch(list(texts), num_threads)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode_batch([text], 1)[0]

    def decode(self, ids) -> str:
        """Text of `ids`; padding is dropped, eos becomes a newline between documents."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        pieces, start = [], 0
        for stop in [i for i, t in enumerate(ids) if t == self.eos_id] + [len(ids)]:
            pieces.append(self.backend.decode(ids[start:stop]))
            start = stop + 1
        return "\n".join(pieces)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


def _our_info(path: Path) -> dict | None:
    """Our metadata at `path`, or None (absent, or Hugging Face's tokenizer.json under the old name)."""
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return info if isinstance(info, dict) and ("model_sha256" in info or "sha256" in info) and "model" not in info else None


def _external_info(kind: str, path: Path, vocab_size: int, ids: dict) -> dict:
    """Info of a tokenizer we did not train. It must have an eos (documents are joined with it);
    without a pad token, padding uses unk (else eos), and without bos, eos starts a sequence."""
    if ids["eos_id"] < 0:
        raise ValueError(f"{path}: no eos token found (eos_token in tokenizer_config.json, or one of "
                         f"{_SPECIAL_NAMES['eos']}); documents are joined with eos")
    if ids["pad_id"] < 0:
        ids["pad_id"] = ids["unk_id"] if ids["unk_id"] >= 0 else ids["eos_id"]
    if ids["bos_id"] < 0:
        ids["bos_id"] = ids["eos_id"]
    return {"kind": kind, "vocab_size": vocab_size, **ids, "sentinel_ids": [], "source": path.name}
