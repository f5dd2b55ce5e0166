"""Preflight checks to run, through the same launcher, right before a long training job.

Every rank runs this module. It checks, and prints one report on rank 0:

- gpus:       GPUs visible on every node (and enough for the node's ranks);
- all-reduce: a correct sum across all ranks, and its bandwidth (NCCL on GPUs, else gloo);
- disk:       free space and write access in the output directory, on every node;
- manifest:   the shard manifest loads as training loads it (data_pipeline.manifest.load_manifest:
              every field's kind and range, shard and tokenizer paths inside the dataset
              directory unless --allow-external-shards) and every shard exists, is readable and
              has the size the manifest records ('bytes'), on every node (a stat each: cheap,
              always on); with --verify also each shard's sha256 (split across all ranks);
- samples:    the first SAMPLED samples of every shard decode as the manifest says (token dtype,
              2..seq_len tokens, ids below vocab_size, segments), and every shard holds the
              number of samples the manifest records (its tar headers, no data read);
- tokenizer:  sha256 of tokenizer.model (--tokenizer, else the copy named by the manifest's
              tokenizer.path) equals the manifest's tokenizer.file_sha256 (tokenizer.sha256 in
              manifests written before tokenizer identities).

Exit status 0 when every check passes on every rank, 1 otherwise (on all ranks).

    python -m launch.preflight --output-dir runs/x --manifest data/shards --tokenizer data/tok
    torchrun --nproc_per_node 2 -m launch.preflight --output-dir /tmp/x
    deepspeed --hostfile H --no_local_rank --module launch.preflight --expect-gpus 8 ...
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# The function the shard builder records hashes with, so both sides hash the same way, and the
# one manifest loader of the project (format, fields, shard paths inside the dataset directory).
from data_pipeline.files import contained, file_sha256
from data_pipeline.manifest import MANIFEST, load_manifest, shard_file
from data_pipeline.resources import require_memory
from data_pipeline.shard_format import ShardError, count_samples, read_shard
from data_pipeline.errors import HelpFormatter, add_debug_flag, cli_main

MAX_LISTED = 10  # failures listed per check and node before "... and N more"
SAMPLED = 16  # samples decoded per shard by the samples check


@dataclass
class Result:
    check: str
    status: str  # "PASS", "FAIL" or "SKIP"
    detail: str
    host: str = ""


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    host: str

    @property
    def node_leader(self) -> bool:
        return self.local_rank == 0


def _rank_info() -> RankInfo:
    env = os.environ
    # torchrun sets LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE.
    local_world = env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "1"))
    return RankInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                    int(local_world), socket.gethostname())


def _listed(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED])
    return shown + (f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")


# ---------------------------------------------------------------------------------- node checks

def check_gpus(info: RankInfo, expect: int | None) -> Result:
    n = torch.cuda.device_count()
    if expect is not None and n != expect:
        return Result("gpus", "FAIL", f"{n} GPU(s) visible, expected {expect}")
    if n and n < info.local_world_size:
        return Result("gpus", "FAIL", f"{n} GPU(s) visible for {info.local_world_size} ranks on this node")
    if n == 0:
        return Result("gpus", "PASS", "0 GPUs visible (CPU run)")
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    return Result("gpus", "PASS", f"{n} x {', '.join(names)}")


def check_disk(output_dir: Path, min_free_gb: float) -> Result:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".preflight-") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free_gb = shutil.disk_usage(output_dir).free / 2**30
    except OSError as err:
        return Result("disk", "FAIL", f"{output_dir}: not writable: {err}")
    detail = f"{output_dir}: {free_gb:.1f} GiB free (need {min_free_gb:g}), writable"
    return Result("disk", "PASS" if free_gb >= min_free_gb else "FAIL", detail)


def _manifest_file(path: Path) -> Path:
    return path / MANIFEST if path.is_dir() else path


def check_shards_present(manifest_file: Path, manifest: dict) -> Result:
    """Every shard exists, has the recorded size and its first byte can be read (a truncated
    copy, a stale NFS handle or a permission problem shows up here, not hours into training)."""
    problems = []
    for entry in manifest["shards"]:
        path = shard_file(manifest, entry)
        try:
            with open(path, "rb") as f:
                f.read(1)
                size = os.fstat(f.fileno()).st_size
            if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
                problems.append(f"shard {entry['path']!r} is {size} bytes, manifest says {entry['bytes']} ({path})")
        except FileNotFoundError:
            problems.append(f"shard {entry['path']!r} missing ({path})")
        except OSError as err:
            problems.append(f"shard {entry['path']!r} unreadable ({path}): {err.strerror or err}")
    n = len(manifest["shards"])
    if problems:
        return Result("manifest", "FAIL", f"{manifest_file}: {len(problems)}/{n} shard(s) bad: {_listed(problems)}")
    return Result("manifest", "PASS", f"{manifest_file}: {n} shard(s) present, readable, of the recorded size")


def check_shard_samples(manifest_file: Path, manifest: dict) -> Result:
    """The first SAMPLED samples of each shard decode with the manifest's token_dtype, seq_len,
    vocab_size and segments, and each shard holds the samples it records: a dataset whose every
    sample is unreadable (a float dtype, ids above the vocabulary) fails here, not at step 1.
    Shards that are missing or of the wrong size are the manifest check's to report."""
    dtype = np.dtype(manifest["token_dtype"])
    n_segments = len(manifest.get("segments") or [])
    problems = []
    for entry in manifest["shards"]:
        path = shard_file(manifest, entry)
        if not path.is_file() or (isinstance(entry.get("bytes"), int) and path.stat().st_size != entry["bytes"]):
            continue
        try:
            samples = read_shard(path, dtype, seq_len=manifest["seq_len"], vocab_size=manifest["vocab_size"],
                                 n_segments=n_segments)
            bad = next((s.error for s in itertools.islice(samples, SAMPLED) if s.error), None)
            if bad:
                problems.append(f"shard {entry['path']!r}: {bad}")
            elif isinstance(entry.get("samples"), int) and (count := count_samples(path)) != entry["samples"]:
                problems.append(f"shard {entry['path']!r} holds {count} samples, manifest says {entry['samples']}")
        except ShardError as err:
            problems.append(str(err))
    n = len(manifest["shards"])
    if problems:
        return Result("samples", "FAIL", f"{manifest_file}: {len(problems)}/{n} shard(s) bad: {_listed(problems)}")
    return Result("samples", "PASS", f"{n} shard(s): first {SAMPLED} samples decode (dtype {dtype.str}, <= "
                                     f"{manifest['seq_len']} tokens, ids < {manifest['vocab_size']}), counts match")


