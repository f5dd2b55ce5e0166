"""`biglearn score / complete` with flags out of range, as a user types them (a table): one `error:`
line naming the flag, exit 2, before anything the size of the request is allocated (a request
sized 1e8 is refused by its memory estimate, stating it); a result that is not a number is
flagged, exit 1, instead of being printed as one (docs/reliability.md)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

SCORE = "biglearn score --model {model} "
COMPLETE = "biglearn complete --model {model} "
# id, the command's flags, exit status, what the error line names
CASES = [
    ("ids-above-vocab", SCORE + '--ids "5 99999"', 2, ["--ids", "99999", "vocab_size=512"]),
    ("ids-negative", SCORE + '--ids "5 -3"', 2, ["--ids", "-3"]),
    ("ids-not-numbers", SCORE + '--ids "five six"', 2, ["--ids"]),
    ("orders-1e8", SCORE + '--ids "5 6 7" --orders 100000000', 2, ["--orders 100000000", "available"]),
    ("orders-negative", SCORE + '--ids "5 6 7" --orders -2', 2, ["--orders"]),
    ("device-cuda", SCORE + '--ids "5 6" --device cuda', 2, ["--device cuda"]),
    ("device-unknown", SCORE + '--ids "5 6" --device tpu7', 2, ["--device"]),
    ("gap-1e9", COMPLETE + '--text "a [___:1000000000] b"', 2, ["[___:1000000000]", "max_seq_len=64"]),
    ("continue-1e12", COMPLETE + '--text "a b" --continue 1000000000000', 2, ["--continue", "max_seq_len=64"]),
    ("gaps-1e9", COMPLETE + '--text "a b" --gaps 0:1000000000', 2, ["--gaps", "max_seq_len=64"]),
    ("gap-len-zero", COMPLETE + '--text "a [___] b" --gap-len 0', 2, ["--gap-len"]),
    ("num-samples-1e8", COMPLETE + '--text "a [___] b" --num-samples 100000000', 2,
     ["--num-samples 100000000", "available"]),
    ("num-samples-zero", COMPLETE + '--text "a [___] b" --num-samples 0', 2, ["--num-samples"]),
]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] != "device-cuda"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flags_out_of_range_are_refused_in_one_line(case, cli, tiny_export):
    _, command, status, names = case
    cli(command.format(model=tiny_export)).refused(status, *names)


@pytest.fixture(scope="module")
def overflowing_export(tiny_export, tmp_path_factory):
    """Finite weights whose logits overflow to inf: an output head of 3e38 per entry."""
    copy = tmp_path_factory.mktemp("overflow") / "model"
    shutil.copytree(tiny_export, copy)
    state = load_file(str(copy / "model.safetensors"))
    state["head.weight"] = torch.full_like(state["head.weight"], 3e38)
    save_file(state, str(copy / "model.safetensors"))
    return copy


@pytest.mark.parametrize("command", [SCORE + '--ids "5 6 7"', COMPLETE + '--text "a [___] b" --temperature 0',
                                     "biglearn eval ckpt={model} manifest={manifest} batches=1 tasks=[mlm]"])
def test_a_result_that_is_not_a_number_is_flagged(command, cli, overflowing_export, manifest):
    ran = cli(command.format(model=overflowing_export, manifest=manifest))
    ran.refused(1, "not finite")
    assert ran.stdout.strip(), "the result is still printed"
