import json
import subprocess
import sys

import numpy as np
import pytest


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipeline", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("command", [[], ["tokenizer"], ["shards"], ["inspect"], ["demo"]])
def test_every_command_has_help(command):
    result = _cli(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_tokenizer_shards_inspect_end_to_end(tmp_path):
    rng = np.random.default_rng(3)
    words = "data flows one way from raw text to token shards and then to the model".split()
    (tmp_path / "raw" / "sub").mkdir(parents=True)
    (tmp_path / "raw" / "a.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(80)))
    (tmp_path / "raw" / "sub" / "b.jsonl").write_text(
        "".join(json.dumps({"content": " ".join(rng.choice(words, 20))}) + "\n" for _ in range(80)))
    common = ["--input", tmp_path / "raw", "--txt-split", "blank_line", "--text-field", "content"]
    result = _cli("tokenizer", *common, "--vocab-size", 280, "--sentinels", 2, "--output", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "tok" / "biglearn_tokenizer.json").read_text())["sentinel_ids"] == [4, 5]
    result = _cli("shards", *common, "--tokenizer", tmp_path / "tok", "--seq-len", 48, "--workers", 1,
                  "--output", tmp_path / "ds")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["sources"]["documents"] == 160 and manifest["seq_len"] == 48
    result = _cli("inspect", tmp_path / "ds" / "manifest.json", "--examples", 1)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK")
    assert _cli("shards", "--tokenizer", tmp_path / "tok", "--output", tmp_path / "x").returncode != 0  # no input


def test_bad_input_is_one_clear_line(tmp_path):
    (tmp_path / "one.txt").write_text("a single line")
    result = _cli("tokenizer", "--input", tmp_path / "one.txt", "--vocab-size", 300, "--output", tmp_path / "t")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m data_pipeline: error: sentencepiece could not train")
    assert "Traceback" not in result.stderr


def test_data_pipeline_needs_no_torch():
    code = ("import sys, data_pipeline, data_pipeline.__main__, data_pipeline.inspection; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
