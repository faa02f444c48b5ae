"""`python -m model`: build a preset, print its layout and size, and run one forward/backward step."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kernels import kernel_choice

from . import PRESETS, AtmaConfig, AtmaForCausalLM
from .device import default_device, usable_device


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="python -m model",
        description="Build an ATMA model from a preset, print its layout and parameter count, "
        "and time one forward+backward pass on random tokens (a smoke test of the install).",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--core", choices=["polar", "nope", "rope"], help="global-attention core (default: the preset's)")
    p.add_argument("--no-memory", action="store_true", help="disable the gated-delta memory branch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch (default: 2)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the smoke step and print a summary."""
    args = parse_args(argv)
    overrides = {}
    if args.core:
        overrides["core"] = args.core
    if args.no_memory:
        overrides["memory"] = False
    if args.seq_len < 1 or args.batch < 1:
        print("error: --seq-len and --batch must be positive", file=sys.stderr)
        return 2
    try:
        kernel_choice()
        device = usable_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = AtmaConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(args.seed)
    model = AtmaForCausalLM(config).to(device)
    print(f"preset {args.preset}: core={config.core} memory={config.memory} layout {config.layout}")
    print(f"parameters: {model.num_parameters():,}")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    tokens = args.batch * args.seq_len
    print(f"forward+backward on {tokens:,} tokens: loss {loss.item():.4f} in {elapsed:.2f} s ({tokens / elapsed:,.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
