"""Raw text sources -> a stream of documents (str).

Inputs are files, directories (searched recursively) or the word ``stdlib``:

- ``.txt``: one document per file (``txt_split="file"``) or one per blank-line separated
  paragraph block (``txt_split="blank_line"``);
- ``.jsonl``: one JSON object per line, the document is ``record[text_field]``;
- either of them compressed: ``.gz`` (gzip) or ``.zst`` (zstandard);
- ``stdlib``: the docstrings of the installed Python standard library, one document per module,
  harvested with ``ast`` from the source files (nothing is imported, so no module runs).

Bad input never stops a run: documents that are not valid UTF-8, empty documents, JSON lines
that do not parse or lack the text field, stdlib files that do not parse, and compressed files
that are truncated or corrupt (checked by decompressing them once before any document is used,
so such a file is skipped whole) are skipped and counted in a :class:`SourceStats`; files that
hold no bytes at all, compressed or not, are counted as ``empty_files``. ``stats.report()`` says
what was skipped and where.
"""
from __future__ import annotations

import ast
import gzip
import io
import json
import os
import sysconfig
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import zstandard

STDLIB = "stdlib"
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")
TXT_SPLITS = ("file", "blank_line")
_SUFFIXES = (".txt", ".jsonl")
_COMPRESSIONS = ("", ".gz", ".zst")
_MAX_EXAMPLES = 5  # file names kept per problem kind, for the report


@dataclass
class SourceStats:
    """Counters of what was read and what was skipped (and a few file names per problem)."""
    files: int = 0
    documents: int = 0
    characters: int = 0
    empty_documents: int = 0
    non_utf8_documents: int = 0
    bad_json_lines: int = 0
    missing_text_field: int = 0
    unparsable_modules: int = 0
    skipped_files: int = 0  # files in a searched directory with an unknown suffix
    corrupt_files: int = 0  # truncated or corrupt .gz/.zst files, skipped whole
    empty_files: int = 0    # files (after decompression) without a single byte
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        names = self.examples.setdefault(kind, [])
        if len(names) < _MAX_EXAMPLES and where not in names:
            names.append(where)

    @property
    def skipped(self) -> int:
        return (self.empty_documents + self.non_utf8_documents + self.bad_json_lines
                + self.missing_text_field + self.unparsable_modules)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        lines = [f"{self.documents} documents ({self.characters} characters) from {self.files} files"]
        for kind in ("empty_documents", "non_utf8_documents", "bad_json_lines", "missing_text_field",
                     "unparsable_modules", "skipped_files", "corrupt_files", "empty_files"):
            count = getattr(self, kind)
            if count:
                where = ", ".join(self.examples.get(kind, []))
                lines.append(f"skipped {count} {kind.replace('_', ' ')}" + (f" (e.g. {where})" if where else ""))
        return "; ".join(lines)


@dataclass
class SourceConfig:
    text_field: str = "text"      # JSON key of the document in .jsonl records
    txt_split: str = "file"       # "file" or "blank_line"
    normalize: str = "NFC"        # unicode normal form applied to every document, or "none"
    stdlib_limit: int | None = None  # read only the first N stdlib modules (tests, quick runs)
    # JSONL fields that form one multi-segment sample each (e.g. ["label", "text"]); documents
    # are then tuples of their values: text, or an integer label index. Empty: plain documents.
    segments: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.txt_split not in TXT_SPLITS:
            raise ValueError(f"txt_split must be one of {TXT_SPLITS}; got {self.txt_split!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {self.normalize!r}")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty JSON key")
        self.segments = list(self.segments)
        if len(set(self.segments)) != len(self.segments) or not all(self.segments) or len(self.segments) > 255:
            raise ValueError(f"segments must be distinct non-empty JSON keys (at most 255); got {self.segments!r}")


def _kind(path: Path) -> tuple[str, str] | None:
    """(format, compression) from the file name, or None for unknown suffixes."""
    name = path.name.lower()
    for compression in _COMPRESSIONS:
        for suffix in _SUFFIXES:
            if name.endswith(suffix + compression):
                return suffix, compression
    return None


