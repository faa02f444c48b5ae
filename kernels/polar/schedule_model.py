"""A list-scheduling model of the Polar launches: how long a launch's programs keep a GPU's SMs busy
when they start in the order of their ids, tile by tile or longest first, against a perfectly
balanced launch. No GPU is needed; `kernels.bench` measures the real thing.

    python -m kernels.polar.schedule_model [--seq-lens 2048 8192 32768] [--sms 132] [--per-sm 1]

Each program's cost is the number of tile pairs its loop visits under the causal mask (no window).
An SM takes the next program id when one of its slots frees (`--per-sm` programs at a time; the
default tiles hold 255 registers per thread in 8 warps, so one). The batch is 16,384 // T
sequences, as in `kernels.bench`, with its H = 8 query heads over G = 2 KV heads and d = 128, and
the tiles are the default ones of the `large` launch class (H100, H200).
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
from unittest import mock

__all__ = ["program_costs", "busy_time", "model", "main"]


def program_costs(kind: str, T: int, bm: int, bn: int, slices: int, group: int, *, longest_first: bool) -> list[int]:
    """Tile pairs each program of a launch visits, in program-id order ("fwd" and "dq" own a query
    tile of BM rows, "dkdv" a key tile of BN keys and the `group` query heads that read it)."""
    if kind in ("fwd", "dq"):
        tiles = -(-T // bm)
        cost = [-(-min((m + 1) * bm, T) // bn) for m in range(tiles)]
        heaviest_first = range(tiles - 1, -1, -1)
    elif kind == "dkdv":
        tiles = -(-T // bn)
        cost = [group * -(-(T - n * bn) // bm) for n in range(tiles)]
        heaviest_first = range(tiles)
    else:
        raise ValueError(f"kind must be fwd, dq or dkdv; got {kind!r}")
    if longest_first:
        return [cost[t] for t in heaviest_first for _ in range(slices)]
    return [cost[t] for _ in range(slices) for t in range(tiles)]


def busy_time(costs: list[int], slots: int) -> int:
    """When the last of `costs` ends if `slots` run at once, each free slot taking the next program."""
    ends = [0] * slots
    for cost in costs:
        heapq.heapreplace(ends, ends[0] + cost)
    return max(ends)


def model(T: int, *, sms: int = 132, per_sm: int = 1, heads: int = 8, kv_heads: int = 2, d: int = 128,
          profile: str = "large") -> list[dict]:
    """Per launch kind at length T, with the default tiles of launch class `profile`: busy time of each
    order over that of a perfectly balanced launch."""
    import torch

    from .triton_impl import launch_candidates

    with mock.patch.dict(os.environ, {"ATMA_POLAR_TRITON_PROFILE": profile}):
        tiles = {kind: launch_candidates(kind, torch.device("cuda"), torch.bfloat16, d)[0][:2]
                 for kind in ("fwd", "dq", "dkdv")}
    B = max(1, 16384 // T)
    slots = sms * per_sm
    records = []
    for kind, slices in (("fwd", B * heads), ("dq", B * heads), ("dkdv", B * kv_heads)):
        bm, bn = tiles[kind]
        group = heads // kv_heads
        in_order = program_costs(kind, T, bm, bn, slices, group, longest_first=False)
        balanced = sum(in_order) / slots
        rec = {"kind": kind, "T": T, "B": B, "tile": (bm, bn), "programs": len(in_order)}
        for name, longest in (("in_order", False), ("longest_first", True)):
            costs = program_costs(kind, T, bm, bn, slices, group, longest_first=longest)
            rec[name] = busy_time(costs, slots) / balanced
        rec["speedup"] = rec["in_order"] / rec["longest_first"]
        records.append(rec)
    return records


def main(argv=None) -> int:
    """Print the model's figures; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m kernels.polar.schedule_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768], metavar="T",
                        help="sequence lengths (default: 2048 8192 32768); batch = max(1, 16384 // T)")
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (default: 132, H100/H200)")
    parser.add_argument("--per-sm", type=int, default=1, help="programs an SM runs at once (default: 1)")
    args = parser.parse_args(argv)
    if min(args.seq_lens) < 1 or args.sms < 1 or args.per_sm < 1:
        parser.error("--seq-lens, --sms and --per-sm must be positive")
    print(f"{args.sms} SMs x {args.per_sm} program(s); busy time over a perfectly balanced launch")
    for T in args.seq_lens:
        for rec in model(T, sms=args.sms, per_sm=args.per_sm):
            print(f"  T={T:6d} B={rec['B']} {rec['kind']:<5s} tile {rec['tile']} {rec['programs']:5d} programs: "
                  f"in order {rec['in_order']:.3f}x, longest first {rec['longest_first']:.3f}x "
                  f"-> {rec['speedup']:.3f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
