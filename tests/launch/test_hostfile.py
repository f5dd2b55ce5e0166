"""Node-list expansion, hostfile text and master port selection (launch/hostfile.py)."""

import random
import re

import pytest

from launch.hostfile import PORT_BASE, PORT_SPAN, expand_nodelist, hostfile_text, main, master_port

# Real-world node-list forms, each with its expansion written out by hand.
CASES = [
    ("gpu001", ["gpu001"]),
    ("gpu[001-004]", ["gpu001", "gpu002", "gpu003", "gpu004"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("gpu[1-2,10-11]", ["gpu1", "gpu2", "gpu10", "gpu11"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),             # width grows past 9
    ("gpu[09-11]", ["gpu09", "gpu10", "gpu11"]),                        # zero padding kept
    ("gpu[5]", ["gpu5"]),
    ("gpu[7,3]", ["gpu7", "gpu3"]),                                     # SLURM order, not sorted
    ("a[1-2],b[3-4],c", ["a1", "a2", "b3", "b4", "c"]),                # several prefixes
    ("login1,login2", ["login1", "login2"]),                            # plain comma list
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("nid00[1-3]", ["nid001", "nid002", "nid003"]),                     # zeros in the prefix
    ("n[1-2].ib.cluster", ["n1.ib.cluster", "n2.ib.cluster"]),         # suffix after brackets
    ("x1000c0s[0-1]b0n[0-1]", ["x1000c0s0b0n0", "x1000c0s0b0n1", "x1000c0s1b0n0", "x1000c0s1b0n1"]),
    ("queue1-dy-p4d24xlarge-[1-3]", ["queue1-dy-p4d24xlarge-1", "queue1-dy-p4d24xlarge-2",
                                      "queue1-dy-p4d24xlarge-3"]),   # AWS ParallelCluster
    ("gpu[001-002],cpu[1-2],gpu010", ["gpu001", "gpu002", "cpu1", "cpu2", "gpu010"]),
    ("r[1-2]n[08-09]x", ["r1n08x", "r1n09x", "r2n08x", "r2n09x"]),
]


@pytest.mark.parametrize("expr,expected", CASES)
def test_expand_known_forms(expr, expected):
    assert expand_nodelist(expr) == expected


MALFORMED = [
    "", "gpu[1-", "gpu1-2]", "gpu[]", "gpu[a-b]", "gpu[3-1]", "gpu[1-2", "gpu[[1]]",
    "gpu[1-2],,cpu", ",gpu1", "gpu1,", "gpu 1", " gpu1", "gpu[1-2-3]", "gpu$1", "gpu[1,]",
    "gpu[-1]", "gpu[0-99999999]", "gpu[1-300]x[1-300]",
]


@pytest.mark.parametrize("expr", MALFORMED)
def test_malformed_raises_naming_expression(expr):
    with pytest.raises(ValueError, match=re.escape(repr(expr))):
        expand_nodelist(expr)


def _compress(hosts):
    """An independent compressor: group names by (prefix, digit width) and write runs of
    consecutive numbers as a-b ranges, the way SLURM prints SLURM_JOB_NODELIST."""
    groups = {}
    for h in hosts:
        m = re.fullmatch(r"(.*?)(\d+)", h)
        groups.setdefault((m.group(1), len(m.group(2))), []).append(int(m.group(2)))
    items = []
    for (prefix, width), nums in groups.items():
        runs, start = [], nums[0]
        for prev, cur in zip(nums, nums[1:] + [None]):
            if cur != prev + 1:
                runs.append(f"{start:0{width}d}" + ("" if prev == start else f"-{prev:0{width}d}"))
                start = cur
        items.append(f"{prefix}[{','.join(runs)}]")
    return ",".join(items)


def test_expand_inverts_random_compressed_lists():
    rng = random.Random()
    for _ in range(200):
        hosts = []
        for group in range(rng.randint(1, 3)):  # distinct prefixes, numbers sorted within each
            prefix = rng.choice(["gpu", "node-", "a100n", "r7c"]) + f"{group}x"
            width = rng.randint(1, 4)
            nums = sorted(rng.sample(range(10 ** width), min(rng.randint(1, 30), 10 ** width)))
            hosts += [f"{prefix}{n:0{width}d}" for n in nums]
        expr = _compress(hosts)
        assert expand_nodelist(expr) == hosts, expr


def test_hostfile_text_parses_with_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile

    hosts = expand_nodelist("gpu[001-004,007]")
    text = hostfile_text(hosts, 8)
    assert text == "".join(f"{h} slots=8\n" for h in hosts)
    assert dict(_parse_hostfile(text.splitlines(keepends=True))) == {h: 8 for h in hosts}


def test_hostfile_rejects_duplicates_and_bad_slots():
    with pytest.raises(ValueError, match="gpu1"):
        hostfile_text(expand_nodelist("gpu[1,1]"), 8)
    with pytest.raises(ValueError, match="slots"):
        hostfile_text(["gpu1"], 0)


def test_master_port():
    rng = random.Random()
    for _ in range(100):
        job = rng.randint(1, 10 ** 9)
        port = master_port(job)
        assert port == master_port(str(job))                      # same on every node
        assert PORT_BASE <= port < PORT_BASE + PORT_SPAN < 32768  # below the ephemeral range
        assert master_port(job + 1) != port                       # neighbours differ
    assert master_port(123456) == PORT_BASE + 3456
    assert master_port(123456, override=31000) == 31000
    assert master_port(None) == 29500
    with pytest.raises(ValueError, match="abc"):
        master_port("abc")
    with pytest.raises(ValueError, match="80"):
        master_port(1, override=80)


def test_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "hostfile"
    assert main(["write", "n[1-2]", "--slots", "4", "--output", str(out)]) == 0
    assert out.read_text() == "n1 slots=4\nn2 slots=4\n"
    assert main(["master", "n[1-2]", "--job-id", "77"]) == 0
    assert main(["expand", "n[3-4]"]) == 0
    assert capsys.readouterr().out == f"n1 {PORT_BASE + 77}\nn3\nn4\n"
    assert main(["expand", "n[4-3]"]) == 2
    assert "n[4-3]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