def resolve_inputs(inputs) -> list[str | Path]:
    """Expand directories (recursively, sorted) into files; keep the word ``stdlib`` as is."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    resolved: list[str | Path] = []
    for item in inputs:
        if str(item) == STDLIB:
            resolved.append(STDLIB)
            continue
        path = Path(item)
        if path.is_dir():
            resolved.extend(sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: str(p)))
        elif path.is_file():
            if _kind(path) is None:
                raise ValueError(f"{path}: unknown input format; expected .txt or .jsonl, optionally .gz/.zst")
            resolved.append(path)
        else:
            raise ValueError(f"input {str(item)!r} is neither a file, a directory nor the word {STDLIB!r}")
    if not resolved:
        raise ValueError(f"no input files found in {list(map(str, inputs))}")
    return resolved


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a (multi-frame) .zst file. zstandard's own stream_reader ends
    quietly on a truncated frame; this raises EOFError instead, as gzip does."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._context = zstandard.ZstdDecompressor()
        self._frame = None
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            chunk = self._file.read(1 << 20)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("zstandard stream ended before the end of its last frame (truncated)")
                return 0
            self._pending, self._offset = self._decompress(chunk), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = memoryview(self._pending)[self._offset:self._offset + n]
        self._offset += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._frame is None or self._frame.eof:
                self._frame = self._context.decompressobj()
            out.append(self._frame.decompress(chunk))
            chunk = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)  # gzip.BadGzipFile is an OSError


def _open_binary(path: Path, compression: str):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


def _readable_size(path: Path, compression: str) -> int:
    """Decompressed size; raises one of _DECOMPRESSION_ERRORS for a truncated or corrupt file.
    Decompressing twice costs little next to tokenizing, and lets a bad file be skipped whole."""
    if not compression:
        return path.stat().st_size
    size = 0
    with _open_binary(path, compression) as stream:
        while block := stream.read(1 << 20):
            size += len(block)
    return size


def _txt_chunks(stream, txt_split: str) -> Iterator[bytes]:
    if txt_split == "file":
        yield stream.read()
        return
    block: list[bytes] = []
    for line in stream:
        if line.strip():
            block.append(line)
        elif block:
            yield b"".join(block)
            block = []
    if block:
        yield b"".join(block)


def _clean(raw: bytes | str, where: str, config: SourceConfig, stats: SourceStats) -> str | None:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.note("non_utf8_documents", where)
            return None
    if config.normalize != "none":
        raw = unicodedata.normalize(config.normalize, raw)
    text = raw.strip()
    if not text:
        stats.note("empty_documents", where)
        return None
    stats.documents += 1
    stats.characters += len(text)
    return text


def _file_documents(path: Path, config: SourceConfig, stats: SourceStats) -> Iterator[str]:
    suffix, compression = _kind(path)
    stats.files += 1
    try:
        size = _readable_size(path, compression)
    except _DECOMPRESSION_ERRORS as error:
        stats.note("corrupt_files", f"{path} ({type(error).__name__}: {error})")
        return
    if size == 0:
        stats.note("empty_files", str(path))
        return
    with _open_binary(path, compression) as stream:
        if suffix == ".txt":
            for chunk in _txt_chunks(stream, config.txt_split):
                text = _clean(chunk, str(path), config, stats)
                if text is not None:
                    yield text
            return
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                stats.note("non_utf8_documents", where)
                continue
            except ValueError:
                stats.note("bad_json_lines", where)
                continue
            if config.segments:
                values = _segment_values(record, where, config, stats)
                if values is not None:
                    yield values
                continue
            value = record.get(config.text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                stats.note("missing_text_field", where)
                continue
            text = _clean(value, where, config, stats)
            if text is not None:
                yield text


def _segment_values(record, where: str, config: SourceConfig, stats: SourceStats) -> tuple | None:
    """The record's segment fields in order: text (normalised, may be empty) or a label index
    (an integer >= 0, stored as that sentinel token); None (counted) when a field is missing."""
    values = []
    for name in config.segments:
        value = record.get(name) if isinstance(record, dict) else None
        if isinstance(value, str):
            value = unicodedata.normalize(config.normalize, value) if config.normalize != "none" else value
            value = value.strip()
        elif not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            stats.note("missing_text_field", f"{where} ({name!r})")
            return None
        values.append(value)
    stats.documents += 1
    stats.characters += sum(len(v) for v in values if isinstance(v, str))
    return tuple(values)


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _module_docstrings(source: bytes) -> list[str]:
    tree = ast.parse(source)
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, nodes) and (doc := ast.get_docstring(node))]


def _stdlib_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
    files = stdlib_files()
    if config.stdlib_limit is not None:
        files = files[:config.stdlib_limit]
    if not files:
        raise ValueError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}")
    for path in files:
        stats.files += 1
        try:
            docstrings = _module_docstrings(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            stats.note("unparsable_modules", str(path))
            continue
        text = _clean("\n\n".join(docstrings), str(path), config, stats)
        if text is not None:
            yield text


def iter_documents(inputs, config: SourceConfig | None = None,
                   stats: SourceStats | None = None) -> Iterator[str | tuple]:
    """Documents of every input in order (tuples of segment values when config.segments is set).
    Pass `stats` to read the counters afterwards."""
    config = config or SourceConfig()
    stats = stats if stats is not None else SourceStats()
    for item in resolve_inputs(inputs):
        if config.segments and (item == STDLIB or (_kind(item) or ("",))[0] == ".txt"):
            raise ValueError(f"input {item}: segments ({', '.join(config.segments)}) are read from .jsonl files only")
        if item == STDLIB:
            yield from _stdlib_documents(config, stats)
        elif _kind(item) is None:
            stats.note("skipped_files", str(item))
        else:
            yield from _file_documents(item, config, stats)
