"""Benchmark group-causal attention against dense-mask SDPA, FlexAttention and flash-attn.

    python bench/attention.py            # GPU: B*L = 16k tokens, H = 16, D = 128, bf16
    python bench/attention.py --quick    # CPU smoke run: tiny shapes, fp32, reference + SDPA

Layouts come in both attention modes of the model (docs/model.md): "<layout>" computes both
XLNet streams (content rows, inclusive rule; a query row per target, strict rule) for the same
keys/values; "<layout>, 1 stream" the single-stream rows: START, S and the targets as content
rows (the last target's row dropped) and query rows only for targets of groups with several
tokens (MLM). "flash-attn causal (content only)" is the yardstick: one plain causal stream of L
rows. TFLOP/s counts only visible (row, key) pairs: forward 4*D flops per pair and head (QK^T
and PV), backward 10*D (five matmuls). A second table counts key tiles with the kernel's tile
rule (a BLOCK_M-row query tile loads the key tiles up to its rows' longest visible prefix),
relative to causal attention over L rows: the cost a layout must pay by construction. Group
layouts follow the sorted layout of docs/design.md and are generated here (no import of pretrain).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biglearn_kernels import INVALID_GROUP, group_attention, two_stream_attention, visibility

LAYOUTS = ("causal", "mlm", "plm", "biglearn")
SINGLE_STREAM_LAYOUTS = ("causal", "mlm", "biglearn")  # plm has biglearn's single-stream shape
TILE = (128, 64)  # the tile-count table's BLOCK_M x BLOCK_N (the kernel's largest tuned tile)
MEMORY_TOKENS = 16384  # the metadata-size table is always for B*L = 16k tokens


# --------------------------------------------------------------------------- layouts (docs/design.md, "Sorted layout")
def sample_groups(layout: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Groups of one sorted sample [S | T in prediction order | dropped/padding]."""
    if layout == "causal":  # S empty, every token its own group in original order
        return np.arange(1, n + 1)
    if layout == "mlm":  # 85% source, 15% targets predicted jointly (one group)
        n_target = max(1, round(0.15 * n))
        return np.concatenate([np.zeros(n - n_target), np.ones(n_target)])
    if layout == "plm":  # XLNet: last 1/6 of a random permutation are targets, one group each
        n_target = max(1, n // 6)
        return np.concatenate([np.zeros(n - n_target), np.arange(1, n_target + 1)])
    if layout == "biglearn":  # source ratio ~ Beta(0.5, 3), target ratio of the rest ~ Beta(3, 0.5)
        n_source = min(n - 1, round(rng.beta(0.5, 3.0) * n))
        n_target = max(1, round(rng.beta(3.0, 0.5) * (n - n_source)))
        n_pad = n - n_source - n_target
        return np.concatenate([np.zeros(n_source), np.arange(1, n_target + 1), np.full(n_pad, INVALID_GROUP)])
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def single_stream_rows(row: np.ndarray):
    """Content groups [START | S | targets without the last one] (same length) and the groups of
    the targets that need a query row: those in a group of several, or after one."""
    targets = row[(row > 0) & (row != INVALID_GROUP)]
    sizes = dict(zip(*np.unique(targets, return_counts=True)))
    alone = np.array([sizes[g] == 1 for g in targets])
    after_alone = np.concatenate([[True], alone[:-1]])
    content = np.concatenate([[0], np.delete(row, len(row) - 1 - np.argmax(row[::-1] != INVALID_GROUP))])
    return content, targets[~(alone & after_alone)]


def make_layout(layout: str, batch: int, n: int, rng: np.random.Generator, streams: int = 2):
    """Content groups [B, N] and query-stream groups [B, Nt] (INVALID-padded, Nt may be 0), int32."""
    rows = [sample_groups(layout, n, rng) for _ in range(batch)]
    targets = [r[(r > 0) & (r != INVALID_GROUP)] for r in rows]
    if streams == 1:
        rows, targets = zip(*(single_stream_rows(r) for r in rows))
    n_t = max(len(t) for t in targets)
    query = [np.concatenate([t, np.full(n_t - len(t), INVALID_GROUP)]) for t in targets]
    return torch.tensor(np.array(rows), dtype=torch.int32), torch.tensor(np.array(query), dtype=torch.int32)


def key_tiles(q_groups: torch.Tensor, k_groups: torch.Tensor, *, strict: bool, tile=TILE) -> int:
    """Key tiles a query-tiled kernel computes: per tile of tile[0] rows, ceil(longest visible
    prefix / tile[1]) (keys are sorted by group, so each row sees a prefix)."""
    from biglearn_kernels.reference import visible_prefix

    if q_groups.shape[1] == 0:
        return 0
    prefix = visible_prefix(q_groups, k_groups, strict=strict)
    padded = torch.nn.functional.pad(prefix, (0, -prefix.shape[1] % tile[0]))
    longest = padded.view(prefix.shape[0], -1, tile[0]).amax(-1)
    return int(((longest + tile[1] - 1) // tile[1]).sum())


def tile_ratio(groups: torch.Tensor, query_groups: torch.Tensor, tile=TILE) -> float:
    """Key tiles of both streams relative to causal attention over L rows, same batch size."""
    batch, n = groups.shape
    causal = torch.arange(n, dtype=torch.int32).expand(batch, n).contiguous()
    return ((key_tiles(groups, groups, strict=False, tile=tile) + key_tiles(query_groups, groups, strict=True, tile=tile))
            / key_tiles(causal, causal, strict=False, tile=tile))


def visible_pairs(q_groups: torch.Tensor, k_groups: torch.Tensor, *, strict: bool) -> int:
    """Number of visible (row, key) pairs, by binary search over the sorted key groups."""
    total = 0
    for qg, kg in zip(q_groups.long(), k_groups.long()):
        valid_keys = kg[kg != INVALID_GROUP].contiguous()
        counts = torch.searchsorted(valid_keys, qg, right=not strict)
        total += int(counts[qg != INVALID_GROUP].sum())
    return total


# --------------------------------------------------------------------------- methods
def dense_masks(groups, query_groups):
    """[B, 1, Nq, Nk] boolean masks; rows that see nothing may see everything (zeroed after)."""
    masks = []
    for q_groups, strict in ((groups, False), (query_groups, True)):
        mask = visibility(q_groups, groups, strict=strict)[:, None]
        masks.append((mask | ~mask.any(-1, keepdim=True), mask.any(-1, keepdim=True)))
    return masks


def sdpa_two_stream(q_c, q_q, k, v, groups, query_groups):
    """Dense boolean mask per stream (O(B*L^2) memory), built per batch inside the timing."""
    f = torch.nn.functional.scaled_dot_product_attention
    gqa = q_c.shape[1] != k.shape[1]
    outs = []
    for q, (mask, sees) in zip((q_c, q_q), dense_masks(groups, query_groups)):
        if q.shape[2]:  # single stream: no query rows for a causal or big-learning layout
            outs.append(torch.where(sees, f(q, k, v, attn_mask=mask, enable_gqa=gqa), 0.0))
    return outs


def group_kernel(backend: str):
    """Our entry points on one backend: both streams fused, or the content rows alone."""
    def run(q_c, q_q, k, v, groups, query_groups):
        if q_q.shape[2] == 0:
            return [group_attention(q_c, k, v, groups, groups, strict=False, backend=backend, check_sorted=False)]
        return two_stream_attention(q_c, q_q, k, v, groups, query_groups, backend=backend, check_sorted=False)
    return run


reference_two_stream, triton_two_stream = group_kernel("torch"), group_kernel("triton")


def flex_block_masks(create_block_mask, groups, query_groups):
    """BlockMasks of the content (inclusive) and query (strict) rules from the same groups."""
    def content(b, h, q_idx, kv_idx):
        g = groups[b, q_idx]
        return (groups[b, kv_idx] <= g) & (g != INVALID_GROUP)

    def query(b, h, q_idx, kv_idx):
        g = query_groups[b, q_idx]
        return (groups[b, kv_idx] < g) & (g != INVALID_GROUP)

    n, n_t, batch = groups.shape[1], query_groups.shape[1], groups.shape[0]
    return (create_block_mask(content, batch, None, n, n, device=groups.device),
            create_block_mask(query, batch, None, n_t, n, device=groups.device) if n_t else None)


def make_flex_two_stream(compile_mask: bool):
    """FlexAttention with both BlockMasks rebuilt every batch (layouts differ per batch), by
    create_block_mask run eagerly or under torch.compile (PyTorch's advice for long sequences)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    build_mask = torch.compile(create_block_mask) if compile_mask else create_block_mask
    build_times: list[float] = []

    def run(q_c, q_q, k, v, groups, query_groups):
        start = _now(q_c.device)
        masks = flex_block_masks(build_mask, groups, query_groups)
        build_times.append(_elapsed(start, q_c.device))
        gqa = q_c.shape[1] != k.shape[1]
        return [flex(q, k, v, block_mask=m, enable_gqa=gqa) for q, m in zip((q_c, q_q), masks) if q.shape[2]]

    return run, build_times


def make_flash_causal():
    from flash_attn import flash_attn_func

    def run(q_c, q_q, k, v, groups, query_groups):
        o = flash_attn_func(q_c.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return [o.transpose(1, 2)]

    return run


# --------------------------------------------------------------------------- timing
def _now(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start, device) -> float:
    """Milliseconds since `start`."""
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    return (time.perf_counter() - start) * 1e3


def time_method(fn, inputs, groups, query_groups, reps: int, warmup: int):
    """Median forward, backward and forward+backward milliseconds, and peak memory
    (MiB above the inputs, CUDA only). Backward is timed on its own after an untimed forward."""
    device = inputs[0].device

    def forward():
        return fn(*inputs, groups, query_groups)

    def backward(outs):
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    for _ in range(warmup):
        backward(forward())
    fwd, bwd, both = [], [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        start = _now(device)
        outs = forward()
        fwd.append(_elapsed(start, device))
        start = _now(device)
        backward(outs)
        bwd.append(_elapsed(start, device))
        start = _now(device)
        backward(forward())
        both.append(_elapsed(start, device))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return float(np.median(fwd)), float(np.median(bwd)), float(np.median(both)), peak


@dataclass
class Row:
    layout: str
    method: str
    fwd_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    tflops: float
    peak_mib: float | None
    mask_build_ms: float | None
    mask_mib: float


def mask_mib(method: str, groups, query_groups, block_mask_bytes: int | None = None) -> float:
    """Bytes of visibility metadata a method keeps per batch."""
    batch, n = groups.shape
    n_t = query_groups.shape[1]
    if method.startswith("sdpa"):
        return batch * (n + n_t) * n / 2**20  # two dense bool masks
    if method.startswith("flex") and block_mask_bytes is not None:
        return (block_mask_bytes + groups.nbytes + query_groups.nbytes) / 2**20
    return (groups.nbytes + query_groups.nbytes) / 2**20  # per-token int32 groups only


def block_mask_nbytes(groups, query_groups) -> int:
    """Size of the two BlockMasks' tensors for this batch (built once more, outside timing)."""
    from torch.nn.attention.flex_attention import create_block_mask

    masks = flex_block_masks(create_block_mask, groups, query_groups)
    return sum(t.nbytes for m in masks if m is not None for t in m.as_tuple() if isinstance(t, torch.Tensor))


def memory_table(tokens: int, lengths=(4096, 16384)) -> list[dict]:
    """Visibility metadata per batch of `tokens` tokens: int32 groups (measured on CPU tensors)
    versus the dense boolean masks SDPA needs (computed: B * L * (L + Nt) bytes)."""
    rng = np.random.default_rng(0)
    out = []
    for n in lengths:
        batch = max(1, tokens // n)
        groups, query_groups = make_layout("biglearn", batch, n, rng)
        out.append(dict(L=n, B=batch, groups_kib=(groups.nbytes + query_groups.nbytes) / 2**10,
                        dense_mask_mib=batch * n * (n + query_groups.shape[1]) / 2**20))
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: B=2, L=64, H=2, D=16, fp32, torch reference + SDPA dense mask, 1 rep")
    p.add_argument("--tokens", type=int, default=16384, help="B*L tokens per batch")
    p.add_argument("--seq-len", type=int, default=4096, help="L; B = tokens // L")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA); default = --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list from {LAYOUTS}")
    p.add_argument("--streams", type=int, nargs="+", choices=(1, 2), default=[2, 1],
                   help=f"attention modes to time (1: single-stream rows of {SINGLE_STREAM_LAYOUTS})")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows (then the tile ratios) as JSON lines here")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.heads, args.head_dim = 128, 64, 2, 16
        args.dtype, args.reps, args.warmup = "float32", 1, 1
    return args


def methods_for(device: torch.device, quick: bool):
    """(name, fn, flex build-time list or None) available on this machine."""
    if quick or device.type != "cuda":
        return [("torch reference", reference_two_stream, None), ("sdpa dense mask", sdpa_two_stream, None)]
    found = [("group triton (fused)", triton_two_stream, None), ("sdpa dense mask", sdpa_two_stream, None)]
    for compile_mask in (False, True):
        flex, build_times = make_flex_two_stream(compile_mask)
        found.append((f"flex attention, {'compiled' if compile_mask else 'eager'} mask", flex, build_times))
    try:
        found.append(("flash-attn causal (content only)", make_flash_causal(), None))
    except ImportError:
        pass
    return found


def run(args) -> tuple[list[Row], list[str], list[dict], list[dict]]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = getattr(torch, args.dtype)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for name in layouts:
        if name not in LAYOUTS:
            raise ValueError(f"--layouts: {name!r} is not one of {LAYOUTS}")
    cases = [(layout, streams) for streams in args.streams for layout in layouts
             if streams == 2 or layout in SINGLE_STREAM_LAYOUTS]
    batch, n = max(1, args.tokens // args.seq_len), args.seq_len
    kv_heads = args.kv_heads or args.heads
    rng = np.random.default_rng(args.seed)
    methods = methods_for(device, args.quick)
    rows, failures, tiles = [], [], []
    progress = tqdm(total=len(cases) * len(methods), desc="attention bench", file=sys.stderr)
    for base, streams in cases:
        layout = base if streams == 2 else f"{base}, 1 stream"
        groups, query_groups = make_layout(base, batch, n, rng, streams)
        tiles.append({"layout": layout, "tile_ratio": tile_ratio(groups, query_groups), "query_rows": query_groups.shape[1]})
        groups, query_groups = groups.to(device), query_groups.to(device)
        n_t = query_groups.shape[1]
        pairs_both = (visible_pairs(groups, groups, strict=False) + visible_pairs(query_groups, groups, strict=True))
        pairs_content = visible_pairs(groups, groups, strict=False)
        inputs = [torch.randn(batch, h, length, args.head_dim, device=device, dtype=dtype, requires_grad=True)
                  for h, length in ((args.heads, n), (args.heads, n_t), (kv_heads, n), (kv_heads, n))]
        for name, fn, build_times in methods:
            if build_times is not None:
                build_times.clear()
            try:
                fwd, bwd, both, peak = time_method(fn, inputs, groups, query_groups, args.reps, args.warmup)
            except Exception as err:  # one broken baseline must not hide the other rows
                failures.append(f"{layout} / {name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                progress.update()
                continue
            pairs = pairs_content if name.startswith("flash") else pairs_both
            flops = 14 * args.head_dim * args.heads * pairs
            build = float(np.median(build_times)) if build_times else None
            extra = block_mask_nbytes(groups, query_groups) if name.startswith("flex") else None
            rows.append(Row(layout, name, fwd, bwd, both, flops / (both * 1e-3) / 1e12, peak, build,
                            mask_mib(name, groups, query_groups, extra)))
            progress.update()
    progress.close()
    return rows, failures, memory_table(MEMORY_TOKENS), tiles


def format_tables(rows: list[Row], failures: list[str], memory: list[dict], tiles: list[dict], args) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    lines = [f"B*L = {args.tokens} tokens, L = {args.seq_len}, H = {args.heads}, D = {args.head_dim}, "
             f"{args.dtype}, median of {args.reps}",
             "",
             "| layout | method | fwd ms | bwd ms | fwd+bwd ms | TFLOP/s | peak MiB | mask build ms | mask MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.layout} | {r.method} | {r.fwd_ms:.3f} | {r.bwd_ms:.3f} | {r.fwd_bwd_ms:.3f} | "
                     f"{r.tflops:.3g} | {fmt(r.peak_mib, '.1f')} | {fmt(r.mask_build_ms, '.3f')} | "
                     f"{r.mask_mib:.4f} |")
    lines += [f"\nFAILED {failure}" for failure in failures]
    lines += ["", f"Key tiles ({TILE[0]} x {TILE[1]}) relative to causal attention over L = {args.seq_len} rows "
              "(what a layout costs by construction):", "", "| layout | query rows | tiles / causal |", "|---|---:|---:|"]
    lines += [f"| {t['layout']} | {t['query_rows']} | {t['tile_ratio']:.2f} |" for t in tiles]
    lines += ["", f"Visibility metadata per batch of {MEMORY_TOKENS} tokens (big-learning layout):", "",
              "| L | B | int32 groups KiB (measured) | dense bool masks MiB (B*L*(L+Nt)) |", "|---:|---:|---:|---:|"]
    for m in memory:
        lines.append(f"| {m['L']} | {m['B']} | {m['groups_kib']:.1f} | {m['dense_mask_mib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, failures, memory, tiles = run(args)
    print(format_tables(rows, failures, memory, tiles, args))
    if args.json is not None:
        with args.json.open("w") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")
            for t in tiles:  # {"layout", "tile_ratio", "query_rows"}: no "method" key
                f.write(json.dumps(t) + "\n")
    return 0 if not failures and all(math.isfinite(r.fwd_bwd_ms) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