def check_shards_verified(manifest_file: Path, manifest: dict, info: RankInfo) -> Result:
    """sha256 of this rank's share of the shards (sizes are checked without --verify too)."""
    mine = manifest["shards"][info.rank::info.world_size]
    problems = []
    for entry in tqdm(mine, desc="preflight sha256", unit="shard", disable=info.rank != 0):
        path = shard_file(manifest, entry)
        expected = entry.get("sha256")
        if not isinstance(expected, str):
            problems.append(f"shard {entry['path']!r} has no 'sha256' in the manifest")
            continue
        try:
            actual = file_sha256(path)
        except OSError as err:
            problems.append(f"shard {entry['path']!r} unreadable ({path}): {err.strerror or err}")
            continue
        if actual != expected:
            problems.append(f"shard {entry['path']!r} sha256 {actual[:12]}... != manifest {expected[:12]}...")
    if problems:
        return Result("shard sha256", "FAIL", f"{len(problems)}/{len(mine)} bad: {_listed(problems)}")
    return Result("shard sha256", "PASS", f"{len(mine)} shard(s) verified on rank {info.rank}")


def check_tokenizer(tokenizer: Path | None, manifest_file: Path, manifest: dict) -> Result:
    """tokenizer: a directory holding tokenizer.model, the file itself, or None for the copy the
    shard builder keeps next to the manifest (field tokenizer.path, relative to it)."""
    recorded = manifest.get("tokenizer")
    # file_sha256: the file's hash (sha256 is the tokenizer's identity); manifests before identities hold only sha256
    expected = (recorded.get("file_sha256") or recorded.get("sha256")) if isinstance(recorded, dict) else None
    if tokenizer is None:
        rel = recorded.get("path") if isinstance(recorded, dict) else None
        if not isinstance(rel, str):
            return Result("tokenizer", "SKIP", "no --tokenizer given and no tokenizer.path in the manifest")
        tokenizer = contained(manifest_file.parent, rel, f"{manifest_file}: tokenizer.path")
    model = tokenizer / "tokenizer.model" if tokenizer.is_dir() else tokenizer
    if not isinstance(expected, str):
        return Result("tokenizer", "FAIL", f"manifest {manifest_file}: field 'tokenizer.sha256' is missing")
    try:
        actual = file_sha256(model)
    except OSError as err:
        return Result("tokenizer", "FAIL", f"{model}: cannot read: {err.strerror or err}")
    if actual != expected:
        return Result("tokenizer", "FAIL",
                      f"{model}: sha256 {actual[:16]}... does not match manifest {expected[:16]}... "
                      f"(shards were built with another tokenizer)")
    return Result("tokenizer", "PASS", f"{model}: sha256 {actual[:16]}... matches the manifest")


