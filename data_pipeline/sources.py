"""Raw text sources -> a stream of documents (str).

Inputs are files, directories (searched recursively; `include` / `exclude` globs choose among
their files) or the word ``stdlib``. Any file that holds UTF-8 text is read, whatever its name:

- ``.jsonl``: one JSON object per line, the document is ``record[text_field]``;
- every other name (``.txt``, ``README``, ``copyright``, ``NEWS.md`` ...): one document per file
  (``txt_split="file"``) or one per blank-line separated paragraph block (``txt_split="blank_line"``);
- either of them compressed: ``.gz`` (gzip) or ``.zst`` (zstandard), whatever the inner name;
- ``stdlib``: the docstrings of the installed Python standard library, one document per module,
  harvested with ``ast`` from the source files (nothing is imported, so no module runs).

What a file holds is sniffed from its first 8 KiB (after decompression): a file with NUL bytes
or a known binary signature (ELF, PNG, zip, ...), or, unless named .txt / .jsonl, one whose
first bytes are not UTF-8, is skipped whole and counted by kind (`SourceStats.skipped_kinds`).

Bad input never stops a run: documents that are not valid UTF-8, empty documents, JSON lines
that do not parse or lack the text field, stdlib files that do not parse, and compressed files
that are truncated or corrupt (checked by decompressing them once before any document is used,
so such a file is skipped whole) are skipped and counted in a :class:`SourceStats`; files that
hold no bytes at all, compressed or not, are counted as ``empty_files``. ``stats.report()`` says
what was skipped and where, and ``stats.warning()`` speaks up when more than half the input
files were skipped.
"""
from __future__ import annotations

import ast
import codecs
import fnmatch
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
_FORMATS = (".txt", ".jsonl")  # names that declare a format; every other name is read as text
_COMPRESSIONS = (".gz", ".zst")
_SNIFF_BYTES = 8192
_MAX_EXAMPLES = 5  # file names kept per problem kind, for the report
# Leading bytes of files that are not text, and what to call them in the report.
_SIGNATURES = ((b"\x7fELF", "ELF executable or library"), (b"\x89PNG", "PNG image"), (b"\xff\xd8\xff", "JPEG image"),
               (b"GIF8", "GIF image"), (b"%PDF", "PDF document"), (b"PK\x03\x04", "zip archive"),
               (b"\x1f\x8b", "gzip data not named .gz"), (b"\x28\xb5\x2f\xfd", "zstandard data not named .zst"),
               (b"BZh", "bzip2 data"), (b"\xfd7zXZ\x00", "xz data"), (b"SQLite format 3\x00", "SQLite database"),
               (b"\xde\x12\x04\x95", "gettext catalogue"), (b"\x95\x04\x12\xde", "gettext catalogue"),
               (b"\xff\xfe", "UTF-16 text"), (b"\xfe\xff", "UTF-16 text"))


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
    skipped_files: int = 0  # files skipped whole because they are not text, by kind in skipped_kinds
    skipped_kinds: dict[str, int] = field(default_factory=dict)
    excluded_files: int = 0  # files of a searched directory left out by the include / exclude globs
    corrupt_files: int = 0  # truncated or corrupt .gz/.zst files, skipped whole
    empty_files: int = 0    # files (after decompression) without a single byte
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self._example(kind, where)

    def skip_file(self, kind: str, where: str) -> None:
        """A file skipped whole because it is not text; `kind` says what it is instead."""
        self.skipped_files += 1
        self.skipped_kinds[kind] = self.skipped_kinds.get(kind, 0) + 1
        self._example(kind, where)

    def _example(self, kind: str, where: str) -> None:
        names = self.examples.setdefault(kind, [])
        if len(names) < _MAX_EXAMPLES and where not in names:
            names.append(where)

    @property
    def skipped(self) -> int:
        return (self.empty_documents + self.non_utf8_documents + self.bad_json_lines
                + self.missing_text_field + self.unparsable_modules)

    def to_dict(self) -> dict:
        return asdict(self)

    def _examples_of(self, kind: str) -> str:
        where = ", ".join(self.examples.get(kind, []))
        return f" (e.g. {where})" if where else ""

    def report(self, separator: str = "; ") -> str:
        """What was read, then each kind of skip with its count and a few examples, one part per kind."""
        parts = [f"{self.documents} documents ({self.characters} characters) from {self.files} files"]
        if self.skipped_kinds:
            kinds = sorted(self.skipped_kinds.items(), key=lambda item: (-item[1], item[0]))
            parts.append(f"skipped {self.skipped_files} files that are not text: " + ", ".join(
                f"{count} {kind}{self._examples_of(kind)}" for kind, count in kinds))
        elif self.skipped_files:  # a manifest written before kinds were counted
            parts.append(f"skipped {self.skipped_files} files{self._examples_of('skipped_files')}")
        if self.excluded_files:
            parts.append(f"left out {self.excluded_files} files by the include / exclude globs")
        for kind in ("empty_documents", "non_utf8_documents", "bad_json_lines", "missing_text_field",
                     "unparsable_modules", "corrupt_files", "empty_files"):
            count = getattr(self, kind)
            if count:
                parts.append(f"skipped {count} {kind.replace('_', ' ')}{self._examples_of(kind)}")
        return separator.join(parts)

    def warning(self) -> str | None:
        """A loud line when more than half the input files were skipped (not text, corrupt or
        empty): usually the wrong directory, or one that needs --include / --exclude."""
        skipped = self.skipped_files + self.corrupt_files + self.empty_files
        total = self.files + self.skipped_files
        if total == 0 or 2 * skipped <= total:
            return None
        return (f"WARNING: {skipped} of {total} input files ({100 * skipped / total:.0f}%) were skipped and gave no "
                f"text; check the inputs, or choose files with --include / --exclude (the kinds are listed above)")


