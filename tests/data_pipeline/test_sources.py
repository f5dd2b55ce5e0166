import gzip
import json
import sys

import pytest
import zstandard

from data_pipeline.sources import SourceConfig, SourceStats, iter_documents, stdlib_files

DOCS = ["First document.\nIt has two lines.", "Second — with a dash and ünïcode.", "Third one"]


def _read(inputs, **config):
    stats = SourceStats()
    return list(iter_documents(inputs, SourceConfig(**config), stats)), stats


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_txt_and_jsonl_formats_give_the_same_documents(tmp_path, compression):
    def write(name, data: bytes):
        path = tmp_path / (name + compression)
        if compression == ".gz":
            data = gzip.compress(data)
        elif compression == ".zst":
            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
        return path

    blank = write("corpus.txt", "\n\n".join(DOCS).encode())
    jsonl = write("corpus.jsonl", "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)).encode())
    assert _read([blank], txt_split="blank_line")[0] == DOCS
    assert _read([jsonl], text_field="body")[0] == DOCS
    whole, stats = _read([blank], txt_split="file")
    assert whole == ["\n\n".join(DOCS)] and stats.files == 1 and stats.documents == 1


def test_directories_are_searched_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "notes.md").write_text("three")
    docs, stats = _read([tmp_path])
    assert docs == ["one", "two", "three"] and stats.files == 3 and stats.skipped_files == 0


def test_any_utf8_file_is_read_and_binary_files_are_skipped_by_kind(tmp_path):
    """What a Linux distribution's doc directories hold: copyright files without a suffix,
    README.gz, and the odd binary. Each text file is read, the binary is counted by kind."""
    (tmp_path / "copyright").write_text("Copyright 2026 someone.\nLicensed under the terms below.")
    (tmp_path / "README.gz").write_bytes(gzip.compress("A readme, compressed.".encode()))
    (tmp_path / "tool").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8)
    docs, stats = _read([tmp_path])
    assert docs == ["A readme, compressed.", "Copyright 2026 someone.\nLicensed under the terms below."]
    assert stats.files == 2 and stats.skipped_files == 1
    assert stats.skipped_kinds == {"ELF executable or library": 1}
    assert f"skipped 1 files that are not text: 1 ELF executable or library (e.g. {tmp_path / 'tool'})" in stats.report()
    assert stats.warning() is None  # 1 of 3 skipped


@pytest.mark.parametrize("name, content, kind", [
    ("notes", "caf\xe9 cr\xe8me".encode("latin-1"), "not UTF-8 (another encoding, or binary)"),
    ("data.bin", b"abc\x00def", "binary data (NUL bytes)"),
    ("image", b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
    ("archive.gz", gzip.compress(b"PK\x03\x04" + bytes(100)), "zip archive (in .gz file)"),
    ("utf16.txt", "text".encode("utf-16"), "UTF-16 text"),
])
def test_files_that_are_not_text_are_named_by_kind(tmp_path, name, content, kind):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "good").write_text("fine")
    docs, stats = _read([tmp_path])
    assert docs == ["fine"] and stats.skipped_kinds == {kind: 1} and stats.examples[kind] == [str(tmp_path / name)]


def test_a_utf8_character_cut_by_the_sniffed_window_is_still_text(tmp_path):
    text = "a" * 8191 + "é" * 10  # the window ends inside the first é
    (tmp_path / "long").write_text(text)
    assert _read([tmp_path])[0] == [text]