def node_checks(args: argparse.Namespace, info: RankInfo) -> list[Result]:
    """Checks that run once per node (local rank 0), plus this rank's share of --verify."""
    results = []
    manifest_file = manifest = None
    if args.manifest is not None:
        try:
            manifest_file = _manifest_file(args.manifest)
            manifest = load_manifest(args.manifest, args.allow_external_shards)
        except ValueError as err:
            if info.node_leader:
                results.append(Result("manifest", "FAIL", str(err)))
    if info.node_leader:
        results.append(check_gpus(info, args.expect_gpus))
        results.append(check_disk(args.output_dir, args.min_free_gb))
        if args.manifest is None:
            results.append(Result("manifest", "SKIP", "no --manifest given"))
        elif manifest is not None:
            results.append(check_shards_present(manifest_file, manifest))
            results.append(check_shard_samples(manifest_file, manifest))
        if args.manifest is None:
            results.append(Result("tokenizer", "SKIP" if args.tokenizer is None else "FAIL",
                                  "--tokenizer needs --manifest to compare against"))
        elif manifest is not None:
            results.append(check_tokenizer(args.tokenizer, manifest_file, manifest))
    if args.verify and manifest is not None:
        results.append(check_shards_verified(manifest_file, manifest, info))
    return results


# ----------------------------------------------------------------------------------- all-reduce