@dataclass
class SourceConfig:
    text_field: str = "text"      # JSON key of the document in .jsonl records
    txt_split: str = "file"       # "file" or "blank_line"
    normalize: str = "NFC"        # unicode normal form applied to every document, or "none"
    stdlib_limit: int | None = None  # read only the first N stdlib modules (tests, quick runs)
    # JSONL fields that form one multi-segment sample each (e.g. ["label", "text"]); documents
    # are then tuples of their values: text, or an integer label index. Empty: plain documents.
    segments: list[str] = field(default_factory=list)
    # Globs choosing among the files of a searched directory (a glob with "/" matches the path
    # below the directory, one without matches the file name): include (any; empty = all), then exclude.
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

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
        self.include, self.exclude = list(self.include), list(self.exclude)


def _compression(path: Path) -> str:
    name = path.name.lower()
    return next((c for c in _COMPRESSIONS if name.endswith(c)), "")


def _inner_name(path: Path) -> str:
    """The file's name without its .gz / .zst suffix, lower case."""
    name = path.name.lower()
    return name[:len(name) - len(_compression(path))]


def _declared_format(path: Path) -> str | None:
    """.txt or .jsonl when the (inner) name says so, else None (the file is sniffed, read as text)."""
    return next((f for f in _FORMATS if _inner_name(path).endswith(f)), None)


def _selected(relative: str, config: SourceConfig) -> bool:
    def matches(pattern: str) -> bool:
        return fnmatch.fnmatchcase(relative if "/" in pattern else relative.rpartition("/")[2], pattern)

    return (not config.include or any(map(matches, config.include))) and not any(map(matches, config.exclude))


def resolve_inputs(inputs, config: SourceConfig | None = None, stats: SourceStats | None = None) -> list[str | Path]:
    """Expand directories (recursively, sorted) into the files the include / exclude globs of
    `config` select (the others are counted in stats.excluded_files); keep files and the word
    ``stdlib`` as they are."""
    config = config or SourceConfig()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    resolved: list[str | Path] = []
    for item in inputs:
        if str(item) == STDLIB:
            resolved.append(STDLIB)
            continue
        path = Path(item)
        if path.is_dir():
            for file in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: str(p)):
                if _selected(file.relative_to(path).as_posix(), config):
                    resolved.append(file)
                elif stats is not None:
                    stats.excluded_files += 1
        elif path.is_file():
            resolved.append(path)
        else:
            raise ValueError(f"input {str(item)!r} is neither a file, a directory nor the word {STDLIB!r}")
    if not resolved:
        where = list(map(str, inputs))
        if config.include or config.exclude:
            raise ValueError(f"no input files in {where} match --include {config.include} / --exclude {config.exclude}")
        raise ValueError(f"no input files found in {where}")
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


def _not_text(head: bytes, declared: bool) -> str | None:
    """What the first bytes of a file show it to be when it is not text (a kind for the report),
    else None. A file named .txt / .jsonl is read even if not all UTF-8 (its bad documents are
    counted one by one); any other name must start as UTF-8 text."""
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if b"\x00" in head:
        return "binary data (NUL bytes)"
    if not declared:
        try:  # a character cut by the end of the window is not an error
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
        except UnicodeDecodeError:
            return "not UTF-8 (another encoding, or binary)"
    return None


def _file_documents(path: Path, config: SourceConfig, stats: SourceStats) -> Iterator[str]:
    compression, declared = _compression(path), _declared_format(path)
    try:
        with _open_binary(path, compression) as stream:
            head = stream.read(_SNIFF_BYTES)
        kind = _not_text(head, declared is not None)
        size = _readable_size(path, compression) if kind is None else 0
    except _DECOMPRESSION_ERRORS as error:
        stats.files += 1
        stats.note("corrupt_files", f"{path} ({type(error).__name__}: {error})")
        return
    if kind is not None:
        stats.skip_file(f"{kind} (in {compression} file)" if compression else kind, str(path))
        return
    stats.files += 1
    if size == 0:
        stats.note("empty_files", str(path))
        return
    with _open_binary(path, compression) as stream:
        if declared != ".jsonl":
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
    named = {Path(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs) if str(i) != STDLIB}
    for item in resolve_inputs(inputs, config, stats):
        if config.segments and (item == STDLIB or _declared_format(item) != ".jsonl"):
            if item == STDLIB or item in named:
                raise ValueError(f"input {item}: segments ({', '.join(config.segments)}) are read from .jsonl files only")
            stats.skip_file("not .jsonl (segments are read from .jsonl files)", str(item))
        elif item == STDLIB:
            yield from _stdlib_documents(config, stats)
        else:
            yield from _file_documents(item, config, stats)