def test_include_and_exclude_globs_choose_the_files_of_a_directory(tmp_path):
    for name in ("a/keep.txt", "a/skip.log", "b/keep.txt", "b/notes", "c.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert _read([tmp_path], include=["*.txt"])[0] == ["a/keep.txt", "b/keep.txt"]
    assert _read([tmp_path], include=["b/*"])[0] == ["b/keep.txt", "b/notes"]
    docs, stats = _read([tmp_path], exclude=["*.log", "b/*"])
    assert docs == ["a/keep.txt", "c.md"] and stats.excluded_files == 3
    assert "left out 3 files by the include / exclude globs" in stats.report()
    with pytest.raises(ValueError, match=r"match --include \['\*.pdf'\]"):
        _read([tmp_path], include=["*.pdf"])


def test_a_build_that_skips_most_of_its_inputs_says_so_loudly(tmp_path):
    (tmp_path / "text").write_text("the only text")
    for i in range(3):
        (tmp_path / f"lib{i}.so").write_bytes(b"\x7fELF" + bytes(64))
    _, stats = _read([tmp_path])
    assert stats.warning().startswith("WARNING: 3 of 4 input files (75%) were skipped")


def test_bad_input_is_counted_not_fatal(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("   \n\n ")
    lines = [json.dumps({"text": "ok"}), "{not json", json.dumps({"other": 1}), json.dumps({"text": ""}),
             json.dumps([1, 2])]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    docs, stats = _read([tmp_path])
    assert sorted(docs) == ["fine text", "ok"]
    assert (stats.non_utf8_documents, stats.empty_documents, stats.bad_json_lines, stats.missing_text_field) == (1, 2, 1, 2)
    assert "latin1.txt" in stats.report() and "mixed.jsonl:2" in stats.report()


def test_unicode_normalisation_is_configurable(tmp_path):
    (tmp_path / "x.txt").write_text("ﬁne e\u0301")  # ligature + combining accent
    assert _read([tmp_path], normalize="NFKC")[0] == ["fine é"]
    assert _read([tmp_path], normalize="NFC")[0] == ["ﬁne é"]
    assert _read([tmp_path], normalize="none")[0] == ["ﬁne e\u0301"]
    with pytest.raises(ValueError, match="normalize"):
        SourceConfig(normalize="NFX")


def test_missing_inputs_raise_naming_the_path_and_named_files_of_any_name_are_read(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        _read([tmp_path / "nope"])
    (tmp_path / "data.csv").write_text("a,b")
    assert _read([tmp_path / "data.csv"])[0] == ["a,b"]


def test_stdlib_corpus_is_parsed_not_imported_and_deterministic():
    files = stdlib_files()
    limit = next(i for i, f in enumerate(files) if f.name == "antigravity.py") + 1  # opens a browser on import
    assert "antigravity" not in sys.modules
    first, stats = _read(["stdlib"], stdlib_limit=limit)
    second, _ = _read(["stdlib"], stdlib_limit=limit)
    assert first == second and stats.files == limit and "antigravity" not in sys.modules
    # Every document is made of the docstrings of one module: spot-check one against ast.
    import ast
    abc = next(f for f in files[:limit] if f.name == "abc.py")
    expected = "\n\n".join(d for n in ast.walk(ast.parse(abc.read_bytes()))
                           if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                           and (d := ast.get_docstring(n)))
    assert expected.strip() in first


def test_truncated_or_corrupt_compressed_files_are_skipped_whole_and_named(tmp_path):
    jsonl = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(200)).encode()
    (tmp_path / "a_good.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "b_cut.jsonl.gz").write_bytes(gzip.compress(jsonl)[:-200])
    (tmp_path / "c_plain.txt.gz").write_bytes(b"not gzip at all")
    (tmp_path / "d_cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl)[:-50])
    (tmp_path / "e_noise.jsonl.zst").write_bytes(bytes(range(256)) * 4)
    two_frames = zstandard.ZstdCompressor().compress(jsonl) + zstandard.ZstdCompressor().compress(jsonl)
    (tmp_path / "f_frames.jsonl.zst").write_bytes(two_frames)
    docs, stats = _read([tmp_path])
    expected = [json.loads(line)["text"].strip() for line in jsonl.decode().splitlines()]
    assert docs == expected * 3  # the good .gz once, both zstandard frames; nothing of the damaged files
    assert stats.corrupt_files == 4 and stats.files == 6
    report = stats.report()
    named = [entry.split(" (")[0] for entry in stats.examples["corrupt_files"]]
    assert named == [str(tmp_path / n) for n in ("b_cut.jsonl.gz", "c_plain.txt.gz", "d_cut.jsonl.zst", "e_noise.jsonl.zst")]
    assert "skipped 4 corrupt files" in report and "truncated" in report


def test_files_that_decompress_to_nothing_are_reported(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    (tmp_path / "c.txt").write_bytes(b"")
    (tmp_path / "d.txt").write_text("the only text")
    docs, stats = _read([tmp_path])
    assert docs == ["the only text"] and stats.empty_files == 3
    assert stats.examples["empty_files"] == [str(tmp_path / n) for n in ("a.jsonl.gz", "b.txt.zst", "c.txt")]