def check_all_reduce(args: argparse.Namespace, info: RankInfo, group, device: torch.device) -> Result:
    """Correctness (sum of rank+1 over ranks = n(n+1)/2) and bus bandwidth of a large all-reduce.

    Bus bandwidth follows nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n, the
    traffic each link carries in a ring all-reduce, comparable to the link's rated speed.
    """
    n = info.world_size
    probe = torch.full((1024,), float(info.rank + 1), device=device)
    dist.all_reduce(probe, group=group)
    expected = n * (n + 1) / 2
    correct = bool(torch.all(probe == expected).item())
    if n == 1:
        status = "PASS" if correct else "FAIL"
        return Result("all-reduce", status, f"{dist.get_backend(group)}, 1 rank: sum {'correct' if correct else 'WRONG'}; "
                                            "no network traffic, bandwidth not measured")

    numel = max(1, int(args.allreduce_mb * 2**20) // 4)
    buf = torch.ones(numel, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        dist.all_reduce(buf, group=group)
    sync()
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(args.iters):
        dist.all_reduce(buf, group=group)
    sync()
    elapsed = torch.tensor([(time.perf_counter() - start) / args.iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
    seconds = elapsed.item()
    algbw = numel * 4 / seconds / 1e9
    busbw = algbw * 2 * (n - 1) / n
    detail = (f"{dist.get_backend(group)}, {n} rank(s), {numel * 4 / 2**20:.1f} MiB x {args.iters}: "
              f"{seconds * 1e3:.2f} ms/iter, algbw {algbw:.2f} GB/s, busbw {busbw:.2f} GB/s")
    if not correct:
        return Result("all-reduce", "FAIL", f"wrong sum on rank {info.rank} (expected {expected:g}); {detail}")
    if busbw < args.min_busbw_gbps:
        return Result("all-reduce", "FAIL", f"busbw below --min-busbw-gbps {args.min_busbw_gbps:g}; {detail}")
    return Result("all-reduce", "PASS", detail)


# ---------------------------------------------------------------------------------------- main

def _init_distributed(info: RankInfo, timeout_s: float) -> None:
    """A gloo group over all ranks carries the control traffic (and the report) even when the
    GPUs or NCCL are what is broken. Without a launcher's env, a one-rank group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _choose_backend(requested: str, gpu_ok_all: bool) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() and gpu_ok_all else "gloo"


def run_preflight(args: argparse.Namespace) -> tuple[bool, list[list[Result]]]:
    info = _rank_info()
    _init_distributed(info, args.timeout_s)
    try:
        results = node_checks(args, info)
        for r in results:
            r.host = info.host

        # Every rank must take the same collective path: agree first on whether NCCL can run.
        has_gpu = torch.cuda.device_count() > info.local_rank
        gpu_flags: list = [None] * info.world_size
        dist.all_gather_object(gpu_flags, has_gpu)
        backend = _choose_backend(args.backend, all(gpu_flags))
        if backend == "nccl" and not all(gpu_flags):
            missing = [i for i, ok in enumerate(gpu_flags) if not ok]
            ar = Result("all-reduce", "FAIL", f"nccl needs a GPU per rank; ranks {missing} have none")
        else:
            if backend == "nccl":
                torch.cuda.set_device(info.local_rank)
                device = torch.device("cuda", info.local_rank)
                group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=args.timeout_s))
            else:
                device, group = torch.device("cpu"), None
            ar = check_all_reduce(args, info, group, device)
        ar.host = info.host
        if info.rank == 0 or ar.status == "FAIL":
            results.append(ar)

        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, results)
    finally:
        dist.destroy_process_group()
    ok = all(r.status != "FAIL" for rank_results in gathered for r in rank_results)
    return ok, gathered


def format_report(gathered: list[list[Result]], ok: bool) -> str:
    hosts = sorted({r.host for rank_results in gathered for r in rank_results})
    lines = [f"preflight: {len(gathered)} rank(s) on {len(hosts)} node(s)"]
    order = ["gpus", "all-reduce", "disk", "manifest", "samples", "shard sha256", "tokenizer"]
    flat = [(rank, r) for rank, rank_results in enumerate(gathered) for r in rank_results]
    for check in order:
        for rank, r in flat:
            if r.check == check:
                where = f"{r.host} rank {rank}" if check in ("all-reduce", "shard sha256") else r.host
                lines.append(f"  [{r.status}] {check:<12} {where}: {r.detail}")
    n_fail = sum(r.status == "FAIL" for _, r in flat)
    lines.append("preflight PASSED" if ok else f"preflight FAILED: {n_fail} check(s) failed")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Check GPUs, all-reduce, disk, shards and tokenizer on every node before a long job.\n"
                    "Run it with the same launcher as training (deepspeed, torchrun or srun);\n"
                    "without a launcher it checks this machine as one rank.",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("."),
                        help="run directory: created if missing, must be writable with --min-free-gb free")
    parser.add_argument("--min-free-gb", type=float, default=50.0, help="free space needed (GiB)")
    parser.add_argument("--manifest", type=Path, default=None, help="shard manifest.json or its directory")
    parser.add_argument("--allow-external-shards", action="store_true",
                        help="accept shard paths outside the manifest's directory (absolute or with ..), "
                             "as data.allow_external_shards does for training")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory (with tokenizer.model) or the model file; its sha256 "
                             "must equal the manifest's tokenizer.file_sha256 (default: the manifest's tokenizer.path)")
    parser.add_argument("--verify", action="store_true",
                        help="also check each shard's sha256 (split across all ranks); sizes are always checked")
    parser.add_argument("--expect-gpus", type=int, default=None, help="GPUs each node must see")
    parser.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                        help="all-reduce backend; auto = nccl with GPUs, else gloo")
    parser.add_argument("--allreduce-mb", type=float, default=256.0, help="all-reduce message size (MiB)")
    parser.add_argument("--iters", type=int, default=10, help="timed all-reduce iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed all-reduce iterations")
    parser.add_argument("--min-busbw-gbps", type=float, default=0.0,
                        help="fail below this all-reduce bus bandwidth (GB/s), e.g. to catch a TCP fallback")
    parser.add_argument("--timeout-s", type=float, default=1800.0,
                        help="collective timeout (s); a rank that never arrives fails the run")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.allreduce_mb <= 0:
        parser.error("--iters must be >= 1, --warmup >= 0 and --allreduce-mb > 0")
    # The buffer is allocated on every rank: refused before the group starts, not when it swaps.
    require_memory(int(args.allreduce_mb * 2**20), f"--allreduce-mb {args.allreduce_mb:g} (the all-reduce buffer)")
    return args


def _main(argv: list[str], prog: str) -> int:
    args = _parse_args(argv, prog)
    ok, gathered = run_preflight(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(format_report(gathered, ok), flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None, prog: str = "python -m launch.preflight") -> int:
    """Failed checks are a report and exit status 1; a bad flag is one line and exit status 2."""
    return cli_main(lambda args: _main(args, prog), prog, argv)


if __name__ == "__main__":
    sys.exit(main())
