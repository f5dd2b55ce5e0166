"""SLURM node lists -> DeepSpeed hostfile, master address and port.

SLURM hands a job its nodes as a compressed expression (SLURM_JOB_NODELIST), e.g.
``gpu[001-004,007],login1`` or ``rack[1-2]-gpu[01-02]``. The DeepSpeed launcher wants an
MPI-style hostfile (``host slots=N`` per line) and every rank needs the same MASTER_ADDR and
MASTER_PORT. This module does both without calling ``scontrol``, so it also runs (and is
tested) off-cluster.

    python -m launch.hostfile expand 'gpu[001-004,007]'
    python -m launch.hostfile write 'gpu[001-004]' --slots 8 --output hostfile
    python -m launch.hostfile master 'gpu[001-004]' --job-id 123456
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

from data_pipeline.errors import add_debug_flag, cli_main

# Literal parts of a host name (letters, digits, '.', '_', '-'); anything else is an error,
# which also keeps the names safe to splice into shell commands.
_LITERAL = re.compile(r"[A-Za-z0-9._-]+")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
MAX_HOSTS = 65536  # a typo such as [1-1000000000] must fail fast, not eat memory

# Ports below 1024 need root; Linux hands out ephemeral ports from 32768 up
# (net.ipv4.ip_local_port_range), so a fixed listener there can collide with any client socket.
PORT_BASE = 20000
PORT_SPAN = 10000
DEFAULT_PORT = 29500  # torch.distributed's default, used when there is no job id


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"node list {expr!r}: nested '[' at offset {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {expr!r}: unmatched ']' at offset {i}")
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"node list {expr!r}: unclosed '['")
    items.append(expr[start:])
    return items


def _expand_ranges(body: str, expr: str) -> list[str]:
    """'001-003,7' -> ['001', '002', '003', '7']; zero padding follows the lower bound's width."""
    if not body:
        raise ValueError(f"node list {expr!r}: empty brackets '[]'")
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise ValueError(f"node list {expr!r}: bad range {part!r} inside [{body}]")
        lo_text, hi_text = m.group(1), m.group(2)
        lo = int(lo_text)
        hi = lo if hi_text is None else int(hi_text)
        if hi < lo:
            raise ValueError(f"node list {expr!r}: range {part!r} runs backwards")
        if hi - lo + 1 > MAX_HOSTS:
            raise ValueError(f"node list {expr!r}: range {part!r} has more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        out.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return out


def _check_literal(text: str, expr: str) -> str:
    if not _LITERAL.fullmatch(text):
        raise ValueError(f"node list {expr!r}: invalid characters in {text!r}")
    return text


def _expand_item(item: str, expr: str) -> list[str]:
    """One comma-free item, e.g. 'rack[1-2]-gpu[01-02]' -> cartesian product, last group fastest."""
    if not item:
        raise ValueError(f"node list {expr!r}: empty host name (stray comma?)")
    pieces: list[list[str]] = []
    pos = 0
    for m in re.finditer(r"\[([^\]]*)\]", item):
        if m.start() > pos:
            pieces.append([_check_literal(item[pos:m.start()], expr)])
        pieces.append(_expand_ranges(m.group(1), expr))
        pos = m.end()
    if pos < len(item):
        pieces.append([_check_literal(item[pos:], expr)])
    n_hosts = 1
    for p in pieces:
        n_hosts *= len(p)
    if n_hosts > MAX_HOSTS:
        raise ValueError(f"node list {expr!r}: item {item!r} expands to more than {MAX_HOSTS} hosts")
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(expr: str) -> list[str]:
    """Expand a SLURM node-list expression into host names, in SLURM's order.

    >>> expand_nodelist("gpu[001-003,007],cpu1")
    ['gpu001', 'gpu002', 'gpu003', 'gpu007', 'cpu1']

    Raises ValueError naming the expression when it is malformed.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"node list {expr!r} is empty")
    if expr != expr.strip() or any(ch.isspace() for ch in expr):
        raise ValueError(f"node list {expr!r} contains whitespace")
    hosts: list[str] = []
    for item in _split_top_level(expr):
        hosts.extend(_expand_item(item, expr))
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"node list {expr!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def hostfile_text(hosts: list[str], slots: int) -> str:
    """MPI-style hostfile, one ``host slots=N`` line per node (DeepSpeed's format)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if not hosts:
        raise ValueError("hostfile needs at least one host")
    seen = set()
    for h in hosts:
        if h in seen:
            raise ValueError(f"host {h!r} appears twice; DeepSpeed rejects duplicate hostfile entries")
        seen.add(h)
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def master_port(job_id: str | int | None, override: int | None = None) -> int:
    """Rendezvous port: the override if given, else PORT_BASE + job_id mod PORT_SPAN.

    Deriving it from the job id keeps it identical on every node with no communication, and
    two jobs sharing a node (consecutive ids) get different ports.
    """
    if override is not None:
        if not 1024 <= override <= 65535:
            raise ValueError(f"master port {override} outside 1024-65535")
        return override
    if job_id is None or str(job_id) == "":
        return DEFAULT_PORT
    if not str(job_id).isdigit():
        raise ValueError(f"job id {job_id!r} is not a number")
    return PORT_BASE + int(job_id) % PORT_SPAN


def _parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Expand SLURM node lists, write DeepSpeed hostfiles, pick MASTER_ADDR/PORT.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("expand", help="print one host per line")
    p.add_argument("nodelist", help="SLURM node list, e.g. 'gpu[001-004,007]'")
    p = sub.add_parser("write", help="write a DeepSpeed hostfile ('host slots=N' lines)")
    p.add_argument("nodelist")
    p.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    p.add_argument("--output", type=Path, required=True, help="hostfile path (parents are created)")
    p = sub.add_parser("master", help="print 'MASTER_ADDR MASTER_PORT' (first node, port from job id)")
    p.add_argument("nodelist")
    p.add_argument("--job-id", default=None, help="SLURM job id the port is derived from")
    p.add_argument("--port", type=int, default=None, help="use this port instead of deriving one")
    for command in sub.choices.values():
        add_debug_flag(command)
    return parser.parse_args(argv)


def _main(argv: list[str], prog: str) -> int:
    args = _parse_args(argv, prog)
    hosts = expand_nodelist(args.nodelist)
    if args.command == "expand":
        print("\n".join(hosts))
    elif args.command == "write":
        text = hostfile_text(hosts, args.slots)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        print(hosts[0], master_port(args.job_id, args.port))
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m launch.hostfile") -> int:
    # Every ValueError here names the malformed node-list expression or port.
    return cli_main(lambda args: _main(args, prog), prog, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
